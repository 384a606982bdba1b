"""AsyncEngine behaviour on a tiny random GPT-2: results equal the sync Engine's, streams, cancellation
frees slots, admission limit, shutdown, requests from several threads and event loops."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.async_engine import AsyncEngine, EngineClosedError, QueueFullError
from engine.engine import Engine
from engine.sampling import SamplingParams

LONG = SamplingParams(max_new_tokens=120, ignore_eos=True, seed=5)  # ~30 decode calls: outlives any check
PROMPTS = ["Hello world", "The quick brown fox", [464, 3290, 318], "Once upon"]


@pytest.fixture(scope="module")
def engine(tiny_engine) -> Engine:
    return tiny_engine


def run(engine: Engine, body, **options):
    """Run `body(async_engine)` on a fresh event loop with a fresh AsyncEngine, shut down afterwards."""
    async def main():
        async with AsyncEngine(engine, **options) as ae:
            return await body(ae)
    return asyncio.run(main())


async def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_generate_equals_sync_engine(engine):
    params = [SamplingParams(max_new_tokens=9, seed=i, n=2, temperature=0.8) for i in range(len(PROMPTS))]
    want = engine.generate(PROMPTS, params)
    got = run(engine, lambda ae: ae.generate(PROMPTS, params))
    assert [(c.text, c.token_ids, c.index, c.finish_reason) for c in got] == \
           [(c.text, c.token_ids, c.index, c.finish_reason) for c in want]


def test_stream_deltas_rebuild_each_choice(engine):
    params = SamplingParams(max_new_tokens=12, seed=3, n=2, stop=["e"], logprobs=2)

    async def body(ae):
        return [d async for d in ae.stream(["Hi", "Some text"], params)]

    deltas = run(engine, body)
    assert sorted({d.index for d in deltas}) == [0, 1, 2, 3]
    for index in range(4):
        mine = [d for d in deltas if d.index == index]
        last = mine[-1]
        assert [d.finish_reason is not None for d in mine] == [False] * (len(mine) - 1) + [True]
        assert last.finish_reason in ("stop", "length") and last.completion is not None
        assert "".join(d.text for d in mine) == last.completion.text and "e" not in last.completion.text
        assert sum((d.token_ids for d in mine), []) == last.completion.token_ids
        assert len(sum((d.logprobs for d in mine), [])) == len(last.completion.token_ids)
        assert last.timing.output_tokens == len(last.completion.token_ids) and last.timing.ttft_s > 0


def test_concurrent_coroutines_and_threads_get_their_own_results(engine):
    params = [SamplingParams(max_new_tokens=10, seed=10 + i) for i in range(len(PROMPTS))]
    want = [engine.generate(p, sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    results: dict[str, list] = {}

    async def body(ae):
        def other_thread(k: int) -> None:  # its own event loop, submitting to the same engine
            results[f"thread{k}"] = asyncio.run(ae.generate(PROMPTS[k], params[k]))[0].token_ids

        threads = [threading.Thread(target=other_thread, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        done = await asyncio.gather(*(ae.generate(p, sp) for p, sp in zip(PROMPTS, params)))
        await asyncio.to_thread(lambda: [t.join(60) for t in threads])
        return [c[0].token_ids for c in done], ae.stats()

    got, stats = run(engine, body)
    assert got == want  # 2 slots, 6 requests: batch mates and queueing change no seeded result
    assert results == {"thread0": want[0], "thread1": want[1]}
    assert stats.live_slots == 0 and stats.waiting == 0
    assert stats.requests_finished == 6 and stats.tokens_generated == 60 and len(stats.ttft_s) == 6


@pytest.mark.parametrize("how", ["cancel_task", "close_generator"])
def test_cancelled_stream_frees_its_slot(engine, how):
    async def body(ae):
        first = asyncio.Event()

        async def consume():
            async for _ in ae.stream("Hi", LONG):
                first.set()
                await asyncio.sleep(0)

        if how == "cancel_task":
            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
        else:
            gen = ae.stream("Hi", LONG)
            await gen.__anext__()
            await gen.aclose()
        # Unaborted, the slot would stay busy until all 120 tokens were generated.
        await wait_for(lambda: ae.stats().live_slots == 0)
        stats = ae.stats()
        after = await ae.generate("Hello", SamplingParams(max_new_tokens=4, seed=1))
        return stats, after

    stats, after = run(engine, body)
    assert stats.tokens_generated < LONG.max_new_tokens and stats.requests_finished == 0
    assert len(after[0].token_ids) == 4


def test_queue_full_when_waiting_exceeds_limit(engine):
    async def body(ae):
        busy = [ae.submit(p, LONG) for p in PROMPTS[:2]]  # fill both slots
        for handle in busy:
            await handle.__anext__()
        queued = ae.submit("waits for a slot", LONG)  # nothing waits yet: accepted
        with pytest.raises(QueueFullError, match="max_waiting=1"):
            ae.submit("one too many", LONG)
        depth = ae.stats().waiting
        for handle in busy + [queued]:
            handle.abort()
        await wait_for(lambda: ae.stats().live_slots == 0 and ae.stats().waiting == 0)
        return depth, await ae.generate("Hello", SamplingParams(max_new_tokens=2))

    depth, after = run(engine, body, max_waiting=1)
    assert depth == 1 and len(after[0].token_ids) == 2


def test_bad_requests_raise_in_the_caller(engine):
    async def body(ae):
        with pytest.raises(ValueError, match="prompt_token_ids: token id 60000 is out of range"):
            ae.submit([1, 60000], SamplingParams())
        with pytest.raises(ValueError, match="prompt: the prompt is empty"):
            ae.submit("", SamplingParams())
        return ae.stats()

    assert run(engine, body).waiting == 0


def test_shutdown_fails_pending_and_refuses_new_requests(engine):
    async def body(ae):
        handle = ae.submit("Hi", LONG)
        await handle.__anext__()
        waiting = [ae.submit(p, LONG) for p in PROMPTS]  # 2 get the free slot(s), the rest wait
        await ae.shutdown()
        errors = []
        for h in [handle] + waiting:
            with pytest.raises(EngineClosedError, match="shut down"):
                async for _ in h:
                    pass
            errors.append(h.done)
        with pytest.raises(EngineClosedError, match="cannot accept requests"):
            ae.submit("late", SamplingParams())
        return errors, ae.running, ae.stats()

    errors, running, stats = run(engine, body)
    assert errors == [True] * 5 and not running and not stats.running
    assert stats.live_slots == 0 and stats.waiting == 0
    assert not engine.scheduler.has_work()


def test_a_failing_engine_loop_ends_pending_requests(engine, monkeypatch):
    def broken_step(on_prefill=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken_step)

    async def body(ae):
        with pytest.raises(EngineClosedError, match="device lost"):
            await ae.generate("Hi", SamplingParams(max_new_tokens=4))
        with pytest.raises(EngineClosedError, match="engine loop failed"):
            ae.submit("Hi", SamplingParams())
        return ae.running

    assert run(engine, body) is False
    assert not engine.scheduler.has_work()
