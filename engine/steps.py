"""One scheduling round: scheduler decisions -> runner calls -> results back to the scheduler.

The bridge between the pure-Python `Scheduler` and the device `Runner`: it packs a `PrefillBatch` into
padded host arrays, and turns the small arrays a program returns into token lists (and logprob entries,
fetched from the device only when a request in the call asked for them). A call holding a
`prompt_logprobs` request runs the runner's scoring prefill; each such request gets its prompt's entries
(`engine.scoring.prompt_entries`) before the scheduler sees its first token. With prefix reuse, a prefill
call's fork copies run right after it, and an `ExtendBatch` runs its block copies, then the extend program.

Failure isolation: a prefill, row-move or decode call that raises fails the requests it was running
(`Scheduler.fail_calls`, finish_reason "error") and the step goes on; only `MAX_FAILED_CALLS` failed calls
in a row (nothing succeeding in between: the device is gone) raise `EngineFailedError`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from engine.extend import pack_extend
from engine.requests import TokenLogprob, attach_rows
from engine.runner import PrefillRows, Runner, Sampled, neutral_params
from engine.sampling import MinTokensBan, SlotParams
from engine.scheduler import DecodeBatch, ExtendBatch, PrefillBatch, Request, Scheduler, Update
from engine.scoring import Scored, prompt_entries

log = logging.getLogger(__name__)
MAX_FAILED_CALLS = 3


class EngineFailedError(RuntimeError):
    """Device calls keep failing whatever they run: the engine cannot serve any request."""


def pack_prefill(batch: PrefillBatch, num_slots: int, ban: MinTokensBan) -> PrefillRows:
    """Host arrays for a prefill call: each prompt's tokens at its (row, offset), positions counting from 0
    per prompt; padding tokens carry segment P (the prompt capacity), padding prompts slot S (dropped);
    each prompt's min_tokens bit set from `ban` (the runner's). A
    fork (an entry at an earlier entry's place) samples from that entry's last token: its `source`.
    With `batch.shards` > 1 each shard's part of the rows and prompts is a call of its own: segments,
    `source` and `last` count from its first prompt and row (the program runs them per shard)."""
    rows, width, cap = batch.size, batch.bucket, batch.capacity
    local_rows, local_cap = rows // batch.shards, cap // batch.shards
    tokens = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    segments = np.full((rows, width), local_cap, np.int32)
    lengths, last = np.ones(cap, np.int32), np.zeros(cap, np.int32)
    slots = np.full(cap, num_slots, np.int32)
    keys = np.zeros((cap, 2), np.uint32)
    wants = np.zeros(cap, bool)
    source, first, params, sampling = np.arange(cap, dtype=np.int32) % local_cap, {}, [None] * cap, [None] * cap
    for i, (slot, req), (row, start) in zip(batch.prompt_indices(), batch.rows, batch.placement()):
        attach_rows(req)  # a no-op for requests made by RequestFactory: their rows exist since submission
        end = start + req.prompt_len
        source[i] = first.setdefault((row, start), i) % local_cap
        if source[i] == i % local_cap:
            tokens[row, start:end] = req.prompt_token_ids
            positions[row, start:end] = np.arange(req.prompt_len)
            segments[row, start:end] = i % local_cap
        lengths[i], last[i], slots[i] = req.prompt_len, (row % local_rows) * width + end - 1, slot
        keys[i] = req.key_data
        wants[i] = req.params.logprobs is not None
        params[i], sampling[i] = req.slot_row, req.params
    neutral = neutral_params(1)
    params = SlotParams(*(np.concatenate(column) for column in zip(*(p or neutral for p in params))))
    return PrefillRows(tokens, positions, segments, lengths, last, slots, params, keys, wants, source,
                       ban.rows(sampling))


def _extra(req: Request | None, out: dict, index) -> TokenLogprob | None:
    if req is None or req.params.logprobs is None:
        return None
    n = req.params.logprobs
    top = tuple((int(i), float(v)) for i, v in zip(out["top_ids"][index][:n], out["top_logprobs"][index][:n]))
    return TokenLogprob(int(out["tokens"][index]), float(out["logprob"][index]), top)


def _fetch(out: Sampled, wanted: bool) -> dict:
    """Device -> host; the logprob arrays only when some request asked for them."""
    fields = Sampled._fields if wanted else ("tokens",)
    return {f: np.asarray(getattr(out, f)) for f in fields}


def _attach_prompt_logprobs(batch: PrefillBatch, host: dict) -> None:
    """Each scoring request's prompt logprobs, read at its placement in the call's flat [B*T] arrays."""
    for (_, req), (row, start) in zip(batch.rows, batch.placement()):
        n = req.params.prompt_logprobs
        if n is not None:
            req.prompt_logprobs = prompt_entries(host, req.prompt_token_ids, row * batch.bucket + start, n)


class StepRunner:
    def __init__(self, runner: Runner, scheduler: Scheduler):
        self.runner, self.scheduler = runner, scheduler
        self.failed_calls = 0  # device calls failed in a row

    def step(self, on_prefill: Callable[[list[Update]], None] | None = None) -> list[Update]:
        """Prefill admitted requests, then decode every live slot. `on_prefill` (streaming) gets the prefill
        updates before the decode call runs, so first tokens arrive a decode call sooner; they are then not
        returned."""
        updates = []
        for batch in self.scheduler.schedule_prefills():
            run = self._extend if isinstance(batch, ExtendBatch) else self._prefill
            updates += self._guarded(lambda b=batch, run=run: run(b), batch)
        if on_prefill is not None and updates:
            on_prefill(updates)
            updates = []
        moves = self.scheduler.compact()
        if moves:
            updates += self._guarded(lambda: self._move(moves))
        decode = self.scheduler.schedule_decode()
        if decode is not None:
            updates += self._guarded(lambda: self._decode(decode))
        return updates

    def _guarded(self, call: Callable[[], list[Update]],
                 prefill: PrefillBatch | ExtendBatch | None = None) -> list[Update]:
        """Run one device call; if it raises, fail the requests it ran (see the module docstring)."""
        try:
            updates = call()
        except Exception as e:
            self.failed_calls += 1
            log.exception("a device call failed; failing the requests it ran")
            failed = self.scheduler.fail_calls(f"internal error: {type(e).__name__}: {e}", prefill)
            if self.failed_calls >= MAX_FAILED_CALLS:
                raise EngineFailedError(f"{self.failed_calls} device calls failed in a row; last: {e!r}") from e
            return failed
        self.failed_calls = 0
        return updates

    def _move(self, moves: list[tuple[int, int]]) -> list[Update]:
        self.runner.move(moves)
        return []

    def _prefill(self, batch: PrefillBatch) -> list[Update]:
        rows = pack_prefill(batch, self.scheduler.config.max_slots, self.runner.ban)
        reqs = [r for _, r in batch.rows]
        tops = [r.params.prompt_logprobs for r in reqs if r.params.prompt_logprobs is not None]
        if tops:
            out, scored = self.runner.score_prefill(rows, max(tops))
            _attach_prompt_logprobs(batch, {f: np.asarray(getattr(scored, f)) for f in Scored._fields})
        else:
            out = self.runner.prefill(rows)
        self.runner.copy(batch.forks)
        return self._first_tokens(batch, out, self.runner.prompt_rows(batch.capacity)[list(batch.prompt_indices())])

    def _extend(self, batch: ExtendBatch) -> list[Update]:
        self.runner.copy(batch.copies)
        out = self.runner.extend(pack_extend(batch, self.scheduler.config.max_slots, self.runner.max_len,
                                             self.runner.ban))
        return self._first_tokens(batch, out, [slot for slot, _ in batch.rows])

    def _first_tokens(self, batch: PrefillBatch | ExtendBatch, out: Sampled, index) -> list[Update]:
        """Each request's first token (and extra) from `out` at index[i] for batch.rows[i]."""
        reqs = [r for _, r in batch.rows]
        host = _fetch(out, any(r.params.logprobs is not None for r in reqs))
        extras = [_extra(r, host, i) for i, r in zip(index, reqs)] if "logprob" in host else None
        return self.scheduler.on_prefill_tokens(batch, [int(host["tokens"][i]) for i in index], extras)

    def _decode(self, batch: DecodeBatch) -> list[Update]:
        live = {s: self.scheduler.request_at(s) for s in batch.slots}
        reach = [0] * self.scheduler.config.max_slots  # free slots read nothing
        for slot, n in zip(batch.slots, batch.reach):
            reach[slot] = n
        out = self.runner.decode(batch.window, batch.num_slots, reach)
        host = _fetch(out, any(r is not None and r.params.logprobs is not None for r in live.values()))
        tokens = host["tokens"].tolist()
        extras = None  # per-token extras only when some live request asked for logprobs (k x S otherwise)
        if "logprob" in host:
            extras = [[_extra(live.get(s), host, (k, s)) for s in range(len(row))] for k, row in enumerate(tokens)]
        return self.scheduler.on_decode_tokens(tokens, extras)
