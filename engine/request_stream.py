"""What an `AsyncEngine` hands its callers: `Delta`s, the `RequestStream` that yields them, and errors.

The engine thread puts lists of deltas (or one exception) into a stream's `Sink`, an asyncio.Queue read
on the event loop that submitted the request; it never touches anything else here.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

from engine.requests import Completion, TokenLogprob
from engine.scheduler import Request
from engine.serving_stats import RequestTiming


class EngineClosedError(RuntimeError):
    """The engine was shut down (or its loop failed): no new requests, pending ones are ended with this."""


class QueueFullError(RuntimeError):
    """Too many requests already wait for a slot; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class Delta:
    """New output of one choice since its previous delta; the last one has `finish_reason` set."""

    index: int  # choice index: prompt_index * n + sample_index
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # one entry per new token when the request asked for logprobs
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    completion: Completion | None = None  # the whole result, on the last delta only
    timing: RequestTiming | None = None  # on the last delta only
    # On a choice's first delta, when its request asked for prompt_logprobs (set by then: prefill scores them)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Sink:
    """One stream's asyncio.Queue on the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: list[Delta] | BaseException) -> bool:
        """Called from the engine thread; False when the loop is closed (nobody can read it any more)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:
            return False


class RequestStream:
    """Async iterator over the `Delta`s of one submission (all its prompts and samples, interleaved).

    Iterate it to the end, or call `abort()` (or use `async with`) when stopping early: a stream merely
    dropped keeps generating until its requests finish.
    """

    def __init__(self, requests: Sequence[Request], sink: Sink, abort: Callable[[tuple[str, ...]], None]):
        self._sink, self._abort = sink, abort
        self.request_ids = tuple(r.request_id for r in requests)
        self.prompt_token_ids = [list(r.prompt_token_ids) for r in requests]  # per choice
        self._open = len(requests)  # choices without their last delta yet
        self._buffer: list[Delta] = []

    @property
    def done(self) -> bool:
        return self._open == 0

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        while not self._buffer:
            if self._open == 0:
                raise StopAsyncIteration
            item = await self._sink.queue.get()
            if isinstance(item, BaseException):
                self._open = 0
                raise item
            self._buffer = list(item)
        delta = self._buffer.pop(0)
        self._open -= delta.finish_reason is not None
        return delta

    def abort(self) -> None:
        """Stop generating for every unfinished choice; their slots are freed before the next step."""
        if self._open:
            self._abort(self.request_ids)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()
