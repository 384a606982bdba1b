"""One admission round with prefix reuse (plain Python): forks, cache hits, deferrals and slots.

Each admitted request is, in FIFO order:
- a hit: its prompt starts with j >= 1 full blocks some slot holds (`BlockIndex.match`, at most
  (prompt_len - 1) // B blocks, so at least one token is computed to sample from). It reuses them in place
  when a free slot holding them is left, else they are copied into its slot first; one extend call (rows =
  cache slots, `ExtendBatch`) then computes every hit's remaining tokens attending to its cached ones;
- deferred: it shares its first block with a request prefilled in this round (not yet in the cache); it
  waits for the next round, where it is a hit;
- prefilled from scratch (a miss); misses with identical prompts form one fork group: the first is
  prefilled, the others sample their first tokens from its logits and get its K/V copied
  (`PrefillBatch.forks`).
Hits go to the extend call only while it pays: its cost is (slots x bucket) tokens, against the hits'
whole prompts prefilled from scratch; otherwise they are misses too.

Requests asking for `prompt_logprobs` never hit, fork or lead a fork (every prompt token is scored from
scratch); requests with a repetition penalty never hit (the extend call sees only the suffix tokens, and
the penalty needs the whole prompt), but do fork.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from engine.prefix_cache import BlockIndex

if TYPE_CHECKING:
    from engine.scheduler import Request, SchedulerConfig

Copy = tuple[int, int, int]  # (src slot, dst slot, blocks): dst's first blocks take src's


@dataclasses.dataclass(frozen=True)
class ExtendBatch:
    """One extend call: row i of the call is cache slot i. Each (slot, request) of `rows` holds its prompt's
    first starts[i] positions once `copies` ran, and computes the rest (at most `bucket` tokens)."""
    bucket: int
    rows: tuple[tuple[int, Request], ...]
    starts: tuple[int, ...]
    copies: tuple[Copy, ...] = ()

    @property
    def capacity(self) -> int:
        return len(self.rows)

    def prompt_indices(self) -> tuple[int, ...]:
        return tuple(range(len(self.rows)))


@dataclasses.dataclass
class RoundPlan:
    assigned: list[tuple[int, Request]]  # every admitted (slot, request)
    full: list[tuple[int, Request]]  # prefilled from scratch (fork leaders included)
    followers: dict[int, list[tuple[int, Request]]]  # leader slot -> its forks
    extend: ExtendBatch | None
    deferred: list[Request]  # back to the head of the queue, in order


def _can_hit(request: Request) -> bool:
    return request.params.prompt_logprobs is None and request.params.repetition_penalty == 1.0


def _classify(index: BlockIndex, candidates: list[Request]):
    """(hits [(request, block ids)], misses, deferred), in FIFO order."""
    block, hits, misses, deferred = index.block, [], [], []
    leaders: set[tuple[int, ...]] = set()
    pending: set[tuple[int, ...]] = set()  # first blocks this round's misses will write
    for r in candidates:
        limit = (r.prompt_len - 1) // block if _can_hit(r) else 0
        ids = index.match(r.prompt_token_ids, limit) if limit else []
        key = tuple(r.prompt_token_ids)
        if ids:
            hits.append((r, ids))
        elif limit and key not in leaders and key[:block] in pending:
            deferred.append(r)
        else:
            misses.append(r)
            if r.prompt_len >= block:
                pending.add(key[:block])
            if r.params.prompt_logprobs is None:
                leaders.add(key)
    return hits, misses, deferred


def _choose_extend(hits, config: SchedulerConfig):
    """(bucket, hits kept for the extend call, hits prefilled from scratch instead)."""
    def suffix(hit) -> int:
        return hit[0].prompt_len - len(hit[1]) * config.block

    best, best_saving = None, 0
    for bucket in config.extend_buckets:
        saving = sum(r.prompt_len for r, ids in hits if suffix((r, ids)) <= bucket) - config.max_slots * bucket
        if saving > best_saving:
            best, best_saving = bucket, saving
    if best is None:
        return None, [], hits
    return best, [h for h in hits if suffix(h) <= best], [h for h in hits if suffix(h) > best]


def _forks(misses: list[tuple[int, Request]]):
    """(leaders, followers by leader slot): misses with one prompt share the first one's prefill."""
    first: dict[tuple[int, ...], int] = {}
    full, followers = [], {}
    for slot, r in misses:
        key = tuple(r.prompt_token_ids)
        if r.params.prompt_logprobs is None and key in first:
            followers.setdefault(first[key], []).append((slot, r))
            continue
        if r.params.prompt_logprobs is None:
            first[key] = slot
        full.append((slot, r))
    return full, followers


def plan_round(index: BlockIndex, candidates: list[Request], free: list[int], config: SchedulerConfig) -> RoundPlan:
    """Classify `candidates` (popped from the queue, at most one per free slot) and give each a slot: hits
    reusing blocks in place take their holder; the others take the lowest free slots, longest first."""
    hits, misses, deferred = _classify(index, candidates)
    bucket, hits, scratch = _choose_extend(hits, config)
    misses += [r for r, _ in scratch]
    holders = {id(r): index.holders(ids[-1]) for r, ids in hits}  # before any slot is claimed
    free_left, in_place = list(free), {}
    for r, ids in hits:
        mine = [s for s in free_left if s in holders[id(r)]]
        if mine:
            free_left.remove(mine[0])
            index.claim(mine[0], keep=len(ids))
            in_place[id(r)] = mine[0]
    rest = misses + [r for r, _ in hits if id(r) not in in_place]
    rest.sort(key=lambda r: -min(r.prompt_len + r.params.max_new_tokens, config.max_seq_len))
    for slot in free_left[:len(rest)]:
        index.claim(slot)
    slot_of = {**in_place, **{id(r): s for s, r in zip(free_left, rest)}}
    # A source is never another copy's destination: a free holder is either taken in place or, when it is
    # not, some hit of its chain took another holder in place (live holders are never destinations).
    dsts = {slot_of[id(r)] for r, _ in hits if id(r) not in in_place}
    copies = tuple((min(holders[id(r)] - dsts), slot_of[id(r)], len(ids)) for r, ids in hits if id(r) not in in_place)
    rows = tuple((slot_of[id(r)], r) for r, _ in hits)
    starts = tuple(len(ids) * config.block for _, ids in hits)
    full, followers = _forks([(slot_of[id(r)], r) for r in misses])
    assigned = [(slot_of[id(r)], r) for r in candidates if id(r) in slot_of]
    _count(index, assigned, hits, followers, config.block)
    extend = ExtendBatch(bucket, rows, starts, copies) if rows else None
    return RoundPlan(assigned, full, followers, extend, deferred)


def _count(index: BlockIndex, assigned, hits, followers, block: int) -> None:
    index.query_tokens += sum(r.prompt_len for _, r in assigned)
    index.hit_tokens += sum(len(ids) * block for _, ids in hits)
    index.hit_tokens += sum(r.prompt_len for group in followers.values() for _, r in group)
