"""Per-request sampling parameters and their per-slot host arrays.

`SamplingParams` is the user-facing, validated description of how one request samples. Field names and
defaults follow vLLM / HF `generate`; every invalid value raises a `ValueError` naming the field and its
bound. Every number is finite and bounded (the constants below; bools, NaN, infinities and over-long ints are
rejected), so its per-slot float32/int32 row is finite: a request can never overflow inside a step.
`SlotParams` stacks one SamplingParams per slot into fixed-dtype arrays [S], the pytree the compiled
programs take, so a new value never recompiles. `MinTokensBan` gives each request the token ids that
`min_tokens` holds back (eos and its stop_token_ids) as a bit set over the padded vocab, one fixed-shape
row per slot. This module stays free of JAX (the scheduler imports it); the on-device processors and
sampler live in `engine/processors.py`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MAX_LOGPROBS = 20
MAX_INT = 2**63 - 1  # ints past any context or vocabulary size (max_new_tokens, top_k) are capped here
MAX_N = 1024
MAX_TOKEN_ID = 2**31 - 1
# Positive temperatures and repetition penalties stay where float32 scores cannot overflow or divide by 0.
TEMPERATURE_RANGE = (1e-4, 100.0)
REPETITION_PENALTY_RANGE = (1e-2, 100.0)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Bounds: max_new_tokens and top_k ints in [1 | 0, 2**63) (past the context /
    vocabulary they change nothing); temperature 0 (greedy) or in TEMPERATURE_RANGE; top_p (0, 1]; min_p
    [0, 1]; repetition_penalty in REPETITION_PENALTY_RANGE; presence/frequency penalties [-2, 2]; seed None
    or [0, 2**64); stop non-empty strings; stop_token_ids ints in [0, 2**31); n [1, MAX_N]; logprobs None
    or [0, MAX_LOGPROBS]; min_tokens an int in [0, max_new_tokens].

    `min_tokens` (vLLM's field; HF's `min_new_tokens`): until the request has generated that many tokens,
    eos and its stop_token_ids score -inf before sampling (eos even with `ignore_eos`, as vLLM) and stop
    strings are not looked for (a stop string completed by token `min_tokens` or later counts)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: the text keeps the stop string that ended it
    n: int = 1
    logprobs: int | None = None
    # Scoring (vLLM's name): the log-probability of every prompt token after the first, plus the top-N.
    prompt_logprobs: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for field, what in (("stop", "a string or a list of strings"), ("stop_token_ids", "a list of ints")):
            if not isinstance(getattr(self, field), (list, tuple)):
                raise ValueError(f"SamplingParams.{field}: expected {what}, got {_short(getattr(self, field))}")
            object.__setattr__(self, field, tuple(getattr(self, field)))
        for field, problem in _problems(self):
            raise ValueError(f"SamplingParams.{field}: {problem}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def int_in(value: object, low: int, high: int) -> bool:
    """An int (not a bool) in [low, high]: the check of every int field (the batch read-ahead's too)."""
    return _is_int(value) and low <= value <= high


def _num_in(value: object, low: float, high: float) -> bool:
    """A finite number (int or float, however large: compared exactly, never converted) in [low, high]."""
    return _is_num(value) and low <= value <= high


def _short(value: object) -> str:
    """repr cut to 60 characters; an int too long to print (over 4300 digits) is described instead."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def _problems(p: SamplingParams) -> list[tuple[str, str]]:
    """Every (field, what is wrong) pair; empty when the parameters are valid."""
    out = []

    def check(field: str, ok: bool, expected: str) -> None:
        if not ok:
            out.append((field, f"expected {expected}, got {_short(getattr(p, field))}"))

    t_low, t_high = TEMPERATURE_RANGE
    r_low, r_high = REPETITION_PENALTY_RANGE
    scoring_only = p.max_new_tokens == 0 and p.prompt_logprobs is not None
    check("max_new_tokens", int_in(p.max_new_tokens, 0 if scoring_only else 1, MAX_INT),
          "an int in [1, 2**63) (0 only with prompt_logprobs set: score the prompt, generate nothing)")
    check("temperature", _num_in(p.temperature, 0, 0) or _num_in(p.temperature, t_low, t_high),
          f"0 (greedy) or a number in [{t_low:g}, {t_high:g}]")
    check("top_k", int_in(p.top_k, 0, MAX_INT), "an int in [0, 2**63) (0 = off)")
    check("top_p", _num_in(p.top_p, 0, 1) and p.top_p > 0, "a number in (0, 1]")
    check("min_p", _num_in(p.min_p, 0, 1), "a number in [0, 1]")
    check("repetition_penalty", _num_in(p.repetition_penalty, r_low, r_high), f"a number in [{r_low:g}, {r_high:g}]")
    check("presence_penalty", _num_in(p.presence_penalty, -2, 2), "a number in [-2, 2]")
    check("frequency_penalty", _num_in(p.frequency_penalty, -2, 2), "a number in [-2, 2]")
    check("seed", p.seed is None or int_in(p.seed, 0, 2**64 - 1), "None or an int in [0, 2**64)")
    check("stop", all(isinstance(s, str) and s for s in p.stop), "non-empty strings")
    check("stop_token_ids", all(int_in(t, 0, MAX_TOKEN_ID) for t in p.stop_token_ids),
          f"ints in [0, {MAX_TOKEN_ID}]")
    check("ignore_eos", isinstance(p.ignore_eos, bool), "a bool")
    check("include_stop_str_in_output", isinstance(p.include_stop_str_in_output, bool), "a bool")
    check("n", int_in(p.n, 1, MAX_N), f"an int in [1, {MAX_N}]")
    most = p.max_new_tokens if _is_int(p.max_new_tokens) and p.max_new_tokens >= 0 else MAX_INT
    check("min_tokens", int_in(p.min_tokens, 0, most),
          f"an int in [0, {_short(most)}] (0 = off; at most max_new_tokens, the request's max tokens)")
    check("logprobs", p.logprobs is None or int_in(p.logprobs, 0, MAX_LOGPROBS),
          f"None or an int in [0, {MAX_LOGPROBS}]")
    check("prompt_logprobs", p.prompt_logprobs is None or (_is_int(p.prompt_logprobs)
                                                           and 0 <= p.prompt_logprobs <= MAX_LOGPROBS),
          f"None or an int in [0, {MAX_LOGPROBS}]")
    return out


def broadcast_params(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: None -> defaults, one -> repeated, a list -> checked for length."""
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"params: got {len(params)} SamplingParams for {count} prompts; pass one or one per prompt")
    return params


class SlotParams(NamedTuple):
    """Per-slot sampling parameters, each an array [S] (numpy on the host, traced inside jit).

    temperature 0 marks a greedy slot; top_k 0, top_p 1 and min_p 0 mean off.
    """

    temperature: np.ndarray  # f32[S]
    top_k: np.ndarray  # i32[S]
    top_p: np.ndarray  # f32[S]
    min_p: np.ndarray  # f32[S]
    repetition_penalty: np.ndarray  # f32[S]
    presence_penalty: np.ndarray  # f32[S]
    frequency_penalty: np.ndarray  # f32[S]
    min_tokens: np.ndarray  # i32[S] eos and stop ids are banned while a slot has generated fewer tokens


_INT32_MAX = 2**31 - 1


def slot_params(params: Sequence[SamplingParams]) -> SlotParams:
    """Stack one SamplingParams per slot (pad empty slots with `SamplingParams()`) into host arrays."""
    params = list(params)

    def column(field: str, dtype: type) -> np.ndarray:
        return np.array([getattr(p, field) for p in params], dtype=dtype).reshape(len(params))

    # Any top_k >= vocab size means off, so clipping to int32 changes nothing.
    top_k = np.array([min(p.top_k, _INT32_MAX) for p in params], dtype=np.int32).reshape(len(params))
    # Past the context (<= 1024 positions) a larger min_tokens bans nothing more.
    min_tokens = np.array([min(p.min_tokens, _INT32_MAX) for p in params], dtype=np.int32).reshape(len(params))
    row = SlotParams(
        temperature=column("temperature", np.float32),
        top_k=top_k,
        top_p=column("top_p", np.float32),
        min_p=column("min_p", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        min_tokens=min_tokens,
    )
    for field, values in zip(SlotParams._fields, row):
        if not np.all(np.isfinite(values)):  # SamplingParams' bounds rule this out; never let it reach a step
            raise ValueError(f"SamplingParams.{field}: {values.tolist()} is not finite as {values.dtype}")
    return row


@dataclasses.dataclass(frozen=True)
class MinTokensBan:
    """The token ids `min_tokens` holds back, per request, as a bit set over the padded vocab `vocab`:
    token t is bit t % 32 of word t // 32 of a u32[words] row. vLLM's rule: eos (even with `ignore_eos`)
    and the request's stop_token_ids; ids at or past `vocab` are never sampled, so never banned."""

    vocab: int  # padded vocab size V
    eos: int | None

    @property
    def words(self) -> int:
        return -(-self.vocab // 32)

    def rows(self, params: Sequence[SamplingParams | None]) -> np.ndarray:
        """u32[len(params), words]: each request's banned ids; zeros for None and for min_tokens 0."""
        out = np.zeros((len(params), self.words), np.uint32)
        for i, p in enumerate(params):
            if p is not None and p.min_tokens > 0:
                ids = np.array([t for t in (self.eos, *p.stop_token_ids) if t is not None and t < self.vocab],
                               np.int64)
                np.bitwise_or.at(out[i], ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
        return out


def seed_key_data(seed: int) -> np.ndarray:
    """Raw threefry key data uint32[2] for `seed`, computed on the host: [high 32 bits, low 32 bits].

    Equals `jax.random.key_data(jax.random.PRNGKey(seed))` under 64-bit mode for seeds below 2**63 and
    in any mode for seeds below 2**32 (32-bit mode JAX drops the high word; we keep all 64 bits).
    """
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < 2**64):
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    seed = int(seed)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
