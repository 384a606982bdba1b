"""OpenAI `/v1/completions` wire format: request validation -> (prompts, SamplingParams); results -> JSON.

Requests: `prompt` is a string, a list of strings, a list of token ids or a list of token-id lists;
OpenAI's sampling fields (`max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`, `presence_penalty`,
`frequency_penalty`, `logprobs`, `echo`) plus the extras `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, and vLLM's extra fields (`launch.vllm_fields.split_extras`: `prompt_logprobs`, `min_tokens`,
...). `echo` puts the prompt before each choice's text and its tokens' logprobs before the generated ones
(`launch/completion_echo.py`; a stream echoes in each choice's first chunk); with echo, `max_tokens` may
be 0 (the prompt alone). Features this engine lacks (`suffix`, `logit_bias`, `best_of != n`) are rejected
by name; unknown fields are ignored with a warning in the log, as vLLM does.

Invariant: every rejection is an `ApiError` whose `param` names the offending request field, so the
server can answer OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.
Choice indices are prompt-major: choice `i * n + j` is sample j of prompt i.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence

from engine.request_stream import Delta
from engine.requests import Completion, TokenLogprob
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from launch.completion_echo import echo_entries, echo_logprobs, prompt_text, vllm_prompt_logprobs
from launch.vllm_fields import split_extras

MAX_CHOICES = 256  # prompts x n per request: bounds the work one HTTP request can queue
# OpenAI field -> SamplingParams field; None: handled here, not a SamplingParams field
SAMPLING_FIELDS = {
    "max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop",
    "seed": "seed", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "logprobs": "logprobs", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
}
OTHER_FIELDS = ("model", "prompt", "stream", "stream_options", "user", "echo", "suffix", "logit_bias", "best_of")
# field -> the only values accepted (anything else asks for a feature this engine does not have)
NEUTRAL = {"suffix": (None, ""), "logit_bias": (None, {})}
OPENAI_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """A request the server answers with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM): usage on every chunk
    prompt_logprobs: bool = False  # asked for vLLM's prompt_logprobs field (echo alone computes them unshown)


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param is not None else message, param)


def parse_completion_request(body: object) -> CompletionRequest:
    """Validate a decoded JSON body; ApiError(400) naming the first bad field."""
    if not isinstance(body, Mapping):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        body, extras = split_extras(body, set(SAMPLING_FIELDS) | set(OTHER_FIELDS))
    except ValueError as e:
        raise bad_field(str(e)) from None
    for field, allowed in NEUTRAL.items():
        if field in body and body[field] not in allowed:
            raise bad(field, f"{body[field]!r} is not supported by this engine; omit it")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"expected a string, got {type(model).__name__}")
    prompts = parse_prompts(body.get("prompt"))
    echo = _echo(body)
    params = sampling_params(body, extras, echo)
    if body.get("best_of") not in (None, params.n):
        raise bad("best_of", f"{body['best_of']!r} is not supported; only best_of == n (no re-ranking)")
    if len(prompts) * params.n > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x n={params.n} is {len(prompts) * params.n} completions; "
                       f"at most {MAX_CHOICES} per request")
    stream, include_usage, continuous = _stream_fields(body)
    return CompletionRequest(model, prompts, params, stream, include_usage, echo, continuous,
                             "prompt_logprobs" in extras)


def _echo(body: Mapping) -> bool:
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise bad("echo", f"expected a boolean, got {_short(echo)}")
    return echo


def parse_prompts(prompt: object) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists -> list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "expected a string, a list of strings, a list of token ids or a list of token-id "
                            f"lists (non-empty), got {_short(prompt)}")
    if all(_is_int(t) for t in prompt):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        return list(prompt)
    raise bad("prompt", f"mixed or invalid prompt list {_short(prompt)}: use strings only, ints only, or "
                        "non-empty lists of ints only")


def sampling_params(body: Mapping, extras: Mapping | None = None, echo: bool = False) -> SamplingParams:
    """SamplingParams of a request; with `echo` and `logprobs`, prompt_logprobs is at least logprobs, and
    `max_tokens` 0 means prompt scoring only."""
    fields = {name: body[key] for key, name in SAMPLING_FIELDS.items() if body.get(key) is not None}
    fields.update(extras or {})
    fields.setdefault("max_new_tokens", OPENAI_DEFAULT_MAX_TOKENS)
    if echo and _is_int(fields.get("logprobs")) and _is_int(fields.get("prompt_logprobs", 0)):
        fields["prompt_logprobs"] = max(fields["logprobs"], fields.get("prompt_logprobs") or 0)
    if echo and fields["max_new_tokens"] == 0:
        fields.setdefault("prompt_logprobs", 0)
    stop = fields.get("stop", [])
    if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise bad("stop", f"expected a string or a list of strings, got {_short(stop)}")
    if not isinstance(fields.get("stop_token_ids", []), list):
        raise bad("stop_token_ids", f"expected a list of ints, got {_short(fields['stop_token_ids'])}")
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise bad_field(str(e).removeprefix("SamplingParams.")) from None


def bad_field(message: str) -> ApiError:
    """An engine ValueError ('field: problem') as a 400 naming the OpenAI field."""
    field, _, problem = message.partition(": ")
    openai_names = {v: k for k, v in SAMPLING_FIELDS.items()} | {"prompt_token_ids": "prompt"}
    if not problem or " " in field:
        return bad(None, message)
    return bad(openai_names.get(field, field), problem)


def _stream_fields(body: Mapping) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats)."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream", f"expected a boolean, got {_short(stream)}")
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        raise bad("stream_options", "only allowed when stream is true")
    flags = ("include_usage", "continuous_usage_stats")
    if not isinstance(options, Mapping) or set(options) - set(flags) or \
            not all(isinstance(options.get(f, False), bool) for f in flags):
        raise bad("stream_options", f"expected {{'include_usage': bool, 'continuous_usage_stats': bool}}, "
                                    f"got {_short(options)}")
    return stream, options.get("include_usage", False), options.get("continuous_usage_stats", False)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- responses -----------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def token_text(token_id: int, tokenizer: Tokenizer | None) -> str:
    """A token's own text (a lone byte of a multi-byte character shows as U+FFFD), or its id without a tokenizer."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def logprobs_payload(entries: Sequence[TokenLogprob], tokenizer: Tokenizer | None, offset: int = 0) -> dict:
    """OpenAI legacy completions logprobs; `text_offset` counts from `offset` (the choice's text so far)."""
    tokens = [token_text(e.token_id, tokenizer) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t, tokenizer): v for t, v in e.top} for e in entries],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, choices: Mapping[int, Completion], n: int,
                    tokenizer: Tokenizer | None, echo: bool = False, prompt_logprobs: bool = False) -> dict:
    """The non-streaming response; `choices` maps choice index -> Completion; prompts counted once."""
    ordered = [choices[i] for i in sorted(choices)]
    prompt_tokens = sum(len(c.prompt_token_ids) for c in ordered[::n])
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, **choice_fields(c, tokenizer, echo, prompt_logprobs)}
                    for i, c in zip(sorted(choices), ordered)],
        "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in ordered)),
    }


def choice_fields(c: Completion, tokenizer: Tokenizer | None, echo: bool, prompt_logprobs: bool) -> dict:
    """text, finish_reason, logprobs (and vLLM's prompt_logprobs when asked for) of one choice."""
    if c.logprobs is None:
        logprobs = None
    elif echo:
        logprobs = echo_logprobs(c, tokenizer, logprobs_payload)
    else:
        logprobs = logprobs_payload(c.logprobs, tokenizer)
    out = {"text": prompt_text(c.prompt_token_ids, tokenizer) + c.text if echo else c.text, "finish_reason": c.finish_reason,
           "logprobs": logprobs}
    if prompt_logprobs and c.prompt_logprobs is not None:
        out["prompt_logprobs"] = vllm_prompt_logprobs(c.prompt_logprobs, tokenizer, token_text)
    return out


def stream_choice(delta: Delta, tokenizer: Tokenizer | None, offsets: dict[int, int],
                  echo: list[int] | None = None) -> dict | None:
    """One choice of a stream chunk, or None when the delta carries no token (a chunk per step, even when
    its text is held back: clients see every token's arrival). `offsets`: each choice's logprob text so
    far. `echo`: the prompt, on the choice's first delta of an echo request: the chunk starts with the
    prompt's text and logprobs (`launch.completion_echo`)."""
    if echo is None and not delta.text and delta.finish_reason is None and not delta.token_ids:
        return None
    logprobs, offset = None, offsets.get(delta.index, 0)
    if delta.logprobs is not None and echo is not None:
        logprobs = echo_entries(echo, delta.prompt_logprobs, delta.logprobs, tokenizer, logprobs_payload)
    elif delta.logprobs is not None:
        logprobs = logprobs_payload(delta.logprobs, tokenizer, offset)
    if logprobs is not None:
        offsets[delta.index] = offset + sum(len(t) for t in logprobs["tokens"])
    text = delta.text if echo is None else prompt_text(echo, tokenizer) + delta.text
    return {"index": delta.index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}


def stream_chunk(cid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """One `text_completion` chunk (OpenAI streams use the same object name as full responses)."""
    chunk = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
