"""The preallocated KV cache: a fixed-shape pytree updated in place under jit (the cache is donated).

Layout `k`, `v`: [L, S, H, M, K] (layers, slots, heads, positions, head dim); `lengths`: [S] int32, the
number of positions of each slot that hold real K/V. Positions are per slot: every request starts at 0.
Entries at or past a slot's length are stale and always masked by position, never cleared.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from engine.config import GPT2Config

CACHE_AXES = ("layers", "slots", "heads", "positions", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: GPT2Config, slots: int, max_len: int, dtype=jnp.float32, shardings=None) -> KVCache:
        """Zeros of shape [L, S, H, M, K]; `shardings` (k/v, lengths) places them straight on a mesh."""
        shape = (cfg.n_layer, slots, cfg.n_head, max_len, cfg.head_dim)
        kv_sharding, len_sharding = shardings if shardings is not None else (None, None)

        def zeros(shape_, dtype_, sharding):
            return jax.jit(lambda: jnp.zeros(shape_, dtype_), out_shardings=sharding)()

        return cls(zeros(shape, dtype, kv_sharding), zeros(shape, dtype, kv_sharding),
                   zeros((slots,), jnp.int32, len_sharding))

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, slots, positions, k: jax.Array, v: jax.Array) -> KVCache:
        """Store k/v [B, H, T, K] at (layer, slots[b] or b, :, positions[b, t]); rows whose slot is out of
        range are dropped (padding rows of a prefill call)."""
        rows, heads = k.shape[0], k.shape[1]
        slot_idx = jnp.arange(rows) if slots is None else slots
        idx = (layer, slot_idx[:, None, None], jnp.arange(heads)[None, :, None], positions[:, None, :])
        return dataclasses.replace(
            self,
            k=self.k.at[idx].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[idx].set(v.astype(self.v.dtype), mode="drop"),
        )

    def window(self, layer: int, size: int) -> tuple[jax.Array, jax.Array]:
        """The first `size` positions of every slot of one layer: k, v as [S, H, size, K]."""
        return self.k[layer, :, :, :size], self.v[layer, :, :, :size]
