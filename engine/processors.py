"""On-device logits processing and sampling, vectorised over S slots (V = padded vocab).

Every parameter is a per-slot array (`SlotParams`), so new values never recompile; all functions are
jit-compatible with static shapes. Invariants:
- Order follows HF `generate`, then the extras: repetition penalty (prompt + generated tokens) ->
  presence/frequency penalties (generated tokens, OpenAI) -> min_tokens (HF's MinNewTokensLength: a
  row that has generated fewer than min_tokens tokens gets -inf at its banned ids, eos and stop ids, a
  per-slot bit set) -> temperature -> top-k -> top-p -> min-p.
- Removed tokens become -inf; padded vocab entries arrive as -inf and stay -inf.
- A row with temperature 0 is greedy: penalties apply, the warpers (temperature .. min-p) do not.
- Top-k, top-p and min-p never sort the vocab: top-k and top-p reduce to one score threshold per row,
  found among the row's C = min(`_CANDIDATES`, V) largest scores (`lax.top_k`); when some sampling row's
  cutoff lies deeper (top_k > C, or the candidates hold less than top_p of the mass), the call finds it by
  an exact bisection over the order of the float bits instead. Min-p needs only the row maximum. Each
  stage runs under `lax.cond`, only when some sampling row needs it; greedy rows never trigger a fallback.
- Ties at a threshold are all kept (HF keeps top-k ties; for top-p/min-p HF's choice among tied tokens
  depends on its sort order). Top-p reads "mass above a token in descending order >= top_p", which is
  HF's "ascending cumulative mass <= 1 - top_p" up to float summation order.
- A request's draws depend only on its key data and step index, never on its slot or batch mates.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from engine.sampling import SlotParams

_KEY_IMPL = "threefry2x32"
# Top-k / top-p cutoffs are looked for among each row's _CANDIDATES largest scores (lax.top_k: ~20 ms for
# [64, 50304] on a 2-core CPU, vs ~850 ms to sort it); a row whose cutoff lies deeper sends the call to
# bisection (~50-90 ms there).
_CANDIDATES = 256


class TokenLogprobs(NamedTuple):
    """Log-probabilities of the model distribution (raw logits), per slot."""

    token_logprob: jax.Array  # f32[S]: of the sampled token
    top_ids: jax.Array  # i32[S, n]: most likely tokens, most likely first
    top_logprobs: jax.Array  # f32[S, n]


def process_logits(logits: jax.Array, p: SlotParams, seen: jax.Array, counts: jax.Array,
                   steps: jax.Array | None = None, banned: jax.Array | None = None) -> jax.Array:
    """Scores f32[S, V] to sample from; `seen` bool[S, V] marks prompt + generated tokens, `counts`
    i32[S, V] counts generated tokens only; `steps` i32[S] tokens generated so far and `banned` u32[S, W]
    each row's min_tokens bit set (`engine.sampling.MinTokensBan`; None: no row bans anything)."""
    scores = logits.astype(jnp.float32)
    # Three [S, V] passes a step: skipped when no row uses a penalty (the common greedy batch job).
    scores = jax.lax.cond(jnp.any(uses_penalties(p)), apply_penalties, lambda s, *_: s, scores, p, seen, counts)
    if banned is not None:
        scores = apply_min_tokens(scores, p.min_tokens, steps, banned)
    greedy = p.temperature == 0
    # All-greedy calls (the common batch job) skip the warpers' [S, V] passes.
    return jax.lax.cond(jnp.all(greedy), lambda s, *_: s, _warp_sampling_rows, scores, p, greedy)


def _warp_sampling_rows(scores: jax.Array, p: SlotParams, greedy: jax.Array) -> jax.Array:
    warped = _truncate(apply_temperature(scores, p.temperature), p, greedy)
    return jnp.where(greedy[:, None], scores, warped)


def uses_penalties(p: SlotParams) -> jax.Array:
    """bool[S]: rows whose scores depend on `seen` / `counts`."""
    return (p.repetition_penalty != 1) | (p.presence_penalty != 0) | (p.frequency_penalty != 0)


def apply_penalties(scores: jax.Array, p: SlotParams, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """HF repetition penalty over `seen` (negative scores x penalty, positive / penalty), then OpenAI
    presence/frequency: score -= presence * (count > 0) + frequency * count."""
    penalty = p.repetition_penalty[:, None]
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    scores = jnp.where(seen, penalised, scores)
    presence = p.presence_penalty[:, None] * (counts > 0)
    frequency = p.frequency_penalty[:, None] * counts.astype(jnp.float32)
    return scores - (presence + frequency)


def apply_min_tokens(scores: jax.Array, min_tokens: jax.Array, steps: jax.Array, banned: jax.Array) -> jax.Array:
    """-inf at each banned id (bit t % 32 of word t // 32 of `banned` u32[S, W]) of the rows that have
    generated fewer than `min_tokens` tokens (`steps` i32[S] so far). One [S, V] pass, run only when some
    row is still held back (the other calls pay one compare per slot)."""
    held = steps < min_tokens

    def ban(s: jax.Array) -> jax.Array:
        bits = (banned[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [S, W, 32]: token w * 32 + b
        mask = bits.reshape(banned.shape[0], -1)[:, :s.shape[-1]] == 1
        return jnp.where(mask & held[:, None], -jnp.inf, s)

    return jax.lax.cond(jnp.any(held), ban, lambda s: s, scores)


def apply_temperature(scores: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide each row by its temperature; greedy rows (temperature 0) pass through."""
    t = temperature[:, None]
    return jnp.where(t > 0, scores / jnp.where(t > 0, t, 1.0), scores)


def _truncate(scores: jax.Array, p: SlotParams, greedy: jax.Array) -> jax.Array:
    """Top-k, top-p and min-p, skipped entirely when no sampling row asks for any of them."""
    active = ~greedy & (_top_k_on(p.top_k, scores.shape[-1]) | (p.top_p < 1) | (p.min_p > 0))
    return jax.lax.cond(jnp.any(active), _warp, lambda s, *_: s, scores, p, active)


def _warp(scores: jax.Array, p: SlotParams, active: jax.Array) -> jax.Array:
    """`active` bool[S] marks the sampling rows that use a warper; only they may trigger the fallbacks."""
    uses_cut = active & (_top_k_on(p.top_k, scores.shape[-1]) | (p.top_p < 1))
    cut = jax.lax.cond(jnp.any(uses_cut), _candidate_cut, lambda s, *_: jnp.full(s.shape[:1], -jnp.inf),
                       scores, p, active)
    kept = _mask_below(scores, cut)
    return jax.lax.cond(jnp.any(active & (p.min_p > 0)), _min_p, lambda s, _: s, kept, p.min_p)


def _top_k_on(top_k: jax.Array, vocab: int) -> jax.Array:
    return (top_k > 0) & (top_k < vocab)


def _mask_below(scores: jax.Array, cut: jax.Array) -> jax.Array:
    return jnp.where(scores >= cut[:, None], scores, -jnp.inf)


def _candidate_cut(scores: jax.Array, p: SlotParams, active: jax.Array) -> jax.Array:
    """Per-row score threshold f32[S] of top-k then top-p (keep scores >= it), from the row's
    C = min(_CANDIDATES, V) largest scores; a cutoff beyond them falls back to bisection."""
    top, _ = jax.lax.top_k(scores, min(_CANDIDATES, scores.shape[-1]))  # f32[S, C], descending
    cut = _top_k_cut(scores, top, p.top_k, active)
    top = jnp.where(top >= cut[:, None], top, -jnp.inf)  # = top C of the top-k filtered row
    return jnp.maximum(cut, _top_p_cut(_mask_below(scores, cut), top, p.top_p, active))


def _top_k_cut(scores: jax.Array, top: jax.Array, top_k: jax.Array, active: jax.Array) -> jax.Array:
    """The k-th largest score (HF TopKLogitsWarper keeps every score >= it, ties included); -inf when off."""
    vocab, cap = scores.shape[-1], top.shape[-1]
    on = _top_k_on(top_k, vocab)
    k = jnp.clip(top_k, 1, vocab)
    deep = jnp.any(active & on & (k > cap))
    kth = jax.lax.cond(deep, _kth_largest, lambda _, k: _take(top, jnp.minimum(k, cap) - 1), scores, k)
    return jnp.where(on, kth, -jnp.inf)


def _top_p_cut(filtered: jax.Array, top: jax.Array, top_p: jax.Array, active: jax.Array) -> jax.Array:
    """HF TopPLogitsWarper on the top-k filtered row, `top` its C largest scores, descending. A token is
    removed iff the probability mass strictly above it in descending order is >= top_p (HF: ascending
    cumulative mass <= 1 - top_p); the most likely token is always kept; -inf when off."""
    on = top_p < 1
    probs = jnp.exp(top - top[:, :1]) / jnp.sum(jnp.exp(filtered - top[:, :1]), axis=-1, keepdims=True)
    inclusive = jnp.cumsum(probs, axis=-1)
    before = jnp.pad(inclusive[:, :-1], ((0, 0), (1, 0)))  # mass of the higher-ranked candidates
    n_kept = jnp.clip(jnp.sum(before < top_p[:, None], axis=-1), 1, top.shape[-1])
    # The cutoff lies among the candidates iff they hold top_p of the mass (or they are the whole row).
    within = (inclusive[:, -1] >= top_p) | (top.shape[-1] == filtered.shape[-1])
    deep = jnp.any(active & on & ~within)
    cut = jax.lax.cond(deep, _top_p_by_bisection, lambda *_: _take(top, n_kept - 1), filtered, top_p)
    return jnp.where(on, cut, -jnp.inf)


def _min_p(scores: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF MinPLogitsWarper: drop probabilities below min_p x the largest probability (0 = off)."""
    probs = jax.nn.softmax(scores, axis=-1)
    removed = probs < min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(removed, -jnp.inf, scores)


def _take(rows: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(rows, index[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _kth_largest(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Exact k-th largest score f32[S] for 1 <= k <= V, by bisection over the order keys."""
    keys = _order_key(scores)
    found = _greatest_key(lambda u: jnp.sum(keys >= u[:, None], axis=-1) >= k, len(scores))
    return _from_key(found)


def _top_p_by_bisection(filtered: jax.Array, top_p: jax.Array) -> jax.Array:
    """Exact top-p cut over the whole row: the largest key u whose total mass of scores with key <= u is
    <= 1 - top_p is removed with everything below it; ties share a key, so they go or stay together."""
    probs = jax.nn.softmax(filtered, axis=-1)
    keys = _order_key(filtered)
    limit = 1 - top_p
    last_removed = _greatest_key(lambda u: jnp.sum(jnp.where(keys <= u[:, None], probs, 0), axis=-1) <= limit,
                                 len(filtered))
    best = jnp.max(filtered, axis=-1)
    everything = last_removed >= _order_key(best)  # the most likely token stays whatever the rounding
    return jnp.where(everything, best, _from_key(jnp.where(everything, last_removed, last_removed + 1)))


def _greatest_key(holds: Callable[[jax.Array], jax.Array], rows: int) -> jax.Array:
    """Per row, the largest key u32[rows] for which `holds` (u32[rows] -> bool[rows]) is true, given that
    it is true at 0 and monotone (true up to a point, then false): one bit per step, most significant
    first, so 32 full-row passes whatever the data."""
    def step(i: jax.Array, found: jax.Array) -> jax.Array:
        candidate = found | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(holds(candidate), candidate, found)

    return jax.lax.fori_loop(0, 32, step, jnp.zeros((rows,), jnp.uint32))


def _order_key(x: jax.Array) -> jax.Array:
    """u32 keys ordered like the (non-NaN) f32 values; -0.0 is read as +0.0 so equal values share a key."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_key(key: jax.Array) -> jax.Array:
    """Inverse of `_order_key`."""
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32((1 << 31) - 1), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def sample(scores: jax.Array, key_data: jax.Array, steps: jax.Array, greedy: jax.Array) -> jax.Array:
    """One token i32[S] per row. Greedy rows take the argmax (ties -> lowest token id); the others draw
    from softmax(scores) with key fold_in(key_data[s], steps[s]) (key_data u32[S, 2], raw threefry)."""
    best = argmax_rows(scores)
    # All-greedy calls (common in batch jobs) skip the S x V random draws entirely.
    drawn = jax.lax.cond(greedy.all(), lambda: best,
                         lambda: jax.vmap(_draw)(scores, key_data, steps).astype(jnp.int32))
    return jnp.where(greedy, best, drawn)


def argmax_rows(x: jax.Array, chunk: int = 128) -> jax.Array:
    """jnp.argmax(x, -1) as i32 (first index of the maximum), for x [S, V]: the maximum of each `chunk` of
    the row first, then the argmax inside the first chunk holding it. Same result, but XLA:CPU's fused
    (value, index) reduction over [64, 50304] took ~7 ms a decode step; this takes ~0.3 ms."""
    rows, vocab = x.shape
    if vocab % chunk:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    chunks = x.reshape(rows, vocab // chunk, chunk)
    first = jnp.argmax(chunks.max(axis=-1), axis=-1)  # the lowest chunk holding the row maximum
    inside = jnp.take_along_axis(chunks, first[:, None, None], axis=1)[:, 0]
    return (first * chunk + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


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
