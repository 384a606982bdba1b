"""Batch-job lines: one JSON input line -> a validated `Job`; finished requests -> one JSON output line.

Two line formats share this module:
- native: `{"id": ..., "prompt": "..." | "prompt_token_ids": [...], <SamplingParams fields>..., "echo"?}`
  (`max_tokens` is an alias of `max_new_tokens`; `prompt_logprobs` adds the prompt tokens' logprobs to the
  output, null first; `echo` puts the prompt's text before the output text, and with `logprobs` also
  scores the prompt; with either, `max_tokens` 0 scores the prompt and generates nothing);
- OpenAI batch API: `{"custom_id": ..., "method": "POST", "url": "/v1/completions", "body": {...}}`,
  parsed and answered by `launch/openai_batch.py`.

Invariants:
- `read_line` never raises: a line that is not JSON or not an object comes back with `problem` set.
- Every line has a `key` that is also recoverable from its output line (`key_of_output`), so `--resume`
  can skip exactly the lines already answered: its explicit id or custom_id (typed), or, for a line
  without a usable one, its line number, which the output line then carries as `"line"`. The two kinds
  never collide: a line that is not JSON (output `"id": null, "line": N`) or has no id (output `"id": N,
  "line": N`) is answered once, whatever ids other lines give themselves.
- `native_job` / `openai_job` raise `ValueError` naming the offending field; nothing is queued before they pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

from engine.requests import Completion, TokenLogprob
from engine.sampling import SamplingParams
from launch.completion_echo import prompt_text

PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
ALIASES = {"max_tokens": "max_new_tokens"}
NATIVE_FIELDS = ("id", "prompt", "prompt_token_ids", "echo") + PARAM_FIELDS + tuple(ALIASES)


@dataclasses.dataclass(frozen=True)
class Line:
    """One raw input line: its position, its identity, and the parsed object or what was wrong."""

    line_no: int  # 0-based physical line number
    ident: object  # `id` (native, default line_no; None when unusable) or `custom_id` (OpenAI)
    openai: bool
    obj: Mapping | None = None
    problem: str | None = None  # set when the line is unusable before field validation
    explicit: bool = False  # ident is the line's own id / custom_id

    @property
    def key(self) -> str:
        """The resume key: the explicit id, else the line number (never equal to an explicit id's key)."""
        return make_key(self.ident, self.openai) if self.explicit else f"line:{self.line_no}"

    @property
    def seed_key(self) -> str:
        """What a line's default seed derives from (an id-less line: its line number as id, as always)."""
        return make_key(self.ident, self.openai)

    def id_fields(self) -> dict:
        """The identifying fields of the line's output: `id`, plus `line` when the id is not the line's own."""
        return {"id": self.ident} if self.explicit else {"id": self.ident, "line": self.line_no}


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated line, ready for `engine.requests.make`."""

    line: Line
    prompt: str | list[int]
    params: SamplingParams


def make_key(ident: object, openai: bool) -> str:
    """The resume key: distinguishes 3 from "3", and native ids from OpenAI custom_ids."""
    return ("custom_id:" if openai else "id:") + json.dumps(ident)


def key_of_output(obj: object) -> str:
    """The key of a line already written to the output (for --resume)."""
    if not isinstance(obj, Mapping) or not ("custom_id" in obj or "id" in obj):
        raise ValueError(f"not an output line of this tool (no 'id' or 'custom_id'): {str(obj)[:80]}")
    if "line" in obj and "custom_id" not in obj:
        return f"line:{obj['line']}"
    return make_key(obj["custom_id"], True) if "custom_id" in obj else make_key(obj["id"], False)


def read_line(raw: bytes, line_no: int) -> Line:
    """Decode and JSON-parse one line; find its id. Never raises."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Line(line_no, None, False, problem=f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return Line(line_no, None, False, problem=f"invalid JSON: {e.msg} (column {e.colno})")
    except (ValueError, RecursionError) as e:  # an int over 4300 digits, nesting deeper than Python's stack
        return Line(line_no, None, False, problem=f"invalid JSON: {type(e).__name__}: {str(e)[:80]}")
    if not isinstance(obj, dict):
        return Line(line_no, None, False, problem=f"expected a JSON object, got {type(obj).__name__}")
    openai = "custom_id" in obj
    if not (openai or "id" in obj):
        return Line(line_no, line_no, False, obj)
    ident = obj["custom_id"] if openai else obj["id"]
    if not _valid_ident(ident):
        field = "custom_id" if openai else "id"
        return Line(line_no, None, False, obj,
                    problem=f"{field}: expected a string or an int, got {json.dumps(ident)[:40]}")
    return Line(line_no, ident, openai, obj, explicit=True)


def _valid_ident(ident: object) -> bool:
    return isinstance(ident, str) or (isinstance(ident, int) and not isinstance(ident, bool))


def native_job(line: Line, defaults: SamplingParams, base_seed: int | None) -> Job:
    """Validate a native line: its prompt and per-line SamplingParams overrides."""
    obj = line.obj
    for field in ("body", "url", "method"):
        if field in obj:
            raise ValueError(f"{field}: looks like an OpenAI batch line but has no 'custom_id'; add one")
    unknown = sorted(k for k in obj if k not in NATIVE_FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field; expected 'prompt' or 'prompt_token_ids', 'id', "
                         f"'max_tokens' or a SamplingParams field ({', '.join(PARAM_FIELDS)})")
    prompt = native_prompt(obj)
    overrides = echo_overrides({k: v for k, v in obj.items() if k in PARAM_FIELDS or k in ALIASES},
                               line_echo(line))
    return Job(line, prompt, sampling_params(overrides, defaults, line.seed_key, base_seed))


def line_echo(line: Line) -> bool:
    """The line's `echo` (native: top level; OpenAI: in the body); ValueError unless a boolean."""
    obj = line.obj.get("body", {}) if line.openai else line.obj
    echo = obj.get("echo") if isinstance(obj, Mapping) else None
    if echo not in (None, True, False):
        raise ValueError(f"echo: expected a boolean, got {json.dumps(echo)[:40]}")
    return bool(echo)


def echo_overrides(overrides: dict, echo: bool) -> dict:
    """With echo: logprobs also score the prompt (prompt_logprobs >= logprobs); max_tokens 0 scores only."""
    if not echo:
        return overrides
    out, logprobs = dict(overrides), overrides.get("logprobs")
    if isinstance(logprobs, int) and isinstance(out.get("prompt_logprobs", 0), int):
        out["prompt_logprobs"] = max(logprobs, out.get("prompt_logprobs") or 0)
    if 0 in (out.get("max_tokens"), out.get("max_new_tokens")):
        out.setdefault("prompt_logprobs", 0)
    return out


def native_prompt(obj: Mapping) -> str | list[int]:
    has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_text and has_ids:
        raise ValueError("prompt: give either 'prompt' or 'prompt_token_ids', not both")
    if has_ids:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list):
            raise ValueError(f"prompt_token_ids: expected a list of ints, got {type(ids).__name__}")
        return ids  # ints and their range are checked by engine.requests
    if not has_text:
        raise ValueError("prompt: missing; expected 'prompt' (a string) or 'prompt_token_ids' (a list of ints)")
    if not isinstance(obj["prompt"], str):
        raise ValueError(f"prompt: expected a string, got {type(obj['prompt']).__name__} "
                         f"(token ids go in 'prompt_token_ids')")
    return checked_text(obj["prompt"], "prompt")


def checked_text(text: str, field: str) -> str:
    """JSON allows lone surrogates (\\ud800) that are not text; the tokenizer would fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field}: not valid Unicode text ({e.reason} at character {e.start})") from None
    return text


def sampling_params(overrides: Mapping, defaults: SamplingParams, key: str, base_seed: int | None) -> SamplingParams:
    """`defaults` with the line's overrides; a line without a seed gets one derived from base_seed + key."""
    fields, renamed = dict(overrides), {}
    for alias, name in ALIASES.items():
        if alias in fields:
            if name in fields:
                raise ValueError(f"{alias}: give either '{alias}' or '{name}', not both")
            fields[name], renamed[name] = fields.pop(alias), alias
    _check_sequences(fields)
    if fields.get("seed") is None and base_seed is not None:
        fields["seed"] = line_seed(base_seed, key)
    try:
        return dataclasses.replace(defaults, **fields)
    except ValueError as e:
        message = str(e).removeprefix("SamplingParams.")
        field = message.split(":", 1)[0]
        raise ValueError(renamed.get(field, field) + message[len(field):]) from None


def _check_sequences(fields: Mapping) -> None:
    """JSON types SamplingParams would otherwise fail on with a TypeError."""
    stop = fields.get("stop", [])
    if not isinstance(stop, (str, list)):
        raise ValueError(f"stop: expected a string or a list of strings, got {json.dumps(stop)[:40]}")
    if not isinstance(fields.get("stop_token_ids", []), list):
        raise ValueError(f"stop_token_ids: expected a list of ints, got {json.dumps(fields['stop_token_ids'])[:40]}")


def line_seed(base_seed: int, key: str) -> int:
    """A per-line seed from the job seed and the line's key: reproducible, also across --resume."""
    digest = hashlib.blake2b(f"{base_seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def native_output(line: Line, completions: Sequence[Completion], has_text: bool, tokenizer=None) -> dict:
    """One output object: flat for n == 1, with `choices` for n > 1; usage counts the prompt once."""
    first = completions[0]
    usage = {"prompt_tokens": len(first.prompt_token_ids),
             "completion_tokens": sum(len(c.token_ids) for c in completions)}
    echo = tokenizer if has_text and tokenizer is not None and line_echo(line) else None
    if len(completions) == 1:
        return {**line.id_fields(), **_choice(first, has_text, echo), "usage": usage}
    choices = [{"index": c.index, **_choice(c, has_text, echo)} for c in completions]
    return {**line.id_fields(), "choices": choices, "usage": usage}


def _choice(c: Completion, has_text: bool, echo=None) -> dict:
    """`echo`: None, or the tokenizer that gives the prompt's text to put before the output text."""
    text = (prompt_text(c.prompt_token_ids, echo) + c.text if echo is not None else c.text) if has_text else None
    out = {"text": text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        out["logprobs"] = [_logprob(lp) for lp in c.logprobs]
    if c.prompt_logprobs is not None:
        out["prompt_logprobs"] = [None if lp is None else _logprob(lp) for lp in c.prompt_logprobs]
    return out


def _logprob(lp: TokenLogprob) -> dict:
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t, v] for t, v in lp.top]}


def native_error(line: Line, message: str) -> dict:
    return {**line.id_fields(), "error": message}
