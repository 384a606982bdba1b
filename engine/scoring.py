"""Prompt scoring: every packed prompt token's log-probability given the tokens before it, plus the top-N.

Device side (`score_packed`, traced inside the runner's scoring prefill program): the logits of every token
of a packed prefill call, f32 [B*T, V] in flat order (row * T + column), are log-softmaxed in float32 (the
raw model logits: no temperature or penalty, as vLLM's and OpenAI's prompt logprobs) and gathered at each
token's next token *within its segment*. A flat position whose next token belongs to another prompt, or
that is padding, has no next token: its entry is 0 and never read. Top-N is `MAX_LOGPROBS` wide (static);
the host keeps each request's first N.

Host side (`prompt_entries`): one prompt's list, `None` for its first token (nothing conditions it, as
vLLM and OpenAI), then one `TokenLogprob` per later token, read from the flat positions of its placement.
Pure functions of their inputs: a prompt packed with others scores exactly as alone.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.requests import TokenLogprob
from engine.sampling import MAX_LOGPROBS


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


def score_packed(logits: jax.Array, tokens: jax.Array, segments: jax.Array, prompts: int) -> Scored:
    """logits f32 [B*T, V] (padded vocab entries -inf) of every token of a packed call -> `Scored`."""
    following, valid = next_in_segment(tokens, segments, prompts)
    # log_softmax(x)[i] = x[i] - logsumexp(x): only the gathered entries and the top-N are ever read, so the
    # [B*T, V] log-softmax is never materialised (one pass over the logits instead of three).
    logits = logits.astype(jnp.float32)
    norm = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, following[:, None], axis=-1)[:, 0] - norm
    values, ids = jax.lax.top_k(logits, MAX_LOGPROBS)
    return Scored(jnp.where(valid, chosen, 0.0), ids.astype(jnp.int32), values - norm[:, None])


def prompt_entries(host: dict[str, np.ndarray], token_ids: list[int], start: int, n: int) -> list:
    """One prompt's prompt logprobs from the fetched `Scored` arrays (`host[field]`): the prompt occupies flat
    positions [start, start + len); entry j > 0 is read at start + j - 1; `n` (<= MAX_LOGPROBS) top entries."""
    out: list[TokenLogprob | None] = [None]
    for j in range(1, len(token_ids)):
        at = start + j - 1
        top = tuple((int(i), float(v)) for i, v in zip(host["top_ids"][at][:n], host["top_logprobs"][at][:n]))
        out.append(TokenLogprob(int(token_ids[j]), float(host["logprob"][at]), top))
    return out
