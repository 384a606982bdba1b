"""Copying one slot's K/V blocks into other slots: forks, prefix-cache hits that cannot reuse blocks in
place, and compaction (the runner's block copy program; its row move is `device_state.move_row`).

The cache's layout is `engine.kv_cache`'s: one array per (slab, slot group, block), slots on dim 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from engine.kv_cache import Groups, KVCache, Slabs
from engine.slicing import index_in


def copy_blocks(cache: KVCache, src, dsts, counts, n) -> KVCache:
    """For i < n: slot dsts[i]'s first counts[i] blocks take slot src's (traced: src and n i32[],
    dsts and counts i32[F]); lengths unchanged; no dst may be src. One call serves every destination
    of a source (all forks of a prompt): src's rows are read once into rows of their own (`lax.switch`
    on its group), then a loop over the n destinations writes each block row in place, a scatter per
    group array (dropped outside the destination's group or past its count), all layers of a slab at
    once. Writing a row sliced out
    of the array being written would make XLA:CPU copy that whole array first (and a select over every
    group streams the whole cache), so the reads come first."""
    starts = cache.group_starts  # every slab: same groups

    def group_of(slot):
        return sum((slot >= s).astype(jnp.int32) for s in starts[1:]) if starts[1:] else jnp.zeros_like(slot)

    src_g, dst_g = group_of(src), group_of(dsts)
    src_i, dst_i = src - jnp.asarray(starts)[src_g], dsts - jnp.asarray(starts)[dst_g]

    def read(groups: Groups) -> list[jax.Array]:  # src's row of each block, [layers, 1, H, block, K]
        return [jax.lax.switch(src_g, _pickers(len(groups)), tuple(g[b] for g in groups), src_i)
                for b in range(len(groups[0]))]

    def targets(i) -> list[list[jax.Array]]:  # per group and block: dst's row there, else out of range
        return [[jnp.where((dst_g[i] == g) & (b < counts[i]), dst_i[i], size)[None] for b in range(cache.blocks)]
                for g, size in enumerate(cache.group_sizes)]

    def write(groups: Groups, rows: list[jax.Array], at: list[list[jax.Array]]) -> Groups:
        return tuple(tuple(a.at[:, j].set(row, mode="drop") for a, j, row in zip(blocks, at[g], rows))
                     for g, blocks in enumerate(groups))

    rows_k, rows_v = [read(g) for g in cache.k], [read(g) for g in cache.v]

    def one(i, kv: tuple[Slabs, Slabs]) -> tuple[Slabs, Slabs]:
        (k, v), at = kv, targets(i)  # the same rows in every slab: computed once
        return tuple(write(g, r, at) for g, r in zip(k, rows_k)), tuple(write(g, r, at) for g, r in zip(v, rows_v))

    k, v = jax.lax.fori_loop(0, n, one, (cache.k, cache.v))
    return KVCache(k, v, cache.lengths)


@functools.cache
def _pickers(groups: int) -> tuple:
    """Switch branches: group j's row i of one block (the same functions every call, so traced once)."""
    return tuple(functools.partial(_pick, j) for j in range(groups))


def _pick(j: int, blocks: tuple[jax.Array, ...], i) -> jax.Array:
    return index_in(blocks[j], i, 1)
