"""The dataclasses the scheduler hands out: `Request` (mutated in place as tokens arrive), `DecodeBatch`
(one decode call) and `Update` (what one request accepted from one call). Plain Python, no JAX.
"""
from __future__ import annotations

import dataclasses

from engine.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request; mutated in place by the scheduler as tokens arrive."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    # duck-typed: push(token_id, check_stop=True) -> bool (True: a stop string matched; check_stop False,
    # before min_tokens: keep the text, look for no stop string)
    text_stream: object | None = None
    # The request's per-slot sampling row and PRNG key data, computed when it is made (opaque here).
    slot_row: object | None = None
    key_data: object | None = None
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_extras: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None  # set by the prefill of a `params.prompt_logprobs` request
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    slot: int | None = None
    arrival: int = -1  # admission order, set by Scheduler.add

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    window: int  # attention window: covers every decoded slot's cache length + decode_steps (capped)
    slots: tuple[int, ...]  # prefilled live slots, ascending
    num_slots: int = 0  # the call decodes slots [0, num_slots): one of decode_slot_counts, > max(slots)
    # Per slot of `slots`: the cache positions it reads up to in this call (derived from the slots'
    # requests, so not part of equality).
    reach: tuple[int, ...] = dataclasses.field(default=(), compare=False)


@dataclasses.dataclass
class Update:
    """The tokens one request accepted from one prefill or decode call (for streaming)."""
    request: Request
    new_token_ids: list[int]
    finished: bool
    new_extras: list = dataclasses.field(default_factory=list)
