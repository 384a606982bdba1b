"""OpenAI batch-API lines (`/v1/completions`): request line -> `Job`, completions -> OpenAI output line.

Input:  `{"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"model": ..., "prompt": ...,
         "max_tokens": 16, "temperature": 1, "top_p": 1, "n": 1, "stop": ..., "seed": ..., "logprobs": ...}}`.
The body may also carry any `SamplingParams` field (top_k, min_p, repetition_penalty, ignore_eos, ...);
`model` and `user` are accepted and ignored (the job's --model answers); `echo` (and `prompt_logprobs`)
as in the server (`launch/completion_echo.py`). Features this engine lacks (suffix, best_of != n,
logit_bias, stream) are rejected by name rather than silently ignored.
Output: `{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body":
<text_completion>}, "error": null}`; a bad line: `{"id", "custom_id", "response": null, "error": {"code",
"message"}}`.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from engine.requests import Completion
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from launch.jsonl import ALIASES, PARAM_FIELDS, Job, Line, checked_text, echo_overrides, line_echo, sampling_params
from launch.openai_api import completion_body, new_completion_id

COMPLETIONS_URL = "/v1/completions"
IGNORED = ("model", "user")
# field -> the only values accepted (anything else asks for a feature this engine does not have)
NEUTRAL = {"stream": (False, None), "suffix": (None, ""), "logit_bias": (None, {})}
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
    overrides = echo_overrides(_body_params(body), line_echo(line))
    return Job(line, body_prompt(body), sampling_params(overrides, defaults, line.seed_key, base_seed))


def _body_params(body: Mapping) -> dict:
    known = set(PARAM_FIELDS) | set(ALIASES) | set(IGNORED) | set(NEUTRAL) | {"prompt", "best_of", "echo"}
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
    """The line's `text_completion` (the server's response body) wrapped in a batch output line; `completions`
    are the n samples of the line's one prompt."""
    choices = {c.index: c for c in completions}
    asked = line.obj["body"].get("prompt_logprobs") is not None
    body = completion_body(new_completion_id(), model, choices, len(completions), tokenizer, line_echo(line), asked)
    response = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}
    return {"id": _batch_id(), "custom_id": line.ident, "response": response, "error": None}


def openai_error(line: Line, message: str, code: str = "invalid_request") -> dict:
    return {"id": _batch_id(), "custom_id": line.ident, "response": None, "error": {"code": code, "message": message}}


def _batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
