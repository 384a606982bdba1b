"""`launch/server_limits.py` in process: the ASGI guard (API key, body size, body read time, replay), the
request bounds checked before tokenizing, and the flags. No engine, no sockets (the loopback storm in
`tests/test_serve.py` covers the running server)."""
from __future__ import annotations

import asyncio
import json

import pytest

from engine.sampling import SamplingParams
from launch.openai_api import ApiError, CompletionRequest
from launch.server_limits import GuardMiddleware, ServerLimits, check_request, http_error_body, uvicorn_options

KEY = "s3cret"


async def echo_app(scope, receive, send) -> None:
    """Answers 200 with the body it read and the type of the message that followed it."""
    body = (await receive())["body"]
    after = (await receive())["type"] if scope["method"] == "POST" else None
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"body": body.decode(), "after": after}).encode()})


def call(messages: list[dict | float], headers: dict | None = None, path: str = "/v1/completions",
         method: str = "POST", **limits) -> tuple[int, dict]:
    """Drive GuardMiddleware(echo_app) with client messages (a float: stall that many seconds first)."""
    rejected = []
    guard = GuardMiddleware(echo_app, ServerLimits(**limits), rejected.append)
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    queue, sent = list(messages) + [{"type": "http.disconnect"}], []

    async def receive():
        item = queue.pop(0)
        while isinstance(item, float):
            await asyncio.sleep(item)
            item = queue.pop(0)
        return item

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    status, body = sent[0]["status"], json.loads(sent[1]["body"])
    assert rejected == ([status] if status != 200 else [])
    return status, body


def chunk(data: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_api_key_is_required_on_v1_only_and_compared_exactly():
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                 {"Authorization": f"Bearer {KEY}x"}):
        status, body = call([chunk(b"{}")], auth, api_key=KEY)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call([chunk(b"{}")], {"Authorization": f"Bearer {KEY}"}, api_key=KEY)[0] == 200
    assert call([chunk(b"")], path="/health", method="GET", api_key=KEY)[0] == 200


def test_body_size_by_length_and_by_counted_bytes():
    status, body = call([chunk(b"x")], {"Content-Length": str(10**12)}, max_body_bytes=100)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert call([chunk(b"x")], {"Content-Length": "-5"}, max_body_bytes=100)[0] == 413
    status, _ = call([chunk(b"a" * 60, True), chunk(b"a" * 60, True), chunk(b"")], max_body_bytes=100)
    assert status == 413  # chunked: no Content-Length, refused once 100 bytes were counted


def test_slow_body_gets_408_and_a_whole_body_is_replayed_once():
    status, body = call([chunk(b'{"a"', True), 0.5, chunk(b"}")], timeout_read=0.2)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    status, body = call([chunk(b'{"a"', True), chunk(b": 1}")], max_body_bytes=12)
    assert status == 200 and body == {"body": '{"a": 1}', "after": "http.disconnect"}


def request(prompts, **params) -> CompletionRequest:
    return CompletionRequest(None, prompts, SamplingParams(**params), False, False)


@pytest.mark.parametrize("req, param", [
    (request(["x" * 101]), "prompt"), (request([[1] * 64]), "prompt"), (request(["x"], stop=["a"] * 3), "stop"),
    (request(["x"], stop=["a" * 5]), "stop"), (request(["x"], stop_token_ids=[1, 2, 3]), "stop_token_ids"),
])
def test_request_bounds_name_the_field(req, param):
    limits = ServerLimits(max_prompt_chars=100, max_stop_strings=2, max_stop_chars=4, max_stop_token_ids=2)
    with pytest.raises(ApiError) as e:
        check_request(req, limits, max_model_len=64)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(f"{param}: ")
    check_request(request(["x" * 100, [1] * 63], stop=["abcd"] * 2, stop_token_ids=[1, 2]), limits, 64)


def test_defaults_flags_and_error_shapes():
    assert ServerLimits().prompt_chars(1024) == 64 * 1024
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServerLimits(max_body_bytes=0)
    options = uvicorn_options(ServerLimits(limit_concurrency=7))
    assert options["limit_concurrency"] == 7 and options["timeout_keep_alive"] == 5
    assert http_error_body(404, "Not Found") == {"error": {"message": "Not Found", "type": "invalid_request_error",
                                                           "param": None, "code": "not_found"}}
    from launch.serve import build_parser

    args = build_parser().parse_args(["--model", "m", "--max-body-bytes", "10", "--api-key", "k"])
    assert (args.max_body_bytes, args.api_key, args.max_stop_strings) == (10, "k", ServerLimits.max_stop_strings)
