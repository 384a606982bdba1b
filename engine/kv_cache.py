"""The preallocated KV cache: a fixed-shape pytree updated in place under jit (the cache is donated).

Logically `k`, `v` are [L, S, H, M, K] (layers, slots, heads, positions, head dim) and `lengths` [S] int32
counts the positions of each slot that hold real K/V. Physically each layer's positions are split into
blocks of `BLOCK` positions, one array [S, H, BLOCK, K] per (layer, block): a decode program attending to
the first W positions reads the first ceil(W / BLOCK) arrays whole. (Slicing a window out of one
[S, H, M, K] array makes XLA:CPU copy it first, which costs more than the attention itself.)
Positions are per slot: every request starts at 0. Entries at or past a slot's length are stale and always
masked by position, never cleared.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from engine.config import GPT2Config

BLOCK = 128  # cache positions per block array
CACHE_AXES = ("slots", "heads", "positions", "head_dim")  # of each block array

Blocks = tuple[tuple[jax.Array, ...], ...]  # [layer][block] -> [S, H, block, K]


def block_size(max_len: int) -> int:
    return min(BLOCK, max_len)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: Blocks
    v: Blocks
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: GPT2Config, slots: int, max_len: int, dtype=jnp.float32, shardings=None) -> KVCache:
        """Zeros for `max_len` positions per slot; `shardings` (one block array's, lengths') places them
        straight on a mesh."""
        size = block_size(max_len)
        shape = (slots, cfg.n_head, size, cfg.head_dim)
        kv_sharding, len_sharding = shardings if shardings is not None else (None, None)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv_sharding)
        blocks = math.ceil(max_len / size)

        def layers() -> Blocks:
            return tuple(tuple(zeros() for _ in range(blocks)) for _ in range(cfg.n_layer))

        lengths = jax.jit(lambda: jnp.zeros((slots,), jnp.int32), out_shardings=len_sharding)()
        return cls(layers(), layers(), lengths)

    @classmethod
    def tree_of(cls, cfg: GPT2Config, max_len: int, leaf, lengths_leaf) -> KVCache:
        """A KVCache-shaped tree with `leaf` at every block (for axes or shardings trees)."""
        blocks = math.ceil(max_len / block_size(max_len))
        tree = tuple(tuple(leaf for _ in range(blocks)) for _ in range(cfg.n_layer))
        return cls(tree, tree, lengths_leaf)

    @property
    def num_slots(self) -> int:
        return self.k[0][0].shape[0]

    @property
    def block(self) -> int:
        return self.k[0][0].shape[2]

    def write(self, layer: int, slots, positions, k: jax.Array, v: jax.Array, limit: int | None = None) -> KVCache:
        """Store k/v [B, H, T, K] of one layer: token (b, t) goes to slot slots[b, t] at positions[b, t].

        `slots` None (decode): row b is slot b. Tokens whose slot or position is out of range are dropped
        (prefill padding; decode positions past the cache). `limit` (static): every position is below it,
        so blocks past it are not touched (prefill: T; decode: the window)."""
        blocks = len(self.k[layer])
        if limit is not None:
            blocks = min(blocks, math.ceil(limit / self.block))
        if slots is None:
            slots = jnp.arange(k.shape[0])[:, None]
        new_k = self._scatter(self.k[layer], blocks, slots, positions, k)
        new_v = self._scatter(self.v[layer], blocks, slots, positions, v)
        return dataclasses.replace(self, k=_swap(self.k, layer, new_k), v=_swap(self.v, layer, new_v))

    def _scatter(self, blocks: tuple[jax.Array, ...], count: int, slots, positions, x: jax.Array) -> tuple[jax.Array, ...]:
        """Writes into the first `count` blocks; the others are returned as they are."""
        size, heads = self.block, x.shape[1]
        slot_idx = jnp.broadcast_to(slots, positions.shape)[:, :, None]  # [B, T, 1]
        head_idx = jnp.arange(heads)[None, None, :]
        rows = x.transpose(0, 2, 1, 3).astype(blocks[0].dtype)  # [B, T, H, K]
        out = list(blocks)
        for b in range(count):
            local = positions - b * size
            local = jnp.where((local >= 0) & (local < size), local, size)[:, :, None]  # elsewhere: dropped
            out[b] = blocks[b].at[slot_idx, head_idx, local].set(rows, mode="drop")
        return tuple(out)

    def window(self, layer: int, size: int) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """The blocks covering the first `size` positions of every slot of one layer (k, v)."""
        count = math.ceil(size / self.block)
        return self.k[layer][:count], self.v[layer][:count]


def _swap(tree: Blocks, layer: int, new: tuple[jax.Array, ...]) -> Blocks:
    return tree[:layer] + (new,) + tree[layer + 1:]
