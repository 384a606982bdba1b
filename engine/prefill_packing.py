"""Prefill packing: which admitted prompts share which prefill call, row and offset (plain Python).

With the slots split over `data` shards, a call's rows and prompt indices are split the same way and each
shard packs only its own slots' prompts into its part (so each device prefills only what it caches);
admission spreads a round's prompts over the shards (`admission_order`).

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
    (prompt i at row places[i][0], starting at token places[i][1], sampled as the program's prompt
    indices[i]); one first token sampled per prompt. With `shards` > 1 the rows and prompt indices are
    split into that many equal parts, part d holding only prompts of shard d's slots."""
    bucket: int  # row length (tokens)
    size: int  # padded row count, one of prefill_batch_sizes[bucket]
    rows: tuple[tuple[int, "Request"], ...]  # (slot, request) per prompt, in sampling order
    places: tuple[tuple[int, int], ...] = ()  # (row, offset) per prompt; empty: prompt i alone in row i
    prompts: int = 0  # prompts the program samples (>= len(rows)); 0: size
    indices: tuple[int, ...] = ()  # the program's prompt index of each prompt; empty: 0, 1, 2, ...
    shards: int = 1
    forks: tuple[tuple[int, int, int], ...] = ()  # (leader slot, follower slot, blocks) copied after the call

    @property
    def capacity(self) -> int:
        return self.prompts or self.size

    def placement(self) -> tuple[tuple[int, int], ...]:
        return self.places or tuple((i, 0) for i in range(len(self.rows)))

    def prompt_indices(self) -> tuple[int, ...]:
        return self.indices or tuple(range(len(self.rows)))


def admission_order(free: list[int], max_slots: int, shards: int) -> list[int]:
    """Free slots in the order admission takes them: the lowest first, or with the slots split into
    `shards`, round-robin over the shards (each shard's lowest first, the emptiest shard first), so one
    round's prompts spread over every shard's prefill rows."""
    if shards == 1:
        return free
    per = max_slots // shards
    by_shard: list[list[int]] = [[] for _ in range(shards)]
    for slot in free:
        by_shard[slot // per].append(slot)
    order = sorted(range(shards), key=lambda d: -len(by_shard[d]))
    depth = max(map(len, by_shard), default=0)
    return [by_shard[d][i] for i in range(depth) for d in order if i < len(by_shard[d])]


def pack_prefills(admitted: Pending, config: SchedulerConfig,
                  followers: dict[int, Pending] | None = None) -> list[PrefillBatch]:
    """Prefill calls for `admitted` (with `followers`: the forks of each leader slot): repeatedly, the
    longest pending prompt's bucket or the next one up, whichever `_fill`s a call with less compute per
    prompt token (`_cost`), until every prompt is placed. With `prefill_shards` > 1 each shard fills its
    own part of the call's rows with its own slots' prompts (a fork in another shard than its leader's is
    prefilled as a prompt of its own)."""
    shards, per = config.prefill_shards, config.max_slots // config.prefill_shards
    followers = dict(followers or {})
    for leader, group in list(followers.items()):
        admitted = list(admitted) + [(f, r) for f, r in group if f // per != leader // per]
        followers[leader] = [(f, r) for f, r in group if f // per == leader // per]
    pending: list[Pending] = [[] for _ in range(shards)]
    for slot, request in sorted(admitted, key=lambda sr: -sr[1].prompt_len):
        pending[slot // per].append((slot, request))
    buckets, batches = config.prefill_buckets, []
    while any(pending):
        longest = max(p[0][1].prompt_len for p in pending if p)
        first = bisect.bisect_left(buckets, longest)
        options = [_fill_shards(b, pending, config, followers) for b in buckets[first: first + 2]]
        batch, pending = min(options, key=lambda o: _cost(o[0], config.prefill_attention_cost))
        batches.append(batch)
    return batches


def _fill_shards(bucket: int, pending: list[Pending], config: SchedulerConfig,
                 followers: dict[int, Pending]) -> tuple[PrefillBatch, list[Pending]]:
    """One call of rows of `bucket` tokens: each shard `_fill`s its part; the call takes the smallest
    batch size whose per-shard part holds every shard's rows and prompts. Returns the call and the rest."""
    shards = config.prefill_shards
    sizes = [n // shards for n in config.prefill_batch_sizes[bucket]]
    caps = [n // shards for n in config.prefill_prompts[bucket]]
    filled = [_fill(bucket, p, sizes[-1], caps[-1], followers, config.block) for p in pending]
    k = next(i for i, (s, c) in enumerate(zip(sizes, caps)) if all(s >= f.rows_used and c >= len(f.rows) for f in filled))
    rows, places, indices, forks = [], [], [], []
    for d, f in enumerate(filled):
        rows += f.rows
        places += [(d * sizes[k] + row, offset) for row, offset in f.places]
        indices += [d * caps[k] + i for i in range(len(f.rows))]
        forks += f.forks
    batch = PrefillBatch(bucket, shards * sizes[k], tuple(rows), tuple(places), shards * caps[k],
                         tuple(indices) if shards > 1 else (), shards, tuple(forks))
    return batch, [f.rest for f in filled]


@dataclasses.dataclass
class _Filled:
    rows: list  # (slot, request) placed, a leader's forks right after it
    places: list  # (row, offset) of each
    rows_used: int
    rest: Pending
    forks: list  # (leader slot, follower slot, blocks)


def _fill(bucket: int, pending: Pending, max_rows: int, max_prompts: int, followers: dict[int, Pending],
          block: int) -> _Filled:
    """Rows of `bucket` tokens filled first-fit from `pending` (longest first, so a shorter prompt goes
    into the first row with room), up to `max_rows` rows and `max_prompts` prompts; a leader's forks sample
    from its last token (same place), as many as the prompt capacity leaves room for."""
    used: list[int] = []  # tokens taken in each row
    rows, places, rest, forks = [], [], [], []
    for slot, request in pending:
        n = request.prompt_len
        row = next((i for i, u in enumerate(used) if u + n <= bucket), None)
        if row is None and len(used) < max_rows and n <= bucket:
            row = len(used)
            used.append(0)
        if row is None or len(rows) == max_prompts:
            rest.append((slot, request))
            continue
        group = followers.get(slot, [])
        room = max_prompts - len(rows) - 1
        rows += [(slot, request)] + group[:room]
        places += [(row, used[row])] * (1 + len(group[:room]))
        forks += [(slot, f, -(-n // block)) for f, _ in group[:room]]
        rest += group[room:]
        used[row] += n
    return _Filled(rows, places, len(used), rest, forks)


def _cost(batch: PrefillBatch, attention_cost: float) -> float:
    """Relative compute per prompt token: each row costs T tokens of weights plus T^2 attention pairs."""
    per_row = batch.bucket * (1 + batch.bucket * attention_cost)
    computed = dict(zip(batch.placement(), (r.prompt_len for _, r in batch.rows)))  # a fork group once
    return batch.size * per_row / sum(computed.values())
