"""Prompt scoring (`SamplingParams.prompt_logprobs`, `Engine.score`) on a tiny random GPT-2 checkpoint:
exact against HF's `log_softmax(logits)` gathered at the next token, a prompt packed with others scores as
it does alone, scoring leaves generation unchanged, and with `warmup(score=True)` nothing recompiles."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from engine import scoring
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.checkpoints import make_tiny_checkpoint

OPTIONS = dict(max_slots=4, max_seq_len=64, decode_steps=4, prefill_buckets=(64,), prefill_token_budget=128)
LENGTHS = (1, 2, 5, 9, 14, 30, 63)


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50257, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-score"), seed=5)


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    eng = Engine.from_pretrained(checkpoint, **OPTIONS)
    eng.warmup(score=True)
    return eng


def hf_logprobs(checkpoint, ids: list[int]) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("top_n", [0, 1, 3])  # the three ways top entries are computed (engine.scoring)
def test_score_matches_hf_log_softmax(engine, checkpoint, top_n):
    batch = prompts()
    scored = engine.score(batch, top_n=top_n)
    for ids, entries in zip(batch, scored):
        assert len(entries) == len(ids) and entries[0] is None
        ref = hf_logprobs(checkpoint, ids)
        for j, e in enumerate(entries[1:], start=1):
            assert e.token_id == ids[j] and abs(e.logprob - ref[j - 1, ids[j]].item()) <= 1e-4
            values, top = torch.topk(ref[j - 1], top_n)
            assert [t for t, _ in e.top] == top.tolist()
            assert np.allclose([v for _, v in e.top], values.numpy(), atol=1e-4)


def test_packed_prompts_score_as_alone(engine, monkeypatch):
    calls = []
    original = engine.runner.score_prefill
    monkeypatch.setattr(engine.runner, "score_prefill", lambda rows, top: calls.append(rows) or original(rows, top))
    batch = prompts(1)
    together = engine.score(batch, top_n=2)
    prompts_per_call = [len({s for s in c.segments.ravel().tolist() if s < len(c.lengths)}) for c in calls]
    assert max(prompts_per_call) > 1 and sum(prompts_per_call) == len(batch)  # some packed together
    for ids, packed in zip(batch, together):
        (alone,) = engine.score([ids], top_n=2)
        assert [e.token_id for e in packed[1:]] == [e.token_id for e in alone[1:]]
        assert all(abs(a.logprob - b.logprob) <= 1e-5 and [t for t, _ in a.top] == [t for t, _ in b.top]
                   for a, b in zip(packed[1:], alone[1:]))


def test_scoring_leaves_generation_unchanged_and_compiles_nothing(engine):
    traces = engine.runner.trace_count
    batch = prompts(2)[:5]
    plain = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True))
    mixed = [SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True, prompt_logprobs=k % 3 or None)
             for k in range(len(batch))]
    scored = engine.generate(batch, mixed)
    assert [c.token_ids for c in scored] == [c.token_ids for c in plain]
    for c, p in zip(scored, mixed):
        if p.prompt_logprobs is None:
            assert c.prompt_logprobs is None
        else:
            assert c.prompt_logprobs == engine.score([c.prompt_token_ids], top_n=p.prompt_logprobs)[0]
    only = engine.generate(batch[:2], SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    assert [(c.token_ids, c.finish_reason, c.text) for c in only] == [([], "length", "")] * 2
    assert engine.runner.trace_count == traces


def test_top_one_breaks_ties_like_top_k():
    logits = jnp.array([[0.0, 3.0, 1.0, 3.0], [-jnp.inf, 2.0, 2.0, 2.0], [5.0, 5.0, -1.0, 0.0]])
    values, ids = scoring._top_one(logits)
    want_values, want_ids = jax.lax.top_k(logits, 1)
    assert ids[:, 0].tolist() == want_ids[:, 0].tolist() == [1, 1, 0]
    assert values[:, 0].tolist() == want_values[:, 0].tolist()


@pytest.mark.parametrize("fields, field", [(dict(max_new_tokens=0), "max_new_tokens"),
                                           (dict(prompt_logprobs=21), "prompt_logprobs"),
                                           (dict(prompt_logprobs=True), "prompt_logprobs")])
def test_prompt_logprobs_validation(fields, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**fields)


def test_sharded_scoring_equals_unsharded(engine, checkpoint):
    batch = prompts(3)[:4]
    sharded = Engine.from_pretrained(checkpoint, **{**OPTIONS, "max_slots": 4}, mesh="data=2,model=4")
    for a, b in zip(engine.score(batch, top_n=2), sharded.score(batch, top_n=2)):
        assert all(abs(x.logprob - y.logprob) <= 1e-5 and [t for t, _ in x.top] == [t for t, _ in y.top]
                   for x, y in zip(a[1:], b[1:]))
