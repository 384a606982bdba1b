"""Serving statistics of an `AsyncEngine`: counters, a recent-throughput window and latency samples.

Written by the engine thread, read by any thread (its own lock). Units are seconds and tokens.
TTFT runs from submission to the step that produced the first token; TPOT is the mean time between a
request's later tokens ((finish - first token) / (tokens - 1)), absent for one-token outputs.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    ttft_s: float | None  # None when the request ended before its first token
    tpot_s: float | None
    e2e_s: float
    output_tokens: int


@dataclasses.dataclass(frozen=True)
class EngineStats:
    waiting: int  # requests submitted and not yet in a slot (the queue depth)
    live_slots: int
    max_slots: int
    requests_finished: int  # ended by stop or length (aborts not counted)
    tokens_generated: int
    tokens_per_second: float  # over the recent window
    ttft_s: tuple[float, ...]  # recent samples, oldest first
    tpot_s: tuple[float, ...]
    running: bool
    prefix_query_tokens: int = 0  # prompt tokens admitted with prefix caching on
    prefix_hit_tokens: int = 0  # of those, reused (forked, or copied from cached blocks)
    prefix_cached_blocks: int = 0  # full cache blocks held for reuse (live and free slots)


class StatsRecorder:
    def __init__(self, max_slots: int, window_s: float = 10.0, samples_kept: int = 1024):
        if window_s <= 0:
            raise ValueError(f"stats window: expected seconds > 0, got {window_s!r}")
        self.max_slots, self.window_s = max_slots, window_s
        self.scheduler_waiting = 0  # published by the engine thread after each step
        self.live_slots = 0
        self.prefix = (0, 0, 0)  # Scheduler.prefix_stats, published by the engine thread
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._tokens = 0
        self._finished = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step inside the window
        self._ttft: deque[float] = deque(maxlen=samples_kept)
        self._tpot: deque[float] = deque(maxlen=samples_kept)

    def record_tokens(self, count: int, now: float) -> None:
        with self._lock:
            self._tokens += count
            if count:
                self._recent.append((now, count))
            self._trim(now)

    def record_finish(self, submitted: float, first_token: float | None, now: float, tokens: int,
                      aborted: bool = False) -> RequestTiming:
        ttft = None if first_token is None else first_token - submitted
        tpot = (now - first_token) / (tokens - 1) if first_token is not None and tokens > 1 else None
        if not aborted:
            with self._lock:
                self._finished += 1
                if ttft is not None:
                    self._ttft.append(ttft)
                if tpot is not None:
                    self._tpot.append(tpot)
        return RequestTiming(ttft, tpot, now - submitted, tokens)

    def snapshot(self, waiting: int, running: bool) -> EngineStats:
        now = time.perf_counter()
        with self._lock:
            self._trim(now)
            span = min(self.window_s, max(now - self._started, 1e-3))
            rate = sum(n for _, n in self._recent) / span
            return EngineStats(waiting + self.scheduler_waiting, self.live_slots, self.max_slots, self._finished,
                               self._tokens, rate, tuple(self._ttft), tuple(self._tpot), running, *self.prefix)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
