"""On-device logits processing and sampling, vectorised over S slots (V = padded vocab).

Every parameter is a per-slot array (`SlotParams`), so new values never recompile; all functions are
jit-compatible with static shapes. Invariants:
- Order follows HF `generate`, then the extras: repetition penalty (prompt + generated tokens) ->
  presence/frequency penalties (generated tokens, OpenAI) -> temperature -> top-k -> top-p -> min-p.
- Removed tokens become -inf; padded vocab entries arrive as -inf and stay -inf.
- A row with temperature 0 is greedy: penalties apply, the warpers (temperature .. min-p) do not.
- Top-k, top-p and min-p share one ascending sort and reduce to one threshold per row; it runs under
  `lax.cond` only when some sampling row needs it. Ties at a threshold are all kept (HF keeps top-k ties;
  for top-p/min-p HF's choice among tied tokens depends on its sort order).
- A request's draws depend only on its key data and step index, never on its slot or batch mates.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from engine.sampling import SlotParams

_KEY_IMPL = "threefry2x32"


class TokenLogprobs(NamedTuple):
    """Log-probabilities of the model distribution (raw logits), per slot."""

    token_logprob: jax.Array  # f32[S]: of the sampled token
    top_ids: jax.Array  # i32[S, n]: most likely tokens, most likely first
    top_logprobs: jax.Array  # f32[S, n]


def process_logits(logits: jax.Array, p: SlotParams, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """Scores f32[S, V] to sample from; `seen` bool[S, V] marks prompt + generated tokens, `counts`
    i32[S, V] counts generated tokens only."""
    scores = apply_penalties(logits.astype(jnp.float32), p, seen, counts)
    greedy = p.temperature == 0
    warped = _truncate(apply_temperature(scores, p.temperature), p, greedy)
    return jnp.where(greedy[:, None], scores, warped)


def apply_penalties(scores: jax.Array, p: SlotParams, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """HF repetition penalty over `seen` (negative scores x penalty, positive / penalty), then OpenAI
    presence/frequency: score -= presence * (count > 0) + frequency * count."""
    penalty = p.repetition_penalty[:, None]
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    scores = jnp.where(seen, penalised, scores)
    presence = p.presence_penalty[:, None] * (counts > 0)
    frequency = p.frequency_penalty[:, None] * counts.astype(jnp.float32)
    return scores - (presence + frequency)


def apply_temperature(scores: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide each row by its temperature; greedy rows (temperature 0) pass through."""
    t = temperature[:, None]
    return jnp.where(t > 0, scores / jnp.where(t > 0, t, 1.0), scores)


def _truncate(scores: jax.Array, p: SlotParams, greedy: jax.Array) -> jax.Array:
    """Top-k, top-p and min-p, skipping the sort when no sampling row asks for any of them."""
    vocab = scores.shape[-1]
    wanted = ((p.top_k > 0) & (p.top_k < vocab)) | (p.top_p < 1) | (p.min_p > 0)
    return jax.lax.cond(jnp.any(wanted & ~greedy), _sorted_truncate, lambda s, _: s, scores, p)


def _sorted_truncate(scores: jax.Array, p: SlotParams) -> jax.Array:
    ascending = jnp.sort(scores, axis=-1)
    cut = _top_k_cut(ascending, p.top_k)
    cut = jnp.maximum(cut, _top_p_cut(_mask_below(ascending, cut), p.top_p))
    cut = jnp.maximum(cut, _min_p_cut(_mask_below(ascending, cut), p.min_p))
    return jnp.where(scores >= cut[:, None], scores, -jnp.inf)


def _mask_below(ascending: jax.Array, cut: jax.Array) -> jax.Array:
    return jnp.where(ascending >= cut[:, None], ascending, -jnp.inf)


def _top_k_cut(ascending: jax.Array, top_k: jax.Array) -> jax.Array:
    """The k-th largest score per row (HF TopKLogitsWarper keeps every score >= it); -inf when off."""
    vocab = ascending.shape[-1]
    kth = _take(ascending, vocab - jnp.clip(top_k, 1, vocab))
    return jnp.where((top_k > 0) & (top_k < vocab), kth, -jnp.inf)


def _top_p_cut(ascending: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF TopPLogitsWarper: drop the ascending prefix whose cumulative probability is <= 1 - top_p."""
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    cut = _first_kept(ascending, cumulative <= (1 - top_p)[:, None])
    return jnp.where(top_p < 1, cut, -jnp.inf)


def _min_p_cut(ascending: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF MinPLogitsWarper: drop probabilities below min_p x the largest probability."""
    probs = jax.nn.softmax(ascending, axis=-1)
    cut = _first_kept(ascending, probs < min_p[:, None] * probs[:, -1:])
    return jnp.where(min_p > 0, cut, -jnp.inf)


def _first_kept(ascending: jax.Array, removed: jax.Array) -> jax.Array:
    """Smallest kept score, given a removed prefix of the ascending row; the largest is always kept."""
    n_removed = jnp.minimum(jnp.sum(removed, axis=-1), ascending.shape[-1] - 1)
    return _take(ascending, n_removed)


def _take(rows: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(rows, index[:, None].astype(jnp.int32), axis=-1)[:, 0]


def sample(scores: jax.Array, key_data: jax.Array, steps: jax.Array, greedy: jax.Array) -> jax.Array:
    """One token i32[S] per row. Greedy rows take the argmax (ties -> lowest token id); the others draw
    from softmax(scores) with key fold_in(key_data[s], steps[s]) (key_data u32[S, 2], raw threefry)."""
    best = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    # All-greedy calls (common in batch jobs) skip the S x V random draws entirely.
    drawn = jax.lax.cond(greedy.all(), lambda: best,
                         lambda: jax.vmap(_draw)(scores, key_data, steps).astype(jnp.int32))
    return jnp.where(greedy, best, drawn)


def _draw(row: jax.Array, key_data: jax.Array, step: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=_KEY_IMPL), step)
    return jax.random.categorical(key, row)


def top_logprobs(logits: jax.Array, tokens: jax.Array, n: int) -> TokenLogprobs:
    """Logprobs from log_softmax of the raw model logits f32[S, V] (OpenAI/vLLM semantics); `n` static.

    Among equal logprobs the lower token id comes first."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    values, ids = jax.lax.top_k(logp, n)
    return TokenLogprobs(chosen, ids.astype(jnp.int32), values)
