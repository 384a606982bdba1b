"""Prefix reuse bookkeeping (plain Python, no JAX): which cache slots hold which full blocks of prompt K/V.

A block is B consecutive cache positions [i*B, (i+1)*B) (B = the cache's block). Its K/V depend only on
prompt tokens [0, (i+1)*B), so a block is keyed by (its parent block's id, its B tokens): vLLM's chained
hash, but compared exactly (the dict key holds the tokens), so two different prefixes never match.

The pool is the cache slots themselves, with no separate array: a slot keeps the full prompt blocks of its
last request, indexed here, from that request's prefill until the slot is given to another request (a live
request's prompt blocks are never overwritten: decode writes only past the prompt). Free slots holding
blocks are kept least recently used first; `max_blocks` bounds the blocks indexed in free slots (the least
recently used free slot is forgotten first). `engine.prefix_plan` uses the index to plan admissions.

Invariants:
- a slot's holdings are a chain prefix: holding block i of a chain means holding blocks 0..i-1 of it;
- holdings are registered (`hold`) only after the call that wrote them succeeded, cut (`truncate`) when the
  slot is given to a new request (to the blocks that request reuses in place), dropped when its request
  fails;
- a block id lives while some slot holds it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BlockKey = tuple[int, tuple[int, ...]]  # (parent block id or -1, the block's tokens)


class BlockIndex:
    def __init__(self, block: int, max_blocks: int | None = None) -> None:
        self.block, self.max_blocks = block, max_blocks
        self._ids: dict[BlockKey, int] = {}
        self._keys: dict[int, BlockKey] = {}
        self._holders: dict[int, set[int]] = {}  # block id -> slots holding it
        self._chains: dict[int, list[int]] = {}  # slot -> block ids it holds, in position order
        self._free: OrderedDict[int, None] = OrderedDict()  # free slots, least recently used first
        self._next_id = 0
        self.query_tokens = 0  # prompt tokens of requests admitted with reuse on
        self.hit_tokens = 0  # of those, tokens reused (copied or kept cached blocks, forked prompts)

    @property
    def cached_blocks(self) -> int:
        """Distinct blocks held by some slot (live or free)."""
        return len(self._holders)

    def chain(self, tokens: Sequence[int], create: bool = False) -> list[int]:
        """Ids of the full blocks of `tokens` in order, up to the first one never seen (all, with `create`)."""
        out, parent, b = [], -1, self.block
        for i in range(len(tokens) // b):
            key = (parent, tuple(tokens[i * b: (i + 1) * b]))
            bid = self._ids.get(key)
            if bid is None:
                if not create:
                    break
                bid = self._new(key)
            out.append(bid)
            parent = bid
        return out

    def match(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Ids of the longest run of `tokens`' leading full blocks (at most `limit`) that some slot holds
        (every known id is held: an id is dropped with its last holder)."""
        return self.chain(tokens)[:limit]

    def holders(self, bid: int) -> set[int]:
        return set(self._holders.get(bid, ()))

    def holds(self, slot: int) -> int:
        return len(self._chains.get(slot, ()))

    def hold(self, slot: int, tokens: Sequence[int]) -> None:
        """`slot` now holds every full block of `tokens` (its prefill wrote them)."""
        self.truncate(slot, 0)
        ids = self.chain(tokens, create=True)
        self._chains[slot] = ids
        for bid in ids:
            self._holders.setdefault(bid, set()).add(slot)

    def truncate(self, slot: int, keep: int) -> None:
        """`slot` keeps only its first `keep` blocks (the rest are about to be overwritten)."""
        chain = self._chains.get(slot, [])
        for bid in chain[keep:]:
            holders = self._holders[bid]
            holders.discard(slot)
            if not holders:
                del self._holders[bid]
                del self._ids[self._keys.pop(bid)]
        if keep:
            self._chains[slot] = chain[:keep]
        else:
            self._chains.pop(slot, None)

    def copy(self, src: int, dst: int) -> None:
        """`dst` took every row of `src` (compaction): it holds what `src` holds; `src` keeps its copy."""
        chain = list(self._chains.get(src, []))
        self.truncate(dst, 0)
        if chain:
            self._chains[dst] = chain
            for bid in chain:
                self._holders[bid].add(dst)

    def claim(self, slot: int, keep: int = 0) -> None:
        """`slot` is given to a request reusing its first `keep` blocks in place."""
        self._free.pop(slot, None)
        self.truncate(slot, keep)

    def release(self, slot: int) -> None:
        """`slot` is free again (its blocks stay cached); forget the least recently used over budget."""
        self._free[slot] = None
        self._free.move_to_end(slot)
        if self.max_blocks is None:
            return
        while sum(self.holds(s) for s in self._free) > self.max_blocks:
            self.truncate(next(iter(self._free)), 0)
            self._free.popitem(last=False)

    def is_free(self, slot: int) -> bool:
        return slot in self._free

    def _new(self, key: BlockKey) -> int:
        bid, self._next_id = self._next_id, self._next_id + 1
        self._ids[key], self._keys[bid] = bid, key
        return bid
