"""`AsyncEngine`: the `Engine` behind an asyncio API, for servers that embed it.

One background thread (the engine thread) owns the `Engine`: after construction no other thread calls
into it, its scheduler or JAX (except the program loaders of `engine.programs.Prefetch`, which only load
stored executables and hand them over under a lock). Callers on any thread or event loop talk to it through a thread-safe
command queue (add / abort / shutdown). The engine thread's loop: drain the queued commands, run
`engine.step()` while the scheduler has work, otherwise block on the queue. Each step's text deltas go
back to the submitting event loop with `loop.call_soon_threadsafe`, into that request's asyncio.Queue.

Invariants:
- Prompts are validated and tokenized in the caller (a bad one raises there, before anything is queued);
  `submit_async` does that on a worker thread, so an event loop never waits for a long prompt's tokens.
- Every submitted request ends in exactly one of: a last `Delta` with `finish_reason` set, or an error
  item delivered to its stream: `RequestError` when it failed alone (its submission's other requests are
  aborted, every other submission goes on), `EngineClosedError` when the engine shut down or cannot run.
- A stream closed or cancelled before its end aborts its requests (`Scheduler.abort`): their slots are
  free before the next decode call.
- `stats().waiting` counts requests submitted but not yet in a slot. With `max_waiting` set, a submission
  raises `QueueFullError` when the requests left waiting once the free slots are filled, plus its own,
  would exceed the limit; one is always accepted while none would be left waiting (so a large `n` fits).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from engine.request_stream import Delta, EngineClosedError, QueueFullError, RequestStream, Sink
from engine.requests import Completion, RequestError, as_prompt_list, completion_of
from engine.sampling import SamplingParams, broadcast_params
from engine.scheduler import Request, Update
from engine.serving_stats import EngineStats, RequestTiming, StatsRecorder

if TYPE_CHECKING:  # the engine (JAX) is imported by whoever builds one: a server's flag checks stay fast
    from engine.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "Delta", "EngineClosedError", "EngineStats", "QueueFullError", "RequestError",
           "RequestStream", "RequestTiming"]


@dataclasses.dataclass(eq=False)
class _Choice:
    """Engine-thread bookkeeping of one request (one choice of one stream)."""

    request: Request
    sink: Sink
    index: int
    submitted: float  # time.perf_counter() at submission
    first_token: float | None = None
    delivered: bool = False  # a delta has been made (the first one carries the prompt logprobs)


@dataclasses.dataclass(frozen=True)
class _Add:
    choices: tuple[_Choice, ...]


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_ids: tuple[str, ...]


class _Shutdown:
    pass


class AsyncEngine:
    """Runs `engine` on a background thread; see the module docstring. Use it as an async context manager
    or call `shutdown()`; do not call the wrapped Engine yourself while this runs."""

    def __init__(self, engine: Engine, *, max_waiting: int | None = None, stats_window_s: float = 10.0):
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise ValueError(f"max_waiting: expected None or an int >= 0, got {max_waiting!r}")
        self.engine, self.max_waiting = engine, max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed, _queued and the enqueue order of commands
        self._make_lock = threading.Lock()  # RequestFactory (id counter, seed generator) is not thread-safe
        self._closed: str | None = None  # why the engine no longer accepts requests
        self._queued = 0  # requests submitted but not yet handed to the scheduler
        self._stats = StatsRecorder(engine.engine_config.max_slots, stats_window_s)
        self._live: dict[str, _Choice] = {}  # engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- caller side (any thread; submit needs a running event loop) --------------------------------

    def submit(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> RequestStream:
        """Queue the prompts' requests now; ValueError for a bad prompt or parameter, QueueFullError when
        `max_waiting` would be exceeded, EngineClosedError after shutdown."""
        return self._enqueue(self._make(prompts, params), asyncio.get_running_loop())

    async def submit_async(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                           params: SamplingParams | Sequence[SamplingParams] | None = None) -> RequestStream:
        """`submit`, with validation and tokenisation on a worker thread (the event loop keeps serving)."""
        loop = asyncio.get_running_loop()
        return self._enqueue(await asyncio.to_thread(self._make, prompts, params), loop)

    def _make(self, prompts, params) -> list[list[Request]]:
        """Every prompt's requests; tokenisation runs outside the lock (the tokenizer is thread-safe)."""
        prompts = as_prompt_list(prompts)
        per_prompt = broadcast_params(params, len(prompts))
        ids = [self.engine.requests.prompt_ids(p) for p in prompts]
        base = f"req{next(self._ids)}"
        with self._make_lock:
            return [self.engine.requests.make(p, sp, request_id=f"{base}.{i}")
                    for i, (p, sp) in enumerate(zip(ids, per_prompt))]

    def _enqueue(self, groups: list[list[Request]], loop: asyncio.AbstractEventLoop) -> RequestStream:
        sink, now = Sink(loop), time.perf_counter()
        choices = tuple(_Choice(r, sink, i * len(g) + j, now) for i, g in enumerate(groups) for j, r in enumerate(g))
        with self._lock:
            self._check_admission(len(choices))
            self._queued += len(choices)
            self._commands.put(_Add(choices))
        return RequestStream([c.request for c in choices], sink, self._send_abort)

    async def stream(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                     params: SamplingParams | Sequence[SamplingParams] | None = None) -> AsyncIterator[Delta]:
        """Yield deltas as tokens arrive; closing or cancelling the consumer aborts the requests."""
        handle = self.submit(prompts, params)
        try:
            async for delta in handle:
                yield delta
        finally:
            handle.abort()

    async def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                       params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """One Completion per sample, grouped by prompt in input order (like `Engine.generate`)."""
        done: dict[int, Completion] = {}
        async with self.submit(prompts, params) as handle:
            async for delta in handle:
                if delta.completion is not None:
                    done[delta.index] = delta.completion
        return [done[i] for i in sorted(done)]

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats.snapshot(waiting=self._queued, running=self._closed is None)

    @property
    def running(self) -> bool:
        return self._closed is None and self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, end pending ones with EngineClosedError, and join the engine thread."""
        with self._lock:
            if self._closed is None:
                self._closed = "the engine was shut down"
                self._commands.put(_Shutdown())
        self._thread.join(timeout)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    def _check_admission(self, count: int) -> None:
        if self._closed is not None:
            raise EngineClosedError(f"cannot accept requests: {self._closed}")
        free = self._stats.max_slots - self._stats.live_slots
        waiting = max(0, self._queued + self._stats.scheduler_waiting - free)  # once the free slots are taken
        if self.max_waiting is not None and waiting > 0 and waiting + count > self.max_waiting:
            raise QueueFullError(f"{waiting} requests already wait for a slot and this adds {count}; the limit "
                                 f"is max_waiting={self.max_waiting}: retry later")

    def _send_abort(self, request_ids: tuple[str, ...]) -> None:
        self._commands.put(_Abort(request_ids))

    # -- engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._serve_once():
                pass
        except BaseException as e:  # the engine is unusable now: fail everything, refuse new work
            log.exception("engine loop failed")
            with self._lock:
                self._closed = f"the engine loop failed: {e!r}"
            self._fail_all(EngineClosedError(self._closed))

    def _serve_once(self) -> bool:
        scheduler = self.engine.scheduler
        for command in self._take_commands(block=not scheduler.has_work()):
            if isinstance(command, _Shutdown):
                self._fail_all(EngineClosedError(self._closed or "the engine was shut down"))
                return False
            self._apply(command)
        if scheduler.has_work():
            self._deliver(self.engine.step(on_prefill=self._deliver))
        self._publish()
        return True

    def _take_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            for rid in command.request_ids:
                if rid in self._live:
                    self.engine.scheduler.abort(rid)
                    self._deliver([Update(self._live[rid].request, [], True)])
            return
        with self._lock:
            self._queued -= len(command.choices)
            try:
                for choice in command.choices:
                    self.engine.add_request(choice.request)
                    self._live[choice.request.request_id] = choice
            except ValueError as e:  # e.g. a request id already live: refuse the whole submission
                for choice in command.choices:
                    if self._live.pop(choice.request.request_id, None) is not None:
                        self.engine.scheduler.abort(choice.request.request_id)
                command.choices[0].sink.put(e)
            self._stats.scheduler_waiting = self.engine.scheduler.num_waiting

    def _deliver(self, updates: list[Update]) -> None:
        """Turn updates into deltas and send each stream its batch with one call_soon_threadsafe; a request
        that failed ends its stream with a RequestError instead."""
        now, batches, failed = time.perf_counter(), {}, {}
        for update in updates:
            choice = self._live.get(update.request.request_id)
            if choice is None or choice.sink in failed:
                continue
            try:
                batches.setdefault(choice.sink, []).append(self._delta(choice, update, now))
            except Exception as e:  # this request failed (in the step or here): it alone ends
                failed[choice.sink] = self._fail_choice(choice, e, now)
        self._stats.record_tokens(sum(len(u.new_token_ids) for u in updates), now)
        self._publish()  # before the callers see these deltas: stats never lag what they have seen
        for sink, error in failed.items():
            batches.pop(sink, None)
            sink.put(error)
        for sink, deltas in batches.items():
            if not sink.put(deltas):  # its event loop is gone: nobody will read the rest
                for rid in [r for r, c in self._live.items() if c.sink is sink]:
                    self.engine.scheduler.abort(rid)
                    del self._live[rid]

    def _delta(self, choice: _Choice, update: Update, now: float) -> Delta:
        req = choice.request
        if req.finish_reason == "error":
            raise RequestError(req.error)
        if update.new_token_ids and choice.first_token is None:
            choice.first_token = now
        text = ""
        if req.text_stream is not None:
            text = req.text_stream.pop_delta() + (req.text_stream.finish() if update.finished else "")
        logprobs = list(update.new_extras) if req.params.logprobs is not None else None
        prompt_logprobs = None if choice.delivered else req.prompt_logprobs
        choice.delivered = True
        if not update.finished:
            return Delta(choice.index, text, list(update.new_token_ids), logprobs, prompt_logprobs=prompt_logprobs)
        completion = completion_of(req, self.engine.tokenizer)
        del self._live[req.request_id]
        timing = self._stats.record_finish(choice.submitted, choice.first_token, now, len(req.output_token_ids),
                                           aborted=req.finish_reason == "abort")
        return Delta(choice.index, text, list(update.new_token_ids), logprobs, req.finish_reason, completion, timing,
                     prompt_logprobs)

    def _fail_choice(self, choice: _Choice, error: Exception, now: float) -> RequestError:
        """End `choice` and the rest of its submission (their slots free at once); the error for its stream."""
        log.error("request %s failed: %r", choice.request.request_id, error)
        for rid in [r for r, c in self._live.items() if c.sink is choice.sink]:
            self.engine.scheduler.abort(rid)  # False for the failed one: already finished
            mate = self._live.pop(rid)
            self._stats.record_finish(mate.submitted, mate.first_token, now, len(mate.request.output_token_ids),
                                      aborted=True)
        message = str(error) if isinstance(error, RequestError) else f"{type(error).__name__}: {error}"
        return RequestError(f"request {choice.request.request_id} failed: {message}")

    def _publish(self) -> None:
        with self._lock:
            self._stats.scheduler_waiting = self.engine.scheduler.num_waiting
            self._stats.live_slots = self.engine.scheduler.num_live
            self._stats.prefix = self.engine.scheduler.prefix_stats

    def _fail_all(self, error: EngineClosedError) -> None:
        """End every live request and every still-queued submission with `error`."""
        pending = list(self._live.values())
        for command in self._take_commands(block=False):
            if isinstance(command, _Add):
                pending += command.choices
        for choice in pending:
            if choice.request.request_id in self._live:
                self.engine.scheduler.abort(choice.request.request_id)
        self._live.clear()
        for sink in {c.sink for c in pending}:
            sink.put(error)
        with self._lock:
            self._queued = 0
        self._publish()
