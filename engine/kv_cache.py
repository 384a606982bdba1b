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

    def write(self, layer: int, slots, positions, k: jax.Array, v: jax.Array) -> KVCache:
        """Store k/v [B, H, T, K] of one layer.

        Prefill (`slots` [B] given): the rows' positions are 0..T-1 and go to those slots; rows whose slot
        is out of range are dropped (padding rows). Decode (`slots` None): row b is slot b and writes its
        positions[b, :]; positions past the cache are dropped.
        """
        if slots is None:
            new_k, new_v = self._scatter(self.k[layer], positions, k), self._scatter(self.v[layer], positions, v)
        else:
            new_k, new_v = self._prefix(self.k[layer], slots, k), self._prefix(self.v[layer], slots, v)
        return dataclasses.replace(self, k=_swap(self.k, layer, new_k), v=_swap(self.v, layer, new_v))

    def _scatter(self, blocks: tuple[jax.Array, ...], positions, x: jax.Array) -> tuple[jax.Array, ...]:
        rows, heads, size = x.shape[0], x.shape[1], self.block
        slot_idx, head_idx = jnp.arange(rows)[:, None, None], jnp.arange(heads)[None, :, None]
        out = []
        for b, block in enumerate(blocks):
            local = positions[:, None, :] - b * size
            local = jnp.where((local >= 0) & (local < size), local, size)  # elsewhere: dropped
            out.append(block.at[slot_idx, head_idx, local].set(x.astype(block.dtype), mode="drop"))
        return tuple(out)

    def _prefix(self, blocks: tuple[jax.Array, ...], slots, x: jax.Array) -> tuple[jax.Array, ...]:
        size, t = self.block, x.shape[2]
        out = list(blocks)
        for b in range(min(len(blocks), math.ceil(t / size))):
            part = x[:, :, b * size: (b + 1) * size].astype(blocks[b].dtype)
            out[b] = blocks[b].at[slots, :, : part.shape[2]].set(part, mode="drop")
        return tuple(out)

    def window(self, layer: int, size: int) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """The blocks covering the first `size` positions of every slot of one layer (k, v)."""
        count = math.ceil(size / self.block)
        return self.k[layer][:count], self.v[layer][:count]


def _swap(tree: Blocks, layer: int, new: tuple[jax.Array, ...]) -> Blocks:
    return tree[:layer] + (new,) + tree[layer + 1:]
