"""Dynamic slices at start indices that are never negative, and cond branches traced once.

`jax.lax.dynamic_slice` and `dynamic_update_slice` wrap a negative traced start index around its axis by
default: a compare, an add and a select traced (and lowered) for each traced index of every call. The KV
cache's programs hold thousands of these slices (decode puts each row's token into every block of every
layer), and every index they pass is in range (or, in a branch that does not run, clamped by XLA), so
they say so (`allow_negative_indices=False`, JAX >= 0.5.3).

`jax.lax.cond` traces both branches at every call unless it is handed the same function objects with
operands of the same shapes again (JAX caches the trace by function); the attention's per-block conds
(layers x groups x blocks of them) therefore take module-level branch functions and pass each block as
an operand, instead of closing over it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


def take_slice(operand: jax.Array, start: Sequence, sizes: Sequence[int]) -> jax.Array:
    return jax.lax.dynamic_slice(operand, start, sizes, allow_negative_indices=False)


def put_slice(operand: jax.Array, update: jax.Array, start: Sequence) -> jax.Array:
    return jax.lax.dynamic_update_slice(operand, update, start, allow_negative_indices=False)


def index_in(operand: jax.Array, i, axis: int, keepdims: bool = True) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(operand, i, axis, keepdims=keepdims, allow_negative_indices=False)


def put_index(operand: jax.Array, update: jax.Array, i, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(operand, update, i, axis, allow_negative_indices=False)


def when(pred, then: Callable, otherwise: Callable, *operands):
    """then(*operands) if pred else otherwise(*operands): a `lax.cond` for a traced pred, a plain call for
    a Python bool. Pass module-level functions (not closures) so identical conds trace once."""
    if isinstance(pred, bool):
        return (then if pred else otherwise)(*operands)
    return jax.lax.cond(pred, then, otherwise, *operands)
