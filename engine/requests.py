"""From user prompts to scheduler `Request`s, and from finished requests to `Completion`s.

Owns prompt validation (token ids in range, length within the context), tokenisation, seeds (a request
without a seed gets one from the engine's generator; sample i > 0 of `n` gets a seed derived from the
request's), and the result dataclasses.

Invariant: a request's sampling parameters become its per-slot host row (`slot_params`) and its seed its
PRNG key data when it is made, here, so a value that cannot be represented fails the submission with a
ValueError; a step only copies these rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Sequence

import numpy as np

from engine.config import GPT2Config
from engine.sampling import SamplingParams, seed_key_data, slot_params
from engine.scheduler import Request
from engine.tokenizer import TextStream, Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one generated token under the model, and the top-N alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # sample index within its prompt (n > 1)
    request_id: str = ""
    error: str | None = None  # set (with finish_reason "error") when this request failed alone
    # With `prompt_logprobs`: None for the first prompt token, then one entry per later prompt token.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class RequestError(RuntimeError):
    """One request failed while it ran (the engine goes on serving the others)."""


def derive_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request seeded `seed`; sample 0 keeps the request's own seed."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RequestFactory:
    def __init__(self, cfg: GPT2Config, tokenizer: Tokenizer | None, max_seq_len: int, seed: int | None):
        self.cfg, self.tokenizer, self.max_seq_len = cfg, tokenizer, max_seq_len
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()

    def check_token_ids(self, ids: list, field: str, limit: int) -> list[int]:
        if not ids:
            raise ValueError(f"{field}: the prompt is empty; expected at least one token")
        if len(ids) > limit:  # before looking at each id: a huge list is refused at the cost of len()
            raise ValueError(f"{field}: the prompt has {len(ids)} tokens; at most {limit} fit "
                             f"(context {self.max_seq_len} positions, one kept for a new token)")
        bad = next((i for i, t in enumerate(ids) if not isinstance(t, (int, np.integer)) or isinstance(t, bool)
                    or not 0 <= t < self.cfg.vocab_size), None)  # an index: the bad value may be None itself
        if bad is not None:
            raise ValueError(f"{field}: token id {_short(ids[bad])} is out of range; expected ints in "
                             f"[0, {self.cfg.vocab_size})")
        return [int(t) for t in ids]

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; pass tokenizer= or token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON allows lone surrogates (\ud800); they are not text
                raise ValueError(f"prompt: not valid Unicode text ({e.reason} at character {e.start})") from None
            ids = self.tokenizer.encode(prompt)
            field = "prompt"
        else:
            ids, field = list(prompt), "prompt_token_ids"
        return self.check_token_ids(ids, field, limit=self.max_seq_len - 1)

    def make(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None) -> list[Request]:
        """The n requests of one prompt (ids `<id>` for n=1, `<id>-<i>` otherwise)."""
        ids = self.prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer; use stop_token_ids or pass tokenizer=")
        rid = str(next(self._ids)) if request_id is None else request_id
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63))
        requests = [
            Request(request_id=rid if params.n == 1 else f"{rid}-{i}", prompt_token_ids=ids, params=params,
                    seed=derive_seed(seed, i), text_stream=self._stream(params))
            for i in range(params.n)
        ]
        for req in requests:
            attach_rows(req)
        return requests

    def _stream(self, params: SamplingParams) -> TextStream | None:
        return None if self.tokenizer is None else TextStream(self.tokenizer, params.stop,
                                                                   params.include_stop_str_in_output)


def attach_rows(req: Request) -> Request:
    """Give `req` its per-slot sampling row and PRNG key data (kept if already there)."""
    if req.slot_row is None:
        req.slot_row = slot_params([req.params])
    if req.key_data is None:
        req.key_data = seed_key_data(req.seed)
    return req


def _short(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an int of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def completion_of(req: Request, tokenizer: Tokenizer | None) -> Completion:
    """The user-facing result of a finished request (a failed one: finish_reason "error", no text)."""
    text = ""
    if req.text_stream is not None and req.finish_reason != "error":  # a failed request's stream may be the cause
        if not req.text_stream.stopped:
            req.text_stream.finish()
        text = req.text_stream.text
    logprobs = list(req.output_extras) if req.params.logprobs is not None else None
    index = int(req.request_id.rsplit("-", 1)[1]) if req.params.n > 1 else 0
    return Completion(text=text, token_ids=list(req.output_token_ids), prompt_token_ids=list(req.prompt_token_ids),
                      finish_reason=req.finish_reason, logprobs=logprobs, index=index, request_id=req.request_id,
                      error=req.error, prompt_logprobs=req.prompt_logprobs)


def as_prompt_list(prompts) -> list:
    """One prompt (text or token ids) or a list of them -> a non-empty list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and _is_token(prompts[0])):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    return prompts


def _is_token(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
