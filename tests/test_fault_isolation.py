"""One request can fail; the engine cannot: a fault injected into one request's host-side work, or into one
device call, fails only the requests it touches (finish_reason "error", slot freed), while the others
finish with exactly their normal output and later requests run as before. Tiny random GPT-2."""
from __future__ import annotations

import asyncio

import pytest

from engine import steps
from engine.async_engine import AsyncEngine, RequestError
from engine.engine import Engine
from engine.sampling import SamplingParams

PROMPTS = ["Hello world", "The quick brown fox", "Once upon", "A B C"]
PARAMS = [SamplingParams(max_new_tokens=14, ignore_eos=True, seed=i, temperature=0.9 if i % 2 else 0.0)
          for i in range(len(PROMPTS))]
POISONED = 1  # index of the request whose detokenizer fails


@pytest.fixture(scope="module")
def engine(tiny_engine) -> Engine:
    return tiny_engine


@pytest.fixture(scope="module")
def normal(engine) -> list[tuple[str, list[int]]]:
    return [(c.text, c.token_ids) for c in engine.generate(PROMPTS, PARAMS)]


def poison(request, after: int = 3) -> None:
    """Make the request's detokenizer raise on its `after`-th token (mid-decode)."""
    push, seen = request.text_stream.push, []

    def failing_push(token_id: int) -> bool:
        seen.append(token_id)
        if len(seen) == after:
            raise UnicodeError("injected detokenizer fault")
        return push(token_id)

    request.text_stream.push = failing_push


def run_all(engine: Engine, requests) -> None:
    for r in requests:
        engine.add_request(r)
    while not all(r.finished for r in requests):
        engine.step()


def test_a_failing_request_fails_alone_and_frees_its_slot(engine, normal):
    reqs = [engine.requests.make(p, sp)[0] for p, sp in zip(PROMPTS, PARAMS)]
    poison(reqs[POISONED])
    run_all(engine, reqs)
    bad = reqs[POISONED]
    assert bad.finish_reason == "error" and "injected detokenizer fault" in bad.error and bad.slot is None
    assert [(r.text_stream.text, r.output_token_ids) for i, r in enumerate(reqs) if i != POISONED] == \
        [n for i, n in enumerate(normal) if i != POISONED]
    assert engine.scheduler.num_live == 0 and not engine.scheduler.has_work()
    assert [(c.text, c.token_ids) for c in engine.generate(PROMPTS, PARAMS)] == normal  # later requests: as before


def test_a_failing_device_call_fails_its_requests_and_the_engine_goes_on(engine, normal, monkeypatch):
    decode, calls = engine.runner.decode, []

    def decode_failing_once(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected device fault")
        return decode(*args, **kw)

    monkeypatch.setattr(engine.runner, "decode", decode_failing_once)
    done = engine.generate(PROMPTS, PARAMS)  # two slots: the failed call ran the first two requests
    assert [c.finish_reason for c in done] == ["error", "error", "length", "length"]
    assert all("injected device fault" in c.error for c in done[:2])
    assert [(c.text, c.token_ids) for c in done[2:]] == normal[2:]
    assert [(c.text, c.token_ids) for c in engine.generate(PROMPTS, PARAMS)] == normal


def test_only_repeated_failures_stop_the_engine(engine, monkeypatch):
    def dead(*args, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "prefill", dead)
    failed = [engine.generate("Hi", SamplingParams(max_new_tokens=2)) for _ in range(steps.MAX_FAILED_CALLS - 1)]
    assert all(c.finish_reason == "error" for (c,) in failed)
    with pytest.raises(steps.EngineFailedError, match="device lost"):
        engine.generate("Hi", SamplingParams(max_new_tokens=2))
    assert not engine.scheduler.has_work()  # the last call's request failed too: nothing is left half-run
    monkeypatch.undo()
    assert engine.generate("Hi", SamplingParams(max_new_tokens=2))[0].finish_reason == "length"


def test_async_engine_fails_one_submission_and_serves_the_rest(engine, normal, monkeypatch):
    make = engine.requests.make

    def make_poisoning(prompt, params, request_id=None):
        requests = make(prompt, params, request_id)
        if params.seed == PARAMS[POISONED].seed:
            poison(requests[0])
        return requests

    monkeypatch.setattr(engine.requests, "make", make_poisoning)

    async def body(ae: AsyncEngine):
        async def one(i: int):
            try:
                (c,) = await ae.generate(PROMPTS[i], PARAMS[i])
                return c.text, c.token_ids
            except RequestError as e:
                return e

        results = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        later = await ae.generate(PROMPTS[0], PARAMS[0])
        return results, later, ae.running, ae.stats()

    async def main():
        async with AsyncEngine(engine) as ae:
            return await body(ae)

    results, later, running, stats = asyncio.run(main())
    assert isinstance(results[POISONED], RequestError) and "injected detokenizer fault" in str(results[POISONED])
    assert [r for i, r in enumerate(results) if i != POISONED] == [n for i, n in enumerate(normal) if i != POISONED]
    assert (later[0].text, later[0].token_ids) == normal[0]
    assert running and stats.running and stats.live_slots == 0


def test_sampling_rows_are_made_at_submission_never_in_a_step(engine, monkeypatch):
    reqs = [engine.requests.make(p, sp)[0] for p, sp in zip(PROMPTS, PARAMS)]

    def no_conversion_now(_params):
        raise AssertionError("slot_params ran inside a step")

    monkeypatch.setattr("engine.requests.slot_params", no_conversion_now)
    run_all(engine, reqs)
    assert all(r.finish_reason == "length" for r in reqs)
