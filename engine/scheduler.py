"""Request queue, slot table and finish detection: plain Python, no JAX, no NumPy, no model.

The scheduler owns which request sits in which of the `max_slots` cache slots, which prefill programs
(bucket, row count) run next, which attention window a decode call uses, and when a request finishes.
The runner owns the device; a `PrefillBatch` / `ExtendBatch` / `DecodeBatch` dataclass is all that passes
between them. Config in `engine.scheduler_config`, the dataclasses in `engine.scheduler_types`.

Invariants:
- A request is in exactly one place: the FIFO waiting queue, one slot, or finished (then `slot` is None).
- Admission is FIFO; requests admitted in one round take the lowest free slots (with `prefill_shards`,
  round-robin over the shards), longest first. A slot is
  free again the moment its request finishes or is aborted, so the next `schedule_prefills` can refill
  it (continuous batching). With prefix caching (`engine.prefix_plan`), a cache hit may take the free slot
  holding its blocks instead, and a prompt sharing a block with one admitted in the same round goes back
  to the head of the queue for one round (it then copies that block instead of computing it).
- A live, prefilled slot holds `prompt_len + len(output_token_ids) - 1` cache positions: the newest
  sampled token is pending, fed by the next decode call, which advances every decoded slot `k` positions.
- A request with `max_new_tokens == 0` (scoring only) finishes ("length") at its prefill with no token.
- Every accepted token is appended to `output_token_ids` (its extra to `output_extras` when extras are
  given); tokens after a finish within one call are discarded. Only the length ends a request before its
  `min_tokens`-th token (eos, stop ids and stop strings are held back until then).
- Tokens reported for a slot whose request is no longer there (aborted in flight) are ignored.
- One request's failure is its own: an exception while accepting its tokens (detokenising, stop strings)
  finishes it alone with finish_reason "error" (`Request.error` says why) and frees its slot; `fail_calls`
  does the same for every request of a prefill or decode call that failed as a whole.
- At most one decode call is in flight: `schedule_decode` -> `on_decode_tokens` -> `schedule_decode`.
"""
from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence

from engine.prefill_packing import PrefillBatch, admission_order, pack_prefills
from engine.prefix_cache import BlockIndex
from engine.prefix_plan import ExtendBatch, plan_round
from engine.scheduler_config import SchedulerConfig
from engine.scheduler_types import DecodeBatch, Request, Update

__all__ = ["DecodeBatch", "ExtendBatch", "PrefillBatch", "Request", "Scheduler", "SchedulerConfig", "Update"]


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: deque[Request] = deque()
        self._slots: list[Request | None] = [None] * config.max_slots
        self._known: dict[str, Request] = {}  # request_id -> waiting or live request
        self._arrivals = 0
        self._in_flight: tuple[tuple[int, Request], ...] | None = None  # the pending decode call
        self._prefix = BlockIndex(config.block, config.prefix_cache_max_blocks) if config.prefix_caching else None

    # -- queue -----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; ValueError if its prompt cannot be served or its id is already live."""
        n, largest = request.prompt_len, self.config.prefill_buckets[-1]
        if n == 0:
            raise ValueError(f"request {request.request_id!r}: prompt is empty; pass at least one token")
        if n > largest or n >= self.config.max_seq_len:
            raise ValueError(f"request {request.request_id!r}: prompt has {n} tokens; the limit is "
                             f"{min(largest, self.config.max_seq_len - 1)} (largest prefill bucket {largest}, "
                             f"max_seq_len {self.config.max_seq_len} leaves room for one new token)")
        if request.request_id in self._known:
            raise ValueError(f"request {request.request_id!r}: a request with this id is already queued or running")
        if request.finished or request.output_token_ids or request.slot is not None:
            raise ValueError(f"request {request.request_id!r}: already started (finish_reason="
                             f"{request.finish_reason!r}, {len(request.output_token_ids)} output tokens); "
                             f"pass a fresh Request")
        request.arrival = self._arrivals
        self._arrivals += 1
        self._known[request.request_id] = request
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or live request (finish_reason "abort"); False if the id is unknown or finished."""
        request = self._known.get(request_id)
        if request is None:
            return False
        if request.slot is None:
            self._waiting.remove(request)
        self._finish(request, "abort")
        return True

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_live > 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_live(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def live_slots(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self._slots) if r is not None)

    def request_at(self, slot: int) -> Request | None:
        """The request occupying `slot`, or None when it is free."""
        return self._slots[slot]

    # -- prefill ---------------------------------------------------------------------------------

    def schedule_prefills(self) -> list[PrefillBatch | ExtendBatch]:
        """Admit waiting requests FIFO into free slots, then pack them into prefill calls.

        Requests admitted together take the free slots longest-first (prompt + max_new_tokens, ties in
        arrival order), so slots of similar length sit together: the KV cache is read per group of
        neighbouring slots, each group only as far as its longest slot, and short requests finishing
        first leave the live ones in low slots (no compaction moves). With prefix caching the round is
        planned by `engine.prefix_plan` (its extend call, if any, comes first: its copies read slots that
        the prefill calls may overwrite)."""
        free = admission_order([i for i, r in enumerate(self._slots) if r is None], self.config.max_slots,
                               self.config.prefill_shards)
        admitted = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
        if self._prefix is not None:
            return self._schedule_with_reuse(admitted, free)
        admitted.sort(key=lambda r: -min(r.prompt_len + r.params.max_new_tokens, self.config.max_seq_len))
        for slot, request in zip(free, admitted):
            request.slot = slot
            self._slots[slot] = request
        return pack_prefills([(r.slot, r) for r in admitted], self.config)

    def _schedule_with_reuse(self, admitted: list[Request], free: list[int]) -> list[PrefillBatch | ExtendBatch]:
        plan = plan_round(self._prefix, admitted, free, self.config)
        self._waiting.extendleft(reversed(plan.deferred))
        for slot, request in plan.assigned:
            request.slot = slot
            self._slots[slot] = request
        batches = pack_prefills(plan.full, self.config, plan.followers)
        return ([plan.extend] if plan.extend is not None else []) + batches

    @property
    def prefix_stats(self) -> tuple[int, int, int]:
        """(prompt tokens admitted, of those reused, cached blocks) with prefix caching; zeros without."""
        p = self._prefix
        return (0, 0, 0) if p is None else (p.query_tokens, p.hit_tokens, p.cached_blocks)

    def bucket_for(self, prompt_len: int) -> int:
        """The smallest prefill bucket >= prompt_len (add() guarantees one exists)."""
        return self.config.prefill_buckets[bisect.bisect_left(self.config.prefill_buckets, prompt_len)]

    def on_prefill_tokens(self, batch: PrefillBatch | ExtendBatch, tokens: Sequence[int],
                          extras: Sequence | None = None) -> list[Update]:
        """Accept the first sampled token of each prompt; tokens (and extras) are indexed by prompt: one per
        entry of `batch.rows`, or the program's whole output (capacity), read at `batch.prompt_indices()`.
        The call succeeded: with prefix caching, each slot now holds its prompt's full blocks."""
        if len(tokens) not in (len(batch.rows), batch.capacity):
            raise ValueError(f"on_prefill_tokens: got {len(tokens)} tokens for a batch of {len(batch.rows)} "
                             f"prompts (capacity {batch.capacity}); pass one token per prompt")
        at = batch.prompt_indices() if len(tokens) == batch.capacity else range(len(batch.rows))
        updates = []
        for row, (slot, request) in zip(at, batch.rows):
            if self._slots[slot] is not request or request.output_token_ids:
                continue  # aborted in flight (or already reported)
            if self._prefix is not None:
                self._prefix.hold(slot, request.prompt_token_ids)
            if request.params.max_new_tokens == 0:  # scoring only: the sampled token is dropped
                self._finish(request, "length")
                updates.append(Update(request, [], True))
                continue
            extra = [extras[row]] if extras is not None else []
            updates.append(self._accept_or_fail(request, [int(tokens[row])], extra))
        return updates

    # -- decode ----------------------------------------------------------------------------------

    def compact(self) -> list[tuple[int, int]]:
        """Move live requests down into free low slots when that lets decode run a narrower width.

        Only with nothing waiting (admission refills low slots anyway) and no decode in flight. Returns the
        (src, dst) slot moves, already applied here; the runner must move the device rows the same way.
        """
        live = [i for i, r in enumerate(self._slots) if r is not None]
        if not live or self._waiting or self._in_flight is not None:
            return []
        counts = self.config.decode_slot_counts
        target = counts[bisect.bisect_left(counts, len(live))]
        if live[-1] < target:
            return []
        free = [i for i in range(target) if self._slots[i] is None]
        moves = list(zip([s for s in live if s >= target], free))
        for src, dst in moves:
            request, self._slots[src] = self._slots[src], None
            self._slots[dst], request.slot = request, dst
            if self._prefix is not None:  # dst takes src's blocks; src keeps its copy, free
                self._prefix.claim(dst)
                self._prefix.copy(src, dst)
                self._prefix.release(src)
        return moves

    def cache_len(self, request: Request) -> int:
        """Device cache positions held by a prefilled live request (its newest token is still pending)."""
        return request.prompt_len + len(request.output_token_ids) - 1

    def schedule_decode(self) -> DecodeBatch | None:
        """The next decode call over every prefilled live slot; None when there is none."""
        if self._in_flight is not None:
            raise RuntimeError("schedule_decode: the previous decode call was not reported; "
                               "call on_decode_tokens first")
        rows = tuple((i, r) for i, r in enumerate(self._slots) if r is not None and r.output_token_ids)
        if not rows:
            return None
        reach = tuple(min(self.cache_len(r) + self.config.decode_steps, self.config.max_seq_len) for _, r in rows)
        windows = self.config.decode_windows  # the last one is max_seq_len
        window = windows[bisect.bisect_left(windows, max(reach))]
        self._in_flight = rows
        counts = self.config.decode_slot_counts
        width = counts[bisect.bisect_right(counts, rows[-1][0])]
        return DecodeBatch(window, tuple(slot for slot, _ in rows), width, reach)

    def on_decode_tokens(self, tokens: Sequence[Sequence[int]],
                         extras: Sequence[Sequence] | None = None) -> list[Update]:
        """Accept tokens[step][slot] for the slots of the last schedule_decode call."""
        if self._in_flight is None:
            raise RuntimeError("on_decode_tokens: no decode call in flight; call schedule_decode first")
        if len(tokens) != self.config.decode_steps:
            raise ValueError(f"on_decode_tokens: got {len(tokens)} steps of tokens; expected decode_steps="
                             f"{self.config.decode_steps}, each indexed by slot")
        rows, self._in_flight = self._in_flight, None
        updates = []
        for slot, request in rows:
            if self._slots[slot] is not request:
                continue  # aborted in flight
            new = [int(step[slot]) for step in tokens]
            new_extras = [step[slot] for step in extras] if extras is not None else []
            updates.append(self._accept_or_fail(request, new, new_extras))
        return updates

    # -- finishing -------------------------------------------------------------------------------

    def fail(self, request: Request, error: str) -> Update | None:
        """Finish a waiting or live request with finish_reason "error"; None if it already finished."""
        if request.finished:
            return None
        if request.slot is None and request in self._waiting:
            self._waiting.remove(request)
        request.error = error
        self._finish(request, "error")
        return Update(request, [], True)

    def fail_calls(self, error: str, prefill: PrefillBatch | None = None) -> list[Update]:
        """A device call failed as a whole: fail the requests of `prefill`, or of the decode call in flight
        (also clearing it), or, with neither, every live request."""
        if prefill is not None:
            requests = [r for _, r in prefill.rows]
        elif self._in_flight is not None:
            requests, self._in_flight = [r for _, r in self._in_flight], None
        else:
            requests = [r for r in self._slots if r is not None]
        return [u for u in (self.fail(r, error) for r in requests) if u is not None]

    def _accept_or_fail(self, request: Request, tokens: list[int], extras: list) -> Update:
        try:
            return self._accept(request, tokens, extras)
        except Exception as e:  # this request's own host-side work (detokenising, stop strings) failed
            return self.fail(request, f"{type(e).__name__}: {e}") or Update(request, [], True)

    def _accept(self, request: Request, tokens: list[int], extras: list) -> Update:
        """Append tokens one by one until the request finishes; later tokens are discarded."""
        taken = 0
        for i, token in enumerate(tokens):
            request.output_token_ids.append(token)
            if extras:
                request.output_extras.append(extras[i])
            taken += 1
            reason = self._finish_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
                break
        return Update(request, tokens[:taken], request.finished, list(extras[:taken]))

    def _finish_reason(self, request: Request, token: int) -> str | None:
        """Why the request finishes after accepting `token` (already appended), or None. Before
        `min_tokens` tokens nothing stops it but the length (the device never samples eos or a stop id
        then; stop strings are not looked for, only text kept: vLLM's rule)."""
        params, eos = request.params, self.config.eos_token_id
        if len(request.output_token_ids) < params.min_tokens:
            if request.text_stream is not None:
                request.text_stream.push(token, check_stop=False)
        elif eos is not None and token == eos and not params.ignore_eos:
            return "stop"
        elif token in params.stop_token_ids:
            return "stop"
        elif request.text_stream is not None and request.text_stream.push(token):
            return "stop"
        if len(request.output_token_ids) >= params.max_new_tokens:
            return "length"
        if request.prompt_len + len(request.output_token_ids) >= self.config.max_seq_len:
            return "length"
        return None

    def _finish(self, request: Request, reason: str) -> None:
        """Record the reason and free the request's slot and id at once."""
        request.finish_reason = reason
        if request.slot is not None:
            self._slots[request.slot] = None
            if self._prefix is not None and reason == "error":  # its K/V may be partly written: forgotten
                self._prefix.claim(request.slot)
            elif self._prefix is not None:
                self._prefix.release(request.slot)
            request.slot = None
        self._known.pop(request.request_id, None)
