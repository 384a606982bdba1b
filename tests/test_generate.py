"""Generation engine acceptance: `Engine.generate` / `stream` on a tiny random GPT-2 checkpoint.

The checkpoint is made here (transformers + save_pretrained, initializer_range 0.2 so next-token
distributions are peaked and greedy never meets a near-tie) with the real GPT-2 tokenizer files.
One warmed-up engine (4 slots, context 64, prefill buckets 16/32/64, decode 4 steps per call) serves most
tests; a second, on a copy of the weights cut to 64 positions with eos moved onto a token the greedy
continuation reaches (default max_seq_len, 2 slots, 3 decode steps), checks eos, the context bound taken
from the checkpoint, and that seeded draws do not depend on the slot count or decode granularity.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from engine.engine import Engine
from engine.requests import completion_of
from engine.sampling import SamplingParams
from tests.checkpoints import copy_tokenizer, make_tiny_checkpoint, run_aborting

CONTEXT = 64
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_new_tokens=10, ignore_eos=True)
ENGINE_OPTIONS = dict(max_slots=4, max_seq_len=CONTEXT, decode_steps=4, prefill_buckets=(16, 32),
                      prefill_token_budget=32)  # prefill rows per call: 1 or 2 at bucket 16, 1 above


def random_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50257, length).tolist()


PROMPTS = [random_prompt(n, seed) for seed, n in enumerate((3, 9, 20, 40))]  # buckets 16, 16, 32, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), initializer_range=0.2)


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    eng = Engine.from_pretrained(checkpoint, **ENGINE_OPTIONS)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def hf_model(checkpoint) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()


def short_context_copy(source: Path, folder: Path, eos_token_id: int) -> Path:
    """The same weights with only CONTEXT positions (wpe cut) and `eos_token_id` as eos."""
    model = transformers.GPT2LMHeadModel.from_pretrained(source)
    changes = dict(n_positions=CONTEXT, eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    short = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict({**model.config.to_dict(), **changes}))
    state = {k: v[:CONTEXT] if k.endswith("wpe.weight") else v for k, v in model.state_dict().items()}
    short.load_state_dict(state)
    short.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(folder, source)
    return folder


@dataclasses.dataclass
class EosCase:
    engine: Engine  # n_positions 64 checkpoint, default max_seq_len, 2 slots, 3 decode steps, eos = greedy[3]
    prompt: list[int]
    greedy: list[int]  # the greedy continuation (ignore_eos) on the main engine


@pytest.fixture(scope="module")
def eos_case(engine, checkpoint, tmp_path_factory) -> EosCase:
    prompt = PROMPTS[2]
    greedy = engine.generate(prompt, GREEDY)[0].token_ids
    assert greedy[3] not in greedy[:3], "pick another prompt: the eos candidate repeats"
    folder = short_context_copy(checkpoint, tmp_path_factory.mktemp("tiny-gpt2-eos"), greedy[3])
    options = dict(max_slots=2, decode_steps=3, prefill_buckets=(32,), prefill_token_budget=32)
    return EosCase(Engine.from_pretrained(folder, **options), prompt, greedy)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, repetition_penalty: float) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def drain(eng: Engine, *requests) -> None:
    while not all(r.finished for r in requests):
        eng.step()


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_matches_hf_generate(engine, hf_model, repetition_penalty):
    """Greedy = argmax of the processed scores; on an exact tie the lowest token id wins (torch.argmax's
    rule, documented in engine/processors.py). The peaked checkpoint keeps ties out of this comparison.
    Our engine runs the four prompts together; HF runs each alone, unpadded."""
    params = dataclasses.replace(GREEDY, max_new_tokens=16, repetition_penalty=repetition_penalty)
    ours = engine.generate(PROMPTS, params)
    for prompt, completion in zip(PROMPTS, ours):
        assert completion.prompt_token_ids == prompt
        assert completion.finish_reason == "length"
        assert completion.token_ids == hf_greedy(hf_model, prompt, 16, repetition_penalty)


def test_seeded_output_ignores_batch_mates_order_and_arrival(engine, eos_case):
    prompt, others = PROMPTS[1], PROMPTS[:1] + PROMPTS[2:]
    alone = engine.generate(prompt, SEEDED)[0].token_ids
    mates = [GREEDY, dataclasses.replace(SEEDED, seed=99), SamplingParams(temperature=0.7, max_new_tokens=5)]
    truncating = [GREEDY, dataclasses.replace(mates[1], top_k=5), dataclasses.replace(mates[2], top_p=0.5)]
    first = engine.generate([prompt] + others, [SEEDED] + truncating)[0]
    last = engine.generate(others + [prompt], mates + [SEEDED])[-1]
    # Five requests for four slots: the seeded one (last) waits for a slot to free up.
    queued = engine.generate(others + [PROMPTS[0], prompt], mates + [GREEDY, SEEDED])[-1]
    assert first.token_ids == last.token_ids == queued.token_ids == alone
    (early,) = engine.requests.make(PROMPTS[3], GREEDY)
    engine.add_request(early)
    engine.step()
    assert engine.generate(prompt, SEEDED)[0].token_ids == alone  # arrives while `early` is decoding
    drain(engine, early)
    assert eos_case.engine.generate([PROMPTS[0], prompt], [GREEDY, SEEDED])[1].token_ids == alone


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, GREEDY)
    top1 = engine.generate(PROMPTS, dataclasses.replace(GREEDY, temperature=0.8, top_k=1, seed=5))
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


def test_n_samples_are_grouped_distinct_and_reproducible(engine):
    params = dataclasses.replace(SEEDED, n=3, seed=7)
    out = engine.generate(PROMPTS[:2], params)
    assert [(c.prompt_token_ids, c.index) for c in out] == [(p, i) for p in PROMPTS[:2] for i in range(3)]
    for group in (out[:3], out[3:]):
        assert len({tuple(c.token_ids) for c in group}) == 3
    assert [c.token_ids for c in engine.generate(PROMPTS[:2], params)] == [c.token_ids for c in out]
    assert engine.generate(PROMPTS[0], dataclasses.replace(params, n=1))[0].token_ids == out[0].token_ids


def boundary_stop(tokenizer, ids: list[int]) -> tuple[str, int, int]:
    """A stop string made of the 2 characters before and after a token boundary, occurring first there:
    (stop, index of the token that completes it, length of the text before it)."""
    full = tokenizer.decode(ids)
    for i in range(1, len(ids) - 1):
        before, after = tokenizer.decode(ids[:i]), tokenizer.decode(ids[:i + 1])
        clean = "\ufffd" not in after and full.startswith(after)
        if clean and len(before) >= 2 and len(after) >= len(before) + 2:
            stop = after[len(before) - 2:len(before) + 2]
            if full.find(stop) == len(before) - 2:
                return stop, i, len(before) - 2
    raise AssertionError(f"no clean token boundary in {full!r}")


def test_stop_string_across_token_boundary(engine):
    prompt = "The quick brown fox"
    greedy = engine.generate(prompt, GREEDY)[0]
    stop, last_token, cut = boundary_stop(engine.tokenizer, greedy.token_ids)
    params = dataclasses.replace(GREEDY, stop=(stop,))
    stopped = engine.generate(prompt, params)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == greedy.text[:cut]
    assert stopped.token_ids == greedy.token_ids[:last_token + 1]
    deltas = list(engine.stream(prompt, params))
    assert "".join(deltas) == stopped.text
    assert not any(stop in d for d in deltas)
    kept = dataclasses.replace(params, include_stop_str_in_output=True)
    with_stop = engine.generate(prompt, kept)[0]
    assert with_stop.text == greedy.text[:cut + len(stop)] and with_stop.token_ids == stopped.token_ids
    assert "".join(engine.stream(prompt, kept)) == with_stop.text


def test_stop_token_ids_finish_with_stop(engine):
    greedy = engine.generate(PROMPTS[2], GREEDY)[0].token_ids
    assert greedy[3] not in greedy[:3]
    out = engine.generate(PROMPTS[2], dataclasses.replace(GREEDY, stop_token_ids=(greedy[3],)))[0]
    assert (out.finish_reason, out.token_ids) == ("stop", greedy[:4])
    assert out.text == engine.tokenizer.decode(greedy[:3])  # the stop token's text is not returned


def test_eos_stops_unless_ignored(eos_case):
    eng, prompt, greedy = eos_case.engine, eos_case.prompt, eos_case.greedy
    assert eng.config.eos_token_id == greedy[3]
    stopped = eng.generate(prompt, dataclasses.replace(GREEDY, ignore_eos=False))[0]
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", greedy[:4])
    assert stopped.text == eng.tokenizer.decode(greedy[:3])
    continued = eng.generate(prompt, GREEDY)[0]
    assert (continued.finish_reason, continued.token_ids) == ("length", greedy)


def test_cached_decode_equals_full_recompute(engine):
    prompt = PROMPTS[3]  # 40 + 14 tokens: every recompute runs in the same bucket
    out = engine.generate(prompt, dataclasses.replace(GREEDY, max_new_tokens=14, logprobs=5))[0]
    assert len(out.logprobs) == len(out.token_ids) == 14
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        logits = engine.logits(prompt + out.token_ids[:i])[-1].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits)
        top = np.argsort(-logp, kind="stable")[:5]
        assert token == entry.token_id == int(np.argmax(logits)), f"step {i}"
        assert abs(entry.logprob - logp[token]) < 1e-4, f"step {i}"
        assert [t for t, _ in entry.top] == top.tolist(), f"step {i}"
        np.testing.assert_allclose([v for _, v in entry.top], logp[top], atol=1e-4)


def test_packed_prompts_equal_prompts_run_alone(engine, monkeypatch):
    """The 40- and 20-token prompts share one 64-token prefill row (attention and K/V stay per prompt,
    positions restart at 0): first tokens, continuations and logprobs equal each prompt run alone."""
    params = dataclasses.replace(GREEDY, max_new_tokens=6, logprobs=3, repetition_penalty=1.2)
    alone = [engine.generate(p, params)[0] for p in (PROMPTS[3], PROMPTS[2])]
    calls, real = [], engine.scheduler.schedule_prefills
    monkeypatch.setattr(engine.scheduler, "schedule_prefills", lambda: calls.append(real()) or calls[-1])
    packed = engine.generate([PROMPTS[3], PROMPTS[2]], params)
    assert [(b.bucket, b.size, list(b.places)) for b in calls[0]] == [(64, 1, [(0, 0), (0, 40)])]
    for a, b in zip(alone, packed):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            np.testing.assert_allclose([x.logprob] + [v for _, v in x.top], [y.logprob] + [v for _, v in y.top],
                                       atol=1e-5)


def test_greedy_ignores_batch_mates(engine):
    prompt = PROMPTS[1]
    alone = engine.generate(prompt, GREEDY)[0].token_ids
    mates = [SamplingParams(temperature=1.2, top_k=50, seed=1, max_new_tokens=6),
             SamplingParams(temperature=0.0, repetition_penalty=1.5, max_new_tokens=3),
             SamplingParams(temperature=0.9, top_p=0.8, presence_penalty=1.0, max_new_tokens=9, logprobs=2)]
    batch = engine.generate([PROMPTS[3], prompt, PROMPTS[0], PROMPTS[2]], [mates[0], GREEDY, mates[1], mates[2]])
    assert batch[1].token_ids == alone


def test_nothing_compiles_after_warmup(engine):
    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    traces = engine.runner.trace_count
    assert engine.runner.num_compiled == engine.num_programs  # warm-up compiled (or loaded) every program
    lengths = (1, 7, 16, 17, 31, 32, 33, 50, 63)  # every prefill bucket, edges included
    prompts = [random_prompt(n, 100 + n) for n in lengths]
    params = [SamplingParams(temperature=0.0, max_new_tokens=9),
              SamplingParams(temperature=0.7, top_k=40, seed=3, max_new_tokens=5, logprobs=3),
              SamplingParams(temperature=1.3, top_p=0.5, seed=4, max_new_tokens=11),
              SamplingParams(temperature=0.9, min_p=0.1, n=2, max_new_tokens=6),
              SamplingParams(temperature=0.0, repetition_penalty=1.4, logprobs=0, max_new_tokens=7),
              SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=1.5, max_new_tokens=8),
              SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.05, seed=2**63 + 1, max_new_tokens=4),
              SamplingParams(temperature=2.0, stop_token_ids=(1, 2), max_new_tokens=20, logprobs=20, min_tokens=10),
              SamplingParams(temperature=0.0, max_new_tokens=30, min_tokens=3)]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = engine.generate(prompts, params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(out) == 10
    assert (engine.runner.trace_count, len(compiles)) == (traces, 0)


def test_prompt_longer_than_context_raises_and_keeps_the_queue(engine):
    expected = engine.generate(PROMPTS[0], GREEDY)[0].token_ids
    (queued,) = engine.requests.make(PROMPTS[0], GREEDY)
    engine.add_request(queued)
    with pytest.raises(ValueError, match=r"the prompt has 64 tokens; at most 63 fit"):
        engine.generate([PROMPTS[1], random_prompt(CONTEXT, 9)], GREEDY)
    assert engine.scheduler.num_waiting == 1 and engine.scheduler.num_live == 0
    drain(engine, queued)
    assert completion_of(queued, engine.tokenizer).token_ids == expected
    assert not engine.scheduler.has_work()


@pytest.mark.parametrize("which", ["max_seq_len=64", "n_positions=64"])
def test_generation_ends_at_the_context_size(engine, eos_case, which):
    engine = engine if which == "max_seq_len=64" else eos_case.engine
    assert engine.max_seq_len == CONTEXT
    prompt = random_prompt(57, 11)
    out = engine.generate(prompt, dataclasses.replace(GREEDY, max_new_tokens=20))[0]
    assert out.finish_reason == "length"
    assert len(prompt) + len(out.token_ids) == CONTEXT
    assert out.token_ids[-1] == int(np.argmax(engine.logits(prompt + out.token_ids[:-1])[-1]))


@pytest.mark.parametrize("field, value", [("temperature", -0.5), ("top_p", 0.0), ("n", 0), ("logprobs", 21)])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}: expected .*got {value!r}"):
        SamplingParams(**{field: value})


def test_stream_concatenates_to_generate_text(engine):
    params = dataclasses.replace(SEEDED, max_new_tokens=16)
    text = engine.generate("Once upon a time", params)[0].text
    deltas = list(engine.stream("Once upon a time", params))
    assert len(deltas) > 1 and "".join(deltas) == text


def test_compaction_moves_a_live_request_without_changing_it(engine, monkeypatch):
    """Admitted together, the three requests allowed 40 new tokens take slots 0-2 (longest first) and the
    one allowed 12 slot 3; the three are aborted after the first step, so slot 3 moves to slot 0 and decode
    runs width 1. Its tokens equal a run alone."""
    prompt = PROMPTS[3][:20]  # 20 + 12 tokens: below the others' 3, 9, 20 + 40
    alone = engine.generate(prompt, GREEDY)[0].token_ids
    moves = []
    real_move = engine.runner.move
    monkeypatch.setattr(engine.runner, "move", lambda m: (moves.append(list(m)), real_move(m)))
    long = dataclasses.replace(GREEDY, max_new_tokens=40)
    reqs = run_aborting(engine, PROMPTS[:3] + [prompt], [long] * 3 + [GREEDY], aborted=(0, 1, 2))
    assert moves == [[(3, 0)]]
    assert reqs[3].output_token_ids == alone


def test_free_slots_decode_with_neutral_parameters(engine):
    """After sampled, penalised, logprobs requests finish, a greedy-only batch sees neutral parameters in
    every slot (the decode skip tests read every row of the width, live or not), so it takes the fast paths."""
    dirty = SamplingParams(temperature=0.9, top_k=5, repetition_penalty=1.3, presence_penalty=0.5, logprobs=2,
                           seed=1, max_new_tokens=3)
    engine.generate(PROMPTS[:3], dirty)
    alone = engine.generate(PROMPTS[0], GREEDY)[0].token_ids
    # A decode call over every slot, all free (reach 0): each row it runs gets neutral parameters.
    engine.runner.decode(engine.scheduler.config.decode_windows[0], engine.engine_config.max_slots, [0] * 4)
    params = engine.runner.state.params
    assert np.all(np.asarray(params.temperature) == 0) and np.all(np.asarray(params.top_k) == 0)
    assert np.all(np.asarray(params.repetition_penalty) == 1) and np.all(np.asarray(params.presence_penalty) == 0)
    assert not np.asarray(engine.runner.state.wants_logprobs).any()
    assert alone == engine.generate(PROMPTS[0], GREEDY)[0].token_ids
