"""The on-device state the compiled programs carry (`DecodeState`), the host arrays of a prefill call
(`PrefillRows`), what a program returns per sampled token (`Sampled`), and the pure functions the runner's
programs share: sampling one step, marking seen tokens, storing a call's prompts into their slots and
sampling their first tokens (`sample_first`, a program of its own), and moving one slot's row.

Invariant: every per-slot array has the slots on dim 0 (logical axis `slots`, split over `data`), except the
KV cache's block arrays, which have them on dim 1 (after the stacked layers); `state_axes` says which.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import GPT2Config
from engine.extend import ExtendRows
from engine.kv_cache import CACHE_AXES, KVCache
from engine.processors import process_logits, sample, top_logprobs
from engine.sampling import MAX_LOGPROBS, SamplingParams, SlotParams, slot_params
from engine.slicing import index_in, put_index


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # i32[S] the next token to feed (the last one sampled)
    steps: jax.Array  # i32[S] tokens generated so far: the fold-in index of each slot's key
    keys: jax.Array  # u32[S,2] per-request PRNG key data
    params: SlotParams  # per-slot sampling parameters, each [S]
    wants_logprobs: jax.Array  # bool[S]
    seen: jax.Array  # bool[S,V] prompt + generated tokens (repetition penalty)
    counts: jax.Array  # i32[S,V] generated-token counts (presence / frequency penalties)
    banned: jax.Array  # u32[S,W] ids min_tokens holds back, bit set (engine.sampling.MinTokensBan), W = V/32


def state_axes(cfg: GPT2Config, max_len: int, groups: int = 1, stacked: bool = False) -> DecodeState:
    """Logical axes of every DecodeState array (engine.sharding.RULES maps them onto the mesh): slots on
    `data` (always dim 0); seen/counts keep the whole vocab per row because sampling reads whole rows."""
    slot = ("slots",)
    return DecodeState(
        cache=KVCache.tree_of(cfg, max_len, CACHE_AXES, slot, groups, stacked), tokens=slot, steps=slot, keys=("slots", "key_data"),
        params=SlotParams(*(slot for _ in SlotParams._fields)), wants_logprobs=slot,
        seen=("slots", "sampled_vocab"), counts=("slots", "sampled_vocab"), banned=("slots", "vocab_bits"))


class Sampled(NamedTuple):
    """What one program returns per sampled token: ids and the top-N logprobs of the raw model logits."""

    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillRows:
    """Host arrays for one prefill call: B rows of T tokens holding up to P prompts packed end to end
    (padding tokens: segment P; padding prompts: slot S, dropped)."""

    tokens: np.ndarray  # i32[B,T]
    positions: np.ndarray  # i32[B,T] position of each token within its prompt
    segments: np.ndarray  # i32[B,T] the prompt each token belongs to (attention stays inside a prompt)
    lengths: np.ndarray  # i32[P]
    last: np.ndarray  # i32[P] flat index (row * T + column) of each prompt's last token
    slots: np.ndarray  # i32[P]
    params: SlotParams  # each [P]
    keys: np.ndarray  # u32[P,2]
    wants_logprobs: np.ndarray  # bool[P]
    source: np.ndarray  # i32[P] the prompt whose tokens this entry samples after (a fork: its leader's)
    banned: np.ndarray  # u32[P,W] each prompt's min_tokens bit set (engine.sampling.MinTokensBan)


def neutral_params(rows: int) -> SlotParams:
    """Parameters of idle or padding rows: greedy, every processor off (no division by a zero penalty)."""
    return slot_params([SamplingParams(temperature=0.0)] * rows)


def sample_step(logits, params: SlotParams, seen, counts, keys, steps, wants_logprobs, banned) -> Sampled:
    scores = process_logits(logits, params, seen, counts, steps, banned)
    tokens = sample(scores, keys, steps, params.temperature == 0)

    def with_logprobs(_):
        return tuple(top_logprobs(logits, tokens, MAX_LOGPROBS))

    def without(_):
        rows = logits.shape[0]
        return (jnp.zeros(rows, jnp.float32), jnp.zeros((rows, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((rows, MAX_LOGPROBS), jnp.float32))

    lp, top_ids, top_lp = jax.lax.cond(wants_logprobs.any(), with_logprobs, without, None)
    return Sampled(tokens, lp, top_ids, top_lp)


def mark_seen(seen, counts, tokens):
    # A one-hot compare, not a scatter: elementwise, so with slots sharded over `data` every device updates
    # its own rows with no collective (a scatter all-reduced [S/data, V] per step).
    hit = jnp.arange(seen.shape[1])[None, :] == tokens[:, None]
    return seen | hit, counts + hit.astype(counts.dtype)


def prefill_key(rows: PrefillRows) -> tuple[int, int, int]:
    """(rows, bucket, prompts): the shape of a prefill call."""
    return rows.tokens.shape + rows.slots.shape


def move_row(state: DecodeState, src, dst) -> DecodeState:
    """Row dst of every per-slot array (dim 0) takes row src, in place, the cache's lengths included; the
    cache's K/V pass through untouched (their rows move by the block copy, `engine.kv_copy.copy_blocks`, one
    program for both jobs: the K/V arrays are hundreds of buffers, each a kernel of its own)."""
    def row(a: jax.Array) -> jax.Array:
        return put_index(a, index_in(a, src, 0), dst, 0)

    rest = jax.tree.map(row, dataclasses.replace(state, cache=None))
    return dataclasses.replace(rest, cache=dataclasses.replace(state.cache, lengths=row(state.cache.lengths)))


def put_rows(slots, target, rows):
    return target.at[slots].set(rows.astype(target.dtype), mode="drop")


def store_prompt(state: DecodeState, cache: KVCache, rows: PrefillRows | ExtendRows, seen, slots) -> DecodeState:
    """The state after a prefill or extend call, but for the first tokens (`sample_first` writes those): each
    prompt's slot (`slots`, indices into `state`; out of range: dropped) takes its cache length, key,
    parameters, min_tokens bit set and seen tokens."""
    put = functools.partial(put_rows, slots)
    return dataclasses.replace(
        state, cache=dataclasses.replace(cache, lengths=put(cache.lengths, rows.lengths)),
        steps=put(state.steps, jnp.ones(rows.slots.shape[0], jnp.int32)), keys=put(state.keys, rows.keys),
        params=SlotParams(*(put(a, r) for a, r in zip(state.params, rows.params))),
        wants_logprobs=put(state.wants_logprobs, rows.wants_logprobs), seen=put(state.seen, seen),
        banned=put(state.banned, rows.banned))


def sample_first(state: DecodeState, logits, slots) -> tuple[DecodeState, Sampled]:
    """The first token of each row's slot (`slots` i32[W]; out of range: a padding row, greedy and dropped),
    sampled from `logits` [W, V] with what `store_prompt` stored there (step 0, nothing generated yet), then
    stored: the slot's next token to feed, its seen tokens and generated-token counts."""
    s, (w, v) = state.tokens.shape[0], logits.shape
    valid, at = slots < s, jnp.minimum(slots, s - 1)
    params = SlotParams(*(jnp.where(valid, a[at], n) for a, n in zip(state.params, neutral_params(w))))
    seen, counts = state.seen[at], jnp.zeros((w, v), jnp.int32)
    out = sample_step(logits, params, seen, counts, state.keys[at], jnp.zeros(w, jnp.int32),
                      state.wants_logprobs[at] & valid, state.banned[at])
    seen, counts = mark_seen(seen, counts, out.tokens)
    put = functools.partial(put_rows, slots)
    return dataclasses.replace(state, tokens=put(state.tokens, out.tokens), seen=put(state.seen, seen),
                               counts=put(state.counts, counts)), out


def first_width(prompts: int, slots: int) -> int:
    """Rows of the first-token program (`sample_first`) for a call of `prompts` prompts (per data shard):
    the next power of 4, at most the shard's `slots`; so a few programs serve every prefill and extend."""
    width = 1
    while width < prompts:
        width *= 4
    return min(width, slots)


def first_rows(prompts: int, data: int, slots: int) -> np.ndarray:
    """Row of each of a prefill call's `prompts` entries in its first-token program's output: each data
    shard's part (of `slots` // `data` slots) is padded to its `first_width`."""
    local, i = prompts // data, np.arange(prompts)
    return (i // local) * first_width(local, slots // data) + i % local


def dummy_rows(size: int, bucket: int, prompts: int, num_slots: int, words: int) -> PrefillRows:
    """Padding-only rows (every slot index out of range): compiles a prefill program and changes nothing;
    `words`: u32 words of a min_tokens bit set (`MinTokensBan.words`)."""
    return PrefillRows(np.zeros((size, bucket), np.int32), np.zeros((size, bucket), np.int32),
                       np.full((size, bucket), prompts, np.int32), np.ones(prompts, np.int32),
                       np.zeros(prompts, np.int32), np.full(prompts, num_slots, np.int32), neutral_params(prompts),
                       np.zeros((prompts, 2), np.uint32), np.zeros(prompts, bool), np.arange(prompts, dtype=np.int32),
                       np.zeros((prompts, words), np.uint32))
