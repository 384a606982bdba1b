"""Prompt scoring: every packed prompt token's log-probability given the tokens before it, plus the top-N.

Device side (`score_packed`, traced inside the runner's scoring prefill program): from the final hidden
states of every token of a packed prefill call, [B*T, D] in flat order (row * T + column), the LM head
runs `SCORE_CHUNK` tokens at a time (`lax.map`), so the [B*T, V] logits are never materialised: each
chunk's logits are reduced to a float32 logsumexp (the raw model logits: no temperature or penalty, as
vLLM's and OpenAI's prompt logprobs) and gathered at each token's next token *within its segment*. A flat
position whose next token belongs to another prompt, or that is padding, has no next token: its entry is
0 and never read. The top-N arrays are `MAX_LOGPROBS` wide (static); what fills them depends on `top`, the
largest N asked in the call: nothing for 0, the argmax for 1 (lm-eval's `is_greedy`), `lax.top_k` beyond
(on CPU, top_k over the vocab costs about a tenth of the chunk's LM head). The host keeps each request's
first N.

Host side (`prompt_entries`): one prompt's list, `None` for its first token (nothing conditions it, as
vLLM and OpenAI), then one `TokenLogprob` per later token, read from the flat positions of its placement.
Pure functions of their inputs: a prompt packed with others scores exactly as alone.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.requests import TokenLogprob
from engine.sampling import MAX_LOGPROBS

SCORE_CHUNK = 256  # tokens whose logits exist at once: [256, V] f32 is 51 MB for GPT-2's vocab


class Scored(NamedTuple):
    """Per flat token position i of a prefill call: the logprob of token i+1 of the same prompt."""

    logprob: jax.Array  # f32[B*T]
    top_ids: jax.Array  # i32[B*T, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[B*T, MAX_LOGPROBS], descending; lower token id first among equals


def next_in_segment(tokens: jax.Array, segments: jax.Array, prompts: int) -> tuple[jax.Array, jax.Array]:
    """tokens/segments [B,T] -> (next token id [B*T], has one [B*T]): the token at flat i + 1 when it belongs
    to the same real prompt (segment < `prompts`; a prompt never spans rows, so row ends never match)."""
    flat_tokens, flat_segments = tokens.reshape(-1), segments.reshape(-1)
    following = jnp.concatenate([flat_tokens[1:], jnp.zeros(1, flat_tokens.dtype)])
    same = jnp.concatenate([flat_segments[1:] == flat_segments[:-1], jnp.zeros(1, bool)])
    return following.astype(jnp.int32), same & (flat_segments < prompts)


def score_packed(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                 segments: jax.Array, prompts: int, top: jax.Array) -> Scored:
    """hidden [B*T, D] (after ln_f) of every token of a packed call; `head` maps hidden [C, D] to logits
    f32 [C, V] (padded vocab entries -inf); `top` i32 [] the largest N asked -> `Scored`."""
    following, valid = next_in_segment(tokens, segments, prompts)
    n = hidden.shape[0]
    size = min(n, SCORE_CHUNK)
    chunks = -(-n // size)
    pad = chunks * size - n  # padded rows are scored like any other and sliced off
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(chunks, size, -1)
    following = jnp.pad(following, (0, pad)).reshape(chunks, size)
    branch = jnp.minimum(top, 2)  # 0: no top entries, 1: the argmax, 2: top_k

    def chunk(args):
        h, nxt = args
        logits = head(h).astype(jnp.float32)
        # log_softmax(x)[i] = x[i] - logsumexp(x): only gathered entries and the top-N are read.
        norm = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, nxt[:, None], axis=-1)[:, 0] - norm
        values, ids = jax.lax.switch(branch, (_no_top, _top_one, _top_k), logits)
        return chosen, ids, values - norm[:, None]

    chosen, ids, top_logprobs = (a.reshape(chunks * size, *a.shape[2:])[:n]
                                 for a in jax.lax.map(chunk, (hidden, following)))
    return Scored(jnp.where(valid, chosen, 0.0), ids, top_logprobs)


def _no_top(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = logits.shape[0]
    return jnp.zeros((rows, MAX_LOGPROBS), jnp.float32), jnp.zeros((rows, MAX_LOGPROBS), jnp.int32)


def _top_one(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The largest logit and its lowest token id among equals (as `lax.top_k`), in column 0."""
    best = logits.max(axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    first = jnp.min(jnp.where(logits == best, ids, logits.shape[1]), axis=-1, keepdims=True)
    values, zeros = _no_top(logits)
    return values.at[:, :1].set(best), zeros.at[:, :1].set(first)


def _top_k(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    values, ids = jax.lax.top_k(logits, MAX_LOGPROBS)
    return values, ids.astype(jnp.int32)


def prompt_entries(host: dict[str, np.ndarray], token_ids: list[int], start: int, n: int) -> list:
    """One prompt's prompt logprobs from the fetched `Scored` arrays (`host[field]`): the prompt occupies flat
    positions [start, start + len); entry j > 0 is read at start + j - 1; `n` (<= MAX_LOGPROBS) top entries."""
    out: list[TokenLogprob | None] = [None]
    for j in range(1, len(token_ids)):
        at = start + j - 1
        top = tuple((int(i), float(v)) for i, v in zip(host["top_ids"][at][:n], host["top_logprobs"][at][:n]))
        out.append(TokenLogprob(int(token_ids[j]), float(host["logprob"][at]), top))
    return out
