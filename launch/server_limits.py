"""What the OpenAI server refuses before any work is done: sizes, counts, time, and who may call it.

`ServerLimits` holds every limit (the `--max-body-bytes` ... flags map 1:1 onto its fields). They act in
this order, each answered in OpenAI's error shape and counted in /metrics by status:
- connections beyond `limit_concurrency` get uvicorn's 503; a connection whose first request headers are
  not complete within `timeout_read` seconds, or idle longer than `timeout_keep_alive` between requests, is
  closed; request headers over `h11_max_incomplete_event_size` bytes get 400 (h11);
- `GuardMiddleware`: with `api_key` set, `/v1/*` needs `Authorization: Bearer <key>` (401; compared in
  constant time); a body over `max_body_bytes` gets 413, by its Content-Length before anything is read and
  by the bytes counted while reading (chunked bodies); a body not complete within `timeout_read` seconds
  gets 408;
- `check_request` (after JSON parsing, before tokenizing): a text prompt over `max_prompt_chars`
  characters, a token-id prompt over the context, more than `max_stop_strings` stop strings, one over
  `max_stop_chars` characters, or more than `max_stop_token_ids` stop token ids gets 400 naming the field;
- unknown paths and methods (404, 405) get OpenAI's error object instead of FastAPI's.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Callable

from launch.openai_api import ApiError, CompletionRequest, bad

CHARS_PER_POSITION = 64  # default max_prompt_chars per context position: GPT-2's longest token has 66


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 << 20
    max_prompt_chars: int | None = None  # None: CHARS_PER_POSITION x the engine's context
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256
    limit_concurrency: int | None = 1024
    timeout_keep_alive: int = 5
    timeout_read: float = 30.0
    h11_max_incomplete_event_size: int = 16 * 1024
    api_key: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "api_key" and value is not None and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 2**63):
                raise ValueError(f"{field.name}: expected a positive number, got {value!r}")
        if self.api_key == "":
            raise ValueError("api_key: expected a non-empty key or None")

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or CHARS_PER_POSITION * max_model_len


FLAGS: dict[str, dict] = {
    "max_body_bytes": dict(type=int, help="largest request body; larger ones get 413"),
    "max_prompt_chars": dict(type=int, help=f"longest text prompt, checked before tokenizing; None: "
                                            f"{CHARS_PER_POSITION} x the context length"),
    "max_stop_strings": dict(type=int, help="stop strings per request"),
    "max_stop_chars": dict(type=int, help="characters per stop string"),
    "max_stop_token_ids": dict(type=int, help="stop token ids per request"),
    "limit_concurrency": dict(type=int, help="open connections and requests; beyond it uvicorn answers 503"),
    "timeout_keep_alive": dict(type=int, help="seconds an idle keep-alive connection stays open"),
    "timeout_read": dict(type=float, help="seconds a client has to send request headers, and then its body (408)"),
    "h11_max_incomplete_event_size": dict(type=int, help="largest request head (line + headers) in bytes"),
    "api_key": dict(help="require 'Authorization: Bearer KEY' on /v1/*; None: $ENGINE_API_KEY if set, else open"),
}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server limits (ServerLimits fields)")
    for field, options in FLAGS.items():
        default = getattr(ServerLimits, field)
        group.add_argument("--" + field.replace("_", "-"), default=default, **options)


def limits_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, env_key: str | None) -> ServerLimits:
    """The ServerLimits of parsed flags (`env_key`: the API key from the environment, if --api-key is unset)."""
    fields = {f: getattr(args, f) for f in FLAGS}
    fields["api_key"] = fields["api_key"] or env_key or None
    try:
        return ServerLimits(**fields)
    except ValueError as e:
        field, _, problem = str(e).partition(":")
        parser.error(f"--{field.replace('_', '-')}:{problem}")


def uvicorn_options(limits: ServerLimits) -> dict:
    """Keyword arguments of `uvicorn.run` for the connection-level limits."""
    return dict(limit_concurrency=limits.limit_concurrency, timeout_keep_alive=limits.timeout_keep_alive,
                h11_max_incomplete_event_size=limits.h11_max_incomplete_event_size,
                http=header_timeout_protocol(limits.timeout_read))


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose first request head is not complete in time
    (uvicorn's own keep-alive timer starts only after a first response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.loop.call_later(timeout_s, self._close_if_no_request)

        def _close_if_no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def check_request(req: CompletionRequest, limits: ServerLimits, max_model_len: int) -> None:
    """ApiError(400) naming the field when a parsed request exceeds a limit; runs before tokenizing."""
    chars = limits.prompt_chars(max_model_len)
    for prompt in req.prompts:
        if isinstance(prompt, str) and len(prompt) > chars:
            raise bad("prompt", f"{len(prompt)} characters; at most {chars} (--max-prompt-chars)")
        if isinstance(prompt, list) and len(prompt) >= max_model_len:
            raise bad("prompt", f"{len(prompt)} tokens; at most {max_model_len - 1} fit the context")
    stop, ids = req.params.stop, req.params.stop_token_ids
    if len(stop) > limits.max_stop_strings:
        raise bad("stop", f"{len(stop)} stop strings; at most {limits.max_stop_strings} (--max-stop-strings)")
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_chars:
        raise bad("stop", f"a stop string of {longest} characters; at most {limits.max_stop_chars} "
                          f"(--max-stop-chars)")
    if len(ids) > limits.max_stop_token_ids:
        raise bad("stop_token_ids", f"{len(ids)} ids; at most {limits.max_stop_token_ids} (--max-stop-token-ids)")


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode()).digest()


class GuardMiddleware:
    """ASGI middleware: API key, body size and body read time (see the module docstring). The body is read
    here (at most max_body_bytes) and replayed to the app; later messages (a disconnect) pass through."""

    def __init__(self, app, limits: ServerLimits, on_reject: Callable[[int], None] = lambda status: None):
        self.app, self.limits, self.on_reject = app, limits, on_reject
        self._key = None if limits.api_key is None else _digest(limits.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_key(scope)
            self._check_length(scope)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive)
                if body is None:
                    return  # the client left before its body was complete: nobody to answer
                receive = _replay(body, receive)
        except ApiError as e:
            return await self._reject(send, e)
        await self.app(scope, receive, send)

    def _check_key(self, scope) -> None:
        if self._key is None or not scope["path"].startswith("/v1"):
            return
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if not (scheme.lower() == b"bearer" and secrets.compare_digest(_digest(token.strip()), self._key)):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_request_error", "invalid_api_key")

    def _check_length(self, scope) -> None:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            raise self._too_large(length.decode("latin-1")[:20])

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"request body of {size} bytes; at most {self.limits.max_body_bytes} "
                             f"(--max-body-bytes)", None, "invalid_request_error", "request_too_large")

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        deadline = time.monotonic() + self.limits.timeout_read
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.limits.timeout_read:g} s "
                                    f"(--timeout-read)", None, "invalid_request_error", "request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body_bytes:
                raise self._too_large(f"more than {self.limits.max_body_bytes}")
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(self, send, error: ApiError) -> None:
        self.on_reject(error.status)
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        if error.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A receive() that gives `body` once, then the client's own messages (e.g. http.disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install_guards(app, limits: ServerLimits, count: Callable[[int], None]) -> None:
    """Add `GuardMiddleware` and OpenAI-shaped framework errors to a FastAPI app; `count(status)` records
    every rejection."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app.add_middleware(GuardMiddleware, limits=limits, on_reject=count)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException) -> JSONResponse:
        count(exc.status_code)
        return JSONResponse(http_error_body(exc.status_code, exc.detail), status_code=exc.status_code,
                            headers=exc.headers)


def http_error_body(status: int, detail: object) -> dict:
    """OpenAI's error object for a framework error (unknown path 404, wrong method 405, ...)."""
    message = detail if isinstance(detail, str) else json.dumps(detail)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message, None, kind, {404: "not_found", 405: "method_not_allowed"}.get(status)).body()
