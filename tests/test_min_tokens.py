"""`min_tokens` end to end against HF `generate(min_new_tokens=K)`.

The checkpoint makes eos the overwhelming next token everywhere (ln_f's bias and eos' tied embedding row
point the same way: an eos logit ~40 above the rest), so without the ban every request stops at its first
token, and with `min_tokens=K` it stops with eos as token K + 1 exactly: an off-by-one, a ban that misses
a decode step, a prefill or a fork, or a ban left on after K all change the tokens. One engine (4 slots,
context 64, decode 4 steps per call: K = 5 and 9 end inside a call) serves every test.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.checkpoints import copy_tokenizer, tiny_gpt2
from tests.test_generate import boundary_stop, random_prompt

EOS = 50256
OPTIONS = dict(max_slots=4, max_seq_len=64, decode_steps=4, prefill_buckets=(16, 32), prefill_token_budget=32)
PROMPTS = [random_prompt(n, 40 + n) for n in (3, 9, 20, 11, 5)]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = tiny_gpt2(seed=0, initializer_range=0.2)
    direction = torch.zeros(model.config.n_embd)
    direction[0] = 1.0
    with torch.no_grad():
        model.transformer.ln_f.bias.copy_(5.0 * direction)
        model.transformer.wte.weight[EOS] = 8.0 * direction  # tied: the LM head's eos row too
    folder = tmp_path_factory.mktemp("eos-gpt2")
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    return Engine.from_pretrained(checkpoint, **OPTIONS)


@pytest.fixture(scope="module")
def hf_model(checkpoint) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()


def hf_generate(model, prompt: list[int], min_new_tokens: int, max_new_tokens: int = 12,
                stop_token_ids: tuple[int, ...] = ()) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             eos_token_id=[EOS, *stop_token_ids], pad_token_id=EOS)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_min_new_tokens(engine, hf_model):
    """Five requests on four slots, each its own K (0, 1, 5, 9, 12 = max_new_tokens), one generate call."""
    ks = (0, 1, 5, 9, 12)
    ours = engine.generate(PROMPTS, [dataclasses.replace(GREEDY, min_tokens=k) for k in ks])
    for prompt, k, out in zip(PROMPTS, ks, ours):
        want = hf_generate(hf_model, prompt, k)
        assert out.token_ids == want, f"min_tokens={k}"
        if k < 12:  # the test's premise: eos is the greedy token whenever allowed
            assert (out.finish_reason, len(want), want[-1]) == ("stop", k + 1, EOS), f"min_tokens={k}"
            assert EOS not in want[:k]
        else:
            assert (out.finish_reason, len(want)) == ("length", 12) and EOS not in want


def test_stop_token_ids_are_held_back_like_eos(engine, hf_model):
    """A stop id the greedy path takes is banned until min_tokens, as eos (HF: one more eos id)."""
    prompt = PROMPTS[2]
    path = engine.generate(prompt, dataclasses.replace(GREEDY, min_tokens=12))[0].token_ids
    stop = path[2]
    assert stop not in path[:2]
    params = dataclasses.replace(GREEDY, min_tokens=7, stop_token_ids=(stop,))
    out = engine.generate(prompt, params)[0]
    want = hf_generate(hf_model, prompt, 7, stop_token_ids=(stop,))
    assert out.token_ids == want and stop not in want[:7] and want[:2] == path[:2] and want[2] != stop
    assert (out.finish_reason, len(out.token_ids), out.token_ids[-1]) == ("stop", 8, EOS)


def test_sampled_rows_forks_and_penalties_hold_eos_back(engine):
    """Sampling rows (top-k, top-p, penalties, logprobs, n = 2 forks from one prefill) never draw eos
    before min_tokens, and draw it (probability ~1) right after."""
    base = SamplingParams(temperature=1.0, seed=3, max_new_tokens=12)
    params = [dataclasses.replace(base, min_tokens=3), dataclasses.replace(base, min_tokens=6, top_k=20, n=2),
              dataclasses.replace(base, min_tokens=9, top_p=0.9, presence_penalty=1.0, logprobs=2),
              dataclasses.replace(base, min_tokens=4, repetition_penalty=1.3, min_p=0.05)]
    outs = engine.generate(PROMPTS[:4], params)
    ks = [3, 6, 6, 9, 4]
    assert len(outs) == len(ks)
    for k, out in zip(ks, outs):
        assert out.finish_reason == "stop" and len(out.token_ids) == k + 1 and out.token_ids[-1] == EOS
        assert EOS not in out.token_ids[:k]
    assert outs[1].token_ids != outs[2].token_ids  # the two forks drew their own tokens
    # logprobs stay those of the raw model: eos was banned, not made unlikely
    assert all(dict(e.top).get(EOS, 0.0) > -1e-3 for e in outs[3].logprobs)


def test_ignore_eos_still_bans_eos_until_min_tokens(engine):
    """vLLM's rule: eos is one of the ids min_tokens holds back even with ignore_eos; after it, eos is
    generated and does not stop the request."""
    out = engine.generate(PROMPTS[1], dataclasses.replace(GREEDY, min_tokens=4, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert EOS not in out.token_ids[:4] and out.token_ids[4:] == [EOS] * 8


def test_stop_strings_are_looked_for_from_min_tokens_on(engine):
    """A stop string completed by token i stops the request when min_tokens <= i, and is kept in the
    text (the request goes on to eos) when min_tokens > i."""
    prompt = PROMPTS[3]
    full = engine.generate(prompt, dataclasses.replace(GREEDY, min_tokens=12))[0]
    stop, last, cut = boundary_stop(engine.tokenizer, full.token_ids)
    params = dataclasses.replace(GREEDY, stop=(stop,))
    at = engine.generate(prompt, dataclasses.replace(params, min_tokens=last + 1))[0]
    assert (at.finish_reason, at.token_ids, at.text) == ("stop", full.token_ids[:last + 1], full.text[:cut])
    past = engine.generate(prompt, dataclasses.replace(params, min_tokens=last + 2))[0]
    assert past.finish_reason == "stop" and past.token_ids == full.token_ids[:last + 2] + [EOS]
    assert past.text == engine.tokenizer.decode(full.token_ids[:last + 2]) and stop in past.text
    assert "".join(engine.stream(prompt, dataclasses.replace(params, min_tokens=last + 2))) == past.text


def test_min_tokens_reaching_the_context_ends_with_length(engine):
    prompt = random_prompt(60, 7)
    out = engine.generate(prompt, dataclasses.replace(GREEDY, min_tokens=12))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4 and EOS not in out.token_ids
    assert np.argmax(engine.logits(prompt)[-1]) == EOS  # without the ban the first token would be eos
