"""The preallocated KV cache: a fixed-shape pytree updated in place under jit (the cache is donated).

Logically `k`, `v` are [L, S, H, M, K] (layers, slots, heads, positions, head dim) and `lengths` [S] int32
counts the positions of each slot that hold real K/V. Physically the layers are split into slabs: one
slab of all L layers when the model scans over its layers (it reads and writes one layer at a traced
index), else L slabs of one layer each (a Python loop over layers: every layer its own arrays, read in
place, which XLA:CPU needs: it copies any slice of a bigger array before a dot). Within a slab the slots
and positions are split:
- slots into G groups of consecutive slots (G = `slot_groups`: `EngineConfig.kv_slot_groups`, by
  default 4 when the slots are not split over a `data` mesh axis), so decode attends group by group, each
  group reading only the blocks its own live slots reach (slots of similar length share a group); a
  narrower decode call takes whole groups, or (narrower than one group) the first rows of the first group,
  sliced out and written back;
- positions into blocks of `BLOCK`, one array [layers of the slab, S/G, H, BLOCK, K] per (slab, group,
  block): attending to the first W positions reads the first ceil(W / BLOCK) arrays' layer whole.
  (Slicing a window or a slot range out of a bigger array makes XLA:CPU copy it first, which costs more
  than the attention itself.)
Slots are dim 1 of every block array (logical axis `slots`). Positions are per slot: every request
starts at 0. Entries at or past a slot's length are stale and always masked by position, never cleared.
Writes: prefill and extend copy each prompt's K/V block by block into its slot (`write_runs`: update
slices, one compiled kernel shared by every layer, group and block); decode puts each row's one token
into its own slot (`write`: a loop over the rows, an update slice per block, shared kernels likewise);
extend with the slots over `data` scatters each row's tokens into its own slot (`write`: one scatter
per group and block array). Copies of a slot's blocks into other slots: `engine.kv_copy`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from engine.config import GPT2Config
from engine.slicing import index_in, put_slice, take_slice, when

BLOCK = 128  # cache positions per block array
GROUPS = 4  # slot groups per layer when kv_slot_groups is unset and the slots are not split over devices
CACHE_AXES = ("layers", "slots", "heads", "positions", "head_dim")  # of each block array

Groups = tuple[tuple[jax.Array, ...], ...]  # [group][block] -> [layers of the slab, S/G, H, block, K]
Slabs = tuple[Groups, ...]  # [slab]: one slab of all layers (scanned model), or one per layer


class Runs(NamedTuple):
    """K/V writes of prefill and extend (`KVCache.write_runs`): run r is runs.length[r] consecutive
    tokens of one row, written to one slot from position runs.start[r] (each i32[R]); only the first
    `count` (i32[]) are written."""

    row: jax.Array
    column: jax.Array  # the run's first token
    slot: jax.Array  # out of range: dropped
    length: jax.Array
    start: jax.Array  # a multiple of the block size (prefill: 0; extend: the cached prefix)
    count: jax.Array

    @classmethod
    def first(cls, writes, row, column, slot, length, start) -> Runs:
        """The runs where `writes` holds, moved to the front (each argument [R])."""
        order = jnp.argsort(~writes, stable=True)
        return cls(*(a[order] for a in (row, column, slot, length, start)), count=writes.sum(dtype=jnp.int32))


def at_layer(blocks, layer) -> tuple[jax.Array, ...]:
    """One layer's slice (index in the slab: traced, or 0 for a one-layer slab) of each block array:
    [S/G, H, block, K]."""
    return tuple(index_in(b, layer, 0, keepdims=False) for b in blocks)


def block_size(max_len: int) -> int:
    return min(BLOCK, max_len)


def slot_groups(slots: int, data: int = 1, requested: int | None = None) -> int:
    """Slot groups per layer: `requested` (`EngineConfig.kv_slot_groups`), else GROUPS (or 2) when they
    divide the slots; always 1 with the slots sharded over `data` (a group split across devices would move
    rows between them every layer)."""
    if data > 1:
        if requested not in (None, 1):
            raise ValueError(f"kv_slot_groups={requested}: with the slots split over data={data} the KV cache has "
                             "one slot group (each device holds its own slots); leave it unset or use 1")
        return 1
    if requested is not None:  # EngineConfig checked that it divides the slots
        return requested
    return next(g for g in (GROUPS, 2, 1) if slots % g == 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: Slabs
    v: Slabs
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: GPT2Config, slots: int, max_len: int, dtype=jnp.float32, shardings=None,
               groups: int = 1, stacked: bool = False) -> KVCache:
        """Zeros for `max_len` positions per slot in `groups` slot groups, in one slab of all layers
        (`stacked`: for a scanned model) or one slab per layer; `shardings` (one block array's, lengths')
        places them straight on a mesh."""
        size = block_size(max_len)
        slabs, depth = (1, cfg.n_layer) if stacked else (cfg.n_layer, 1)
        shape = (depth, slots // groups, cfg.n_head, size, cfg.head_dim)
        kv_sharding, len_sharding = shardings if shardings is not None else (None, None)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv_sharding)
        blocks = math.ceil(max_len / size)

        def arrays() -> Slabs:
            return tuple(tuple(tuple(zeros() for _ in range(blocks)) for _ in range(groups)) for _ in range(slabs))

        lengths = jax.jit(lambda: jnp.zeros((slots,), jnp.int32), out_shardings=len_sharding)()
        return cls(arrays(), arrays(), lengths)

    @classmethod
    def tree_of(cls, cfg: GPT2Config, max_len: int, leaf, lengths_leaf, groups: int = 1,
                stacked: bool = False) -> KVCache:
        """A KVCache-shaped tree with `leaf` at every block (for axes or shardings trees)."""
        blocks = math.ceil(max_len / block_size(max_len))
        tree = tuple(tuple(tuple(leaf for _ in range(blocks)) for _ in range(groups))
                     for _ in range(1 if stacked else cfg.n_layer))
        return cls(tree, tree, lengths_leaf)

    @property
    def num_slots(self) -> int:
        return sum(self.group_sizes)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(g[0].shape[1] for g in self.k[0])

    @property
    def group_starts(self) -> tuple[int, ...]:
        """The first slot of each group."""
        sizes = self.group_sizes
        return tuple(sum(sizes[:g]) for g in range(len(sizes)))

    @property
    def block(self) -> int:
        return self.k[0][0][0].shape[3]

    @property
    def blocks(self) -> int:
        """Blocks per slot."""
        return len(self.k[0][0])

    def _locate(self, layer) -> tuple[int, object]:
        """(slab, index in the slab) of a layer: a Python int with one slab per layer, else traced."""
        return (layer, 0) if len(self.k) > 1 else (0, layer)

    def head_sizes(self, width: int) -> tuple[int, ...]:
        """Slots per group of `head(width)`."""
        out, start = [], 0
        for n in self.group_sizes:
            if start < width:
                out.append(min(n, width - start))
            start += n
        return tuple(out)

    def group_blocks(self, width: int, window: int, reach=None) -> list[int]:
        """Blocks each group of `head(width)` reads so that every slot sees positions [0, reach[slot])
        (host ints; a group with nothing to read gets 0); without `reach`, the whole window."""
        sizes, out, start = self.head_sizes(width), [], 0
        for n in sizes:
            need = window if reach is None else min(window, max(reach[start: start + n], default=0))
            out.append(math.ceil(need / self.block))
            start += n
        return out

    def write(self, layer, positions, k: jax.Array, v: jax.Array, limit: int | None = None) -> KVCache:
        """Store k/v [B, H, T, K] of one layer (traced index) for decode (and extend with slots over
        `data`), where row b is slot b: token (b, t) goes to positions[b, t]; each group writes only its
        own rows, and a position past the cache is dropped (decode past the end; extend padding).
        `limit` (static): every position is below it, so blocks past it are not touched (the window).
        One token a row (decode): update slices (`_put_tokens`); more (extend): a scatter per block array,
        each compiled into a kernel of its own on XLA:CPU (see `write_runs`)."""
        slab, layer = self._locate(layer)
        new_k, new_v = [], []
        start = 0
        for gk, gv in zip(self.k[slab], self.v[slab]):
            size = gk[0].shape[1]
            count = len(gk) if limit is None else min(len(gk), math.ceil(limit / self.block))
            part = slice(start, start + size)
            pos, xk, xv = positions[part], k[part], v[part]
            if k.shape[2] == 1:  # decode: one token a row
                gk, gv = self._put_tokens(gk, gv, count, layer, pos[:, 0], xk, xv)
            else:
                local = jnp.arange(size)[:, None]
                gk, gv = (self._scatter(g, count, layer, local, pos, x) for g, x in ((gk, xk), (gv, xv)))
            new_k.append(gk)
            new_v.append(gv)
            start += size
        return dataclasses.replace(self, k=_swap(self.k, slab, tuple(new_k)), v=_swap(self.v, slab, tuple(new_v)))

    def write_runs(self, layer, runs: Runs, k: jax.Array, v: jax.Array, limit: int) -> KVCache:
        """Prefill and extend: store k/v [B, H, T, K] of one layer (traced index) run by run: run r's tokens
        (row runs.row[r] from column runs.column[r], runs.length[r] of them) go to slot runs.slot[r] at
        positions runs.start[r], +1, ...; a run whose slot is out of range is dropped, and runs past
        `runs.count` too. `limit` (static): every position is below it (prefill: T; extend: the window).

        One loop over the runs per layer, and in it one `dynamic_update_slice` of whole block rows per
        (group, block) the run reaches (in a `lax.cond`): the positions past the run's length take the
        row's next tokens, stale like every entry past a slot's length. Why not a scatter per (group,
        block) array: XLA:CPU compiles each scatter into a kernel of its own, never shared between
        identical ones, so a prefill or extend program held layers x groups x blocks x 2 of them (most of
        its compile time and of its code mappings); these slice kernels are the same in every layer,
        group and block, compiled once."""
        slab, layer_at = self._locate(layer)
        size, tokens = self.block, k.shape[2]
        span, count = min(tokens, size), min(len(self.k[slab][0]), math.ceil(limit / size))
        dtype = self.k[slab][0][0].dtype
        pad = ((0, 0), (0, 0), (0, span), (0, 0))  # a run's last block reads up to `span` past the row
        # (`_put_run` reads span back from this padding: min(padded T // 2, block) == min(T, block))
        xk, xv = (jnp.pad(x.astype(dtype), pad) for x in (k, v))
        heads = tuple(tuple(g[:count] for g in groups) for groups in (self.k[slab], self.v[slab]))
        (head_k, head_v), *_ = jax.lax.fori_loop(0, runs.count, _write_run, (heads, runs, xk, xv, layer_at))
        new_k = tuple(h + g[count:] for h, g in zip(head_k, self.k[slab]))
        new_v = tuple(h + g[count:] for h, g in zip(head_v, self.v[slab]))
        return dataclasses.replace(self, k=_swap(self.k, slab, new_k), v=_swap(self.v, slab, new_v))

    def _put_tokens(self, bk, bv, count: int, layer, positions, xk, xv):
        """Decode: row i's token (xk/xv [n, H, 1, K]) goes to positions[i] of the group's first `count`
        blocks: a loop over the rows, and in it per block a `dynamic_update_slice` of the row's one position
        that writes back the old value unless the position is in that block (so one past them all is
        dropped). The slices are the same in every layer, group and block: one kernel, compiled once."""
        xk, xv = (x.astype(bk[0].dtype)[:, None, None] for x in (xk, xv))  # [n, 1, 1, H, 1, K]
        carry = ((tuple(bk[:count]), tuple(bv[:count])), positions, xk, xv, layer)
        (head_k, head_v), *_ = jax.lax.fori_loop(0, positions.shape[0], _put_token, carry)
        return head_k + tuple(bk[count:]), head_v + tuple(bv[count:])

    def _scatter(self, blocks: tuple[jax.Array, ...], count: int, layer, slots, positions,
                 x: jax.Array) -> tuple[jax.Array, ...]:
        """Writes into layer `layer` (index in the slab) of the first `count` blocks of one group; the
        others are returned as they are."""
        size = self.block
        slot_idx = jnp.broadcast_to(slots, positions.shape)  # [B, T]
        layer_idx = jnp.broadcast_to(jnp.asarray(layer, jnp.int32), positions.shape)
        rows = x.transpose(0, 2, 1, 3).astype(blocks[0].dtype)  # [B, T, H, K]
        out = list(blocks)
        for b in range(count):
            local = positions - b * size
            local = jnp.where((local >= 0) & (local < size), local, size)  # elsewhere: dropped
            # Heads are a whole (window) dimension of the update, not indexed: with heads split over
            # `model` each device writes its own heads, no K/V gathered across devices.
            out[b] = blocks[b].at[layer_idx, slot_idx, :, local].set(rows, mode="drop")
        return tuple(out)

    def window(self, layer, size: int) -> tuple[Groups, Groups, object]:
        """Per slot group, the blocks covering the first `size` positions (k, v) of the slab holding
        `layer`, and the layer's index in it: read it with `at_layer` where it is used (in a `lax.cond`
        per block, only a taken one reads)."""
        slab, index = self._locate(layer)
        count = math.ceil(size / self.block)
        return tuple(g[:count] for g in self.k[slab]), tuple(g[:count] for g in self.v[slab]), index

    def head(self, width: int) -> KVCache:
        """The cache of slots [0, width): whole groups as they are, a partly covered group sliced."""
        sizes = self.head_sizes(width)

        def cut(groups: Groups) -> Groups:
            return tuple(g if n == g[0].shape[1] else tuple(b[:, :n] for b in g) for g, n in zip(groups, sizes))

        return KVCache(tuple(map(cut, self.k)), tuple(map(cut, self.v)), self.lengths[:width])

    def with_head(self, head: KVCache) -> KVCache:
        """This cache with slots [0, width) taken from `head` (a `head(width)` of it, updated)."""
        def put(groups: Groups, new: Groups) -> Groups:
            out = list(groups)
            for i, g in enumerate(new):
                same = g[0].shape[1] == groups[i][0].shape[1]
                out[i] = g if same else tuple(b.at[:, : h.shape[1]].set(h) for b, h in zip(groups[i], g))
            return tuple(out)

        width = head.lengths.shape[0]
        return KVCache(tuple(map(put, self.k, head.k)), tuple(map(put, self.v, head.v)),
                       self.lengths.at[:width].set(head.lengths))


def _swap(slabs: Slabs, index: int, new: Groups) -> Slabs:
    return slabs[:index] + (new,) + slabs[index + 1:]


def _write_run(r, carry):
    """`write_runs`' loop body, at module level so that every layer's loop traces it once: run r into each
    group's blocks it reaches (k, v: the first blocks of each group, in slot order)."""
    (k, v), runs, xk, xv, layer = carry
    row, column, slot, length, start = (a[r] for a in runs[:5])
    out_k, out_v, first_slot = [], [], 0
    for gk, gv in zip(k, v):
        local = slot - first_slot
        mine = (local >= 0) & (local < gk[0].shape[1])
        gk, gv = list(gk), list(gv)
        for b in range(len(gk)):
            first = b * gk[b].shape[3] - start  # the run's token at this block's first position
            reached, at = mine & (first >= 0) & (first < length), (row, column + first, layer, local)
            gk[b], gv[b] = when(reached, _put_run, _keep, (gk[b], gv[b]), (xk, xv), at)
        out_k.append(tuple(gk))
        out_v.append(tuple(gv))
        first_slot += gk[0].shape[1]
    return (tuple(out_k), tuple(out_v)), runs, xk, xv, layer


def _put_token(i, carry):
    """`_put_tokens`' loop body, at module level so that every group and layer traces it once: row i's
    token into each of its slot's blocks (k, v), the position's old value written back outside its block."""
    (k, v), positions, xk, xv, layer = carry
    _, _, heads, size, dim = k[0].shape
    local = positions[i] - jnp.arange(len(k)) * size
    inside, at = (local >= 0) & (local < size), jnp.clip(local, 0, size - 1)

    def put(a, b, x):
        where = (layer, i, 0, at[b], 0)
        return put_slice(a, jnp.where(inside[b], x, take_slice(a, where, (1, 1, heads, 1, dim))), where)

    kv = tuple(tuple(put(a, b, x[i]) for b, a in enumerate(blocks)) for blocks, x in ((k, xk), (v, xv)))
    return kv, positions, xk, xv, layer


def _put_run(blocks, rows, at):
    """`write_runs`' cond: a run's whole block row from (row, column) of rows (k, v [B, H, T + span, K],
    padded by span = min(T, block) positions) into (layer, slot) of blocks (its k, v block arrays)."""
    row, column, layer, slot = at
    span = min(rows[0].shape[2] // 2, blocks[0].shape[3])
    new = (take_slice(x, (row, 0, column, 0), (1, x.shape[1], span, x.shape[3])) for x in rows)
    return tuple(put_slice(a, u[None], (layer, slot, 0, 0, 0)) for a, u in zip(blocks, new))


def _keep(blocks, rows, at):
    return blocks
