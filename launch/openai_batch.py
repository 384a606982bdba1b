"""OpenAI batch-API lines (`/v1/completions`): request line -> `Job`, completions -> OpenAI output line.

Input:  `{"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"model": ..., "prompt": ...,
         "max_tokens": 16, "temperature": 1, "top_p": 1, "n": 1, "stop": ..., "seed": ..., "logprobs": ...}}`.
The body may also carry any `SamplingParams` field (top_k, min_p, repetition_penalty, ignore_eos, ...);
`model` and `user` are accepted and ignored (the job's --model answers). Features this engine lacks
(echo, suffix, best_of != n, logit_bias, stream) are rejected by name rather than silently ignored.
Output: `{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body":
<text_completion>}, "error": null}`; a bad line: `{"id", "custom_id", "response": null, "error": {"code",
"message"}}`.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence

from engine.requests import Completion, TokenLogprob
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from launch.jsonl import ALIASES, PARAM_FIELDS, Job, Line, checked_text, sampling_params

COMPLETIONS_URL = "/v1/completions"
IGNORED = ("model", "user")
# field -> the only values accepted (anything else asks for a feature this engine does not have)
NEUTRAL = {"echo": (False, None), "stream": (False, None), "suffix": (None, ""), "logit_bias": (None, {})}
LINE_FIELDS = ("custom_id", "method", "url", "body")


def openai_job(line: Line, defaults: SamplingParams, base_seed: int | None) -> Job:
    obj = line.obj
    unknown = sorted(k for k in obj if k not in LINE_FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field of an OpenAI batch line; expected {', '.join(LINE_FIELDS)}")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"method: expected 'POST', got {obj['method']!r}")
    if obj.get("url", COMPLETIONS_URL) != COMPLETIONS_URL:
        raise ValueError(f"url: {obj['url']!r} is not supported; this engine answers only {COMPLETIONS_URL!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError(f"body: expected a JSON object with the completion request, got {type(body).__name__}")
    overrides = _body_params(body)
    return Job(line, body_prompt(body), sampling_params(overrides, defaults, line.key, base_seed))


def _body_params(body: Mapping) -> dict:
    known = set(PARAM_FIELDS) | set(ALIASES) | set(IGNORED) | set(NEUTRAL) | {"prompt", "best_of"}
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise ValueError(f"body.{unknown[0]}: unknown or unsupported completion parameter")
    for field, allowed in NEUTRAL.items():
        if field in body and body[field] not in allowed:
            raise ValueError(f"body.{field}: {body[field]!r} is not supported by this engine; omit it")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ValueError(f"body.best_of: {best_of!r} is not supported; only best_of == n (no re-ranking)")
    return {k: v for k, v in body.items() if k in PARAM_FIELDS or k in ALIASES}


def body_prompt(body: Mapping) -> str | list[int]:
    """One prompt: a string, a list of token ids, or a one-element list of either."""
    if "prompt" not in body:
        raise ValueError("body.prompt: missing; expected a string or a list of token ids")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ValueError(f"body.prompt: a list of {len(prompt)} prompts; put one prompt per batch line")
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"body.prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
    return checked_text(prompt, "body.prompt") if isinstance(prompt, str) else prompt


def openai_output(line: Line, completions: Sequence[Completion], model: str, tokenizer: Tokenizer | None) -> dict:
    prompt_tokens = len(completions[0].prompt_token_ids)
    generated = sum(len(c.token_ids) for c in completions)
    body = {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": None if c.logprobs is None else _logprobs(c.logprobs, tokenizer)}
                    for c in completions],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                  "total_tokens": prompt_tokens + generated},
    }
    response = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}
    return {"id": _batch_id(), "custom_id": line.ident, "response": response, "error": None}


def _logprobs(entries: Sequence[TokenLogprob], tokenizer: Tokenizer | None) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists, offsets into the generated text."""
    tokens = [token_text(e.token_id, tokenizer) for e in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t, tokenizer): v for t, v in e.top} for e in entries],
            "text_offset": offsets}


def token_text(token_id: int, tokenizer: Tokenizer | None) -> str:
    """A token's own text (a lone byte of a multi-byte character shows as U+FFFD), or its id without a tokenizer."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def openai_error(line: Line, message: str, code: str = "invalid_request") -> dict:
    return {"id": _batch_id(), "custom_id": line.ident, "response": None, "error": {"code": code, "message": message}}


def _batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
