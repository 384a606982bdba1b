"""Prefill packing: which admitted prompts share which prefill call, row and offset (plain Python).

Prompts are packed end to end into rows of a bucket's length, longest first, so short prompts fill the
gaps long ones leave; each call's row length is the longest remaining prompt's bucket or the next one up,
whichever computes fewer tokens per prompt token once attention (quadratic in the row length) is priced in.
A fork group (`engine.prefix_plan`) takes one place: its followers are sampling entries at their leader's
place, as many as the call's prompt capacity leaves room for (the others are packed as prompts of their
own), and the call's `forks` copy the leader's K/V into their slots after it ran.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.scheduler import Request, SchedulerConfig

Pending = list[tuple[int, "Request"]]  # (slot, request)


@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """One prefill call: `size` rows of `bucket` tokens holding the prompts of `rows` packed end to end
    (prompt i at row places[i][0], starting at token places[i][1]); one first token sampled per prompt."""
    bucket: int  # row length (tokens)
    size: int  # padded row count, one of prefill_batch_sizes[bucket]
    rows: tuple[tuple[int, "Request"], ...]  # (slot, request) per prompt, in sampling order
    places: tuple[tuple[int, int], ...] = ()  # (row, offset) per prompt; empty: prompt i alone in row i
    prompts: int = 0  # prompts the program samples (>= len(rows)); 0: size
    forks: tuple[tuple[int, int, int], ...] = ()  # (leader slot, follower slot, blocks) copied after the call

    @property
    def capacity(self) -> int:
        return self.prompts or self.size

    def placement(self) -> tuple[tuple[int, int], ...]:
        return self.places or tuple((i, 0) for i in range(len(self.rows)))



def pack_prefills(admitted: Pending, config: SchedulerConfig,
                  followers: dict[int, Pending] | None = None) -> list[PrefillBatch]:
    """Prefill calls for `admitted` (with `followers`: the forks of each leader slot): repeatedly, the
    longest pending prompt's bucket or the next one up, whichever `_fill`s a call with less compute per
    prompt token (`_cost`), until every prompt is placed."""
    pending = sorted(admitted, key=lambda sr: -sr[1].prompt_len)
    buckets, batches, followers = config.prefill_buckets, [], followers or {}
    while pending:
        first = bisect.bisect_left(buckets, pending[0][1].prompt_len)
        options = [_fill(b, pending, config, followers) for b in buckets[first: first + 2]]
        batch, pending = min(options, key=lambda o: _cost(o[0], config.prefill_attention_cost))
        batches.append(batch)
    return batches


def _fill(bucket: int, pending: Pending, config: SchedulerConfig,
          followers: dict[int, Pending]) -> tuple[PrefillBatch, Pending]:
    """One call of rows of `bucket` tokens filled first-fit from `pending` (longest first, so a shorter
    prompt goes into the first row with room), up to the bucket's largest row count and prompt capacity;
    it takes the smallest batch size that holds its rows and prompts. Returns the call and the rest."""
    sizes, caps = config.prefill_batch_sizes[bucket], config.prefill_prompts[bucket]
    used: list[int] = []  # tokens taken in each row
    rows, places, rest, forks = [], [], [], []
    for slot, request in pending:
        n = request.prompt_len
        row = next((i for i, u in enumerate(used) if u + n <= bucket), None)
        if row is None and len(used) < sizes[-1] and n <= bucket:
            row = len(used)
            used.append(0)
        if row is None or len(rows) == caps[-1]:
            rest.append((slot, request))
            continue
        group = followers.get(slot, [])
        room = caps[-1] - len(rows) - 1
        rows += [(slot, request)] + group[:room]
        places += [(row, used[row])] * (1 + len(group[:room]))
        forks += [(slot, f, -(-n // config.block)) for f, _ in group[:room]]
        rest += group[room:]
        used[row] += n
    k = next(i for i, (s, c) in enumerate(zip(sizes, caps)) if s >= len(used) and c >= len(rows))
    return PrefillBatch(bucket, sizes[k], tuple(rows), tuple(places), caps[k], tuple(forks)), rest


def _cost(batch: PrefillBatch, attention_cost: float) -> float:
    """Relative compute per prompt token: each row costs T tokens of weights plus T^2 attention pairs."""
    per_row = batch.bucket * (1 + batch.bucket * attention_cost)
    computed = dict(zip(batch.placement(), (r.prompt_len for _, r in batch.rows)))  # a fork group once
    return batch.size * per_row / sum(computed.values())
