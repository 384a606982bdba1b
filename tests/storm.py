"""A bounded storm of hostile clients for the server test (`tests/test_serve.py`, run on its loopback server):
random JSON, wrong types, huge numbers, huge stop lists, oversized, chunked and truncated bodies, unknown
paths and methods, clients that disconnect or stall. `check_storm` asserts that every request that can
still be answered gets a 4xx in OpenAI's error shape, and that afterwards /health is 200, no slot is held,
and a greedy request returns exactly the text it returned before the storm.

The server must run with STORM_FLAGS (small limits, so the storm stays small and quick)."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

# The header timeout of the test servers: long enough that a client starved of CPU (200 streams opening at once
# while the other test worker compiles) still sends its request head in time; the storm stalls past it.
MAX_BODY, READ_TIMEOUT_S = 64 * 1024, 5
STORM_FLAGS = ["--max-body-bytes", str(MAX_BODY), "--timeout-read", str(READ_TIMEOUT_S), "--max-stop-strings", "4",
               "--max-stop-chars", "64", "--max-stop-token-ids", "8"]
GREEDY = {"prompt": "Before and after the storm", "max_tokens": 10, "temperature": 0}


def random_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        return {rng.choice(["prompt", "n", "zz", "stop", ""]) + str(i): random_json(rng, depth + 1) for i in range(3)}
    return {"null": None, "bool": rng.random() < 0.5, "int": rng.randint(-10**30, 10**30), "float": rng.random() * 1e9,
            "str": "".join(rng.choice("ab\u00e9\u4e2d ") for _ in range(rng.randint(0, 8)))}[kind]


def json_bodies() -> list[bytes]:
    """Bodies that must each get a 400 (never a 500, never a completion)."""
    rng = random.Random(0)
    randoms = [random_json(rng) for _ in range(30)]
    randoms = [b if not isinstance(b, dict) else {"zz_unknown": 1, **b} for b in randoms]  # objects: an unknown field
    wrong_types = [{"prompt": 5}, {"prompt": "x", "max_tokens": "10"}, {"prompt": "x", "temperature": [1]},
                   {"prompt": "x", "stop": {"a": 1}}, {"prompt": "x", "n": 1.5}, {"prompt": "x", "stream": "yes"},
                   {"prompt": [[1, 2], "a"]}, {"prompt": "x", "logprobs": True}, {"prompt": "x", "seed": "1"},
                   {"prompt": "x", "stop_token_ids": "1"}, {"prompt": "x", "ignore_eos": 1}, {"prompt": None}]
    huge = [{"prompt": "x", "temperature": 10**400}, {"prompt": "x", "repetition_penalty": 10**400},
            {"prompt": "x", "max_tokens": 10**400}, {"prompt": "x", "seed": 2**64}, {"prompt": "x", "n": 10**6},
            {"prompt": "x", "temperature": 1e39}, {"prompt": "x", "repetition_penalty": 1e-300},
            {"prompt": "x", "top_k": -(10**20)}, {"prompt": [2**70]}, {"prompt": "x", "stop_token_ids": [2**40]}]
    stops = [{"prompt": "x", "stop": ["a"] * 1000}, {"prompt": "x", "stop": "s" * 10_000},
             {"prompt": "x", "stop_token_ids": list(range(5000))}, {"prompt": "x" * 9000},
             {"prompt": [1] * 500}, {"prompt": ["x"] * 300}]
    bodies = [json.dumps(b).encode() for b in randoms + wrong_types + huge + stops]
    raw = [b'{"prompt": "x", "temperature": Infinity}', b'{"prompt": "x", "top_p": NaN}', b"{not json",
           b'{"prompt": "x", "temperature": 1e400}', b'{"prompt": "x", "top_k": ' + b"9" * 5000 + b"}",
           b"[" * 50_000 + b"]" * 50_000, b'{"prompt": "\\ud800"}', b"\xff\xfe\x00", b""]
    return bodies + raw


async def raw_exchange(port: int, data: bytes, stall_s: float = 0.0, close_early: bool = False,
                       timeout_s: float = 15.0) -> int | None:
    """Send raw bytes (then stall or hang up); the response status, or None when there was none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close_early:
            return None
        if stall_s:
            await asyncio.sleep(stall_s)
        head = await asyncio.wait_for(reader.readline(), timeout_s)
        return int(head.split()[1]) if head else None
    finally:
        writer.close()


def post_head(length: int | None) -> bytes:
    lines = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def storm(url: str, port: int) -> tuple[list[tuple[str, int, object]], list]:
    """(what, status, body) of every answered hostile request, and the results of those that get no answer."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def send(what: str, method: str, path: str, content: bytes = b"", headers=None):
            r = await client.request(method, path, content=content, headers=headers)
            try:
                body = r.json()
            except ValueError:
                body = r.text
            return what, r.status_code, body

        big = b'{"prompt": "' + b"a" * (2 * MAX_BODY) + b'"}'
        chunk = b"%x\r\n%s\r\n" % (32 * 1024, b"a" * 32 * 1024)
        answered = [send(f"json {i}", "POST", "/v1/completions", b) for i, b in enumerate(json_bodies())]
        answered += [send("unknown path", "GET", "/v1/nothing"), send("wrong method", "GET", "/v1/completions"),
                     send("oversized", "POST", "/v1/completions", big)]
        raw = [("oversized chunked", raw_exchange(port, post_head(None) + chunk * 4)),
               ("lying length", raw_exchange(port, post_head(10**12))),
               ("truncated then stalled", raw_exchange(port, post_head(100) + b'{"prompt": '))]
        gone = [raw_exchange(port, post_head(100) + b'{"prompt"', close_early=True),  # hangs up mid-body
                raw_exchange(port, post_head(len(json.dumps(GREEDY))) + json.dumps({**GREEDY, "max_tokens": 100,
                             "stream": True}).encode(), close_early=True),  # hangs up while it is served
                raw_exchange(port, b"POST /v1/compl", stall_s=READ_TIMEOUT_S + 1),  # stalls in its request line
                raw_exchange(port, b"", stall_s=READ_TIMEOUT_S + 1)]  # connects and says nothing
        results = await asyncio.gather(*answered, *(c for _, c in raw), *gone)
    statuses = results[len(answered):len(answered) + len(raw)]
    return list(results[:len(answered)]) + [(w, s, None) for (w, _), s in zip(raw, statuses)], \
        list(results[len(answered) + len(raw):])


def check_storm(url: str, port: int) -> None:
    before = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    started = time.monotonic()
    answered, unanswered = asyncio.run(asyncio.wait_for(storm(url, port), 60))
    assert time.monotonic() - started < 30
    assert len(answered) > 70
    for what, status, body in answered:
        assert 400 <= status < 500, (what, status, body)
        if body is not None:
            assert set(body["error"]) == {"message", "type", "param", "code"}, (what, body)
    by_what = {what: status for what, status, _ in answered}
    assert by_what["unknown path"] == 404 and by_what["wrong method"] == 405
    assert by_what["oversized"] == by_what["oversized chunked"] == by_what["lying length"] == 413
    assert by_what["truncated then stalled"] == 408
    assert unanswered == [None] * 4  # clients that hung up get nothing; stalled ones were disconnected
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    after = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    assert after == before

    def metrics() -> str:
        return httpx.get(f"{url}/metrics", timeout=10).text

    deadline = time.monotonic() + 30
    while "engine_slots_used 0.0" not in metrics():
        assert time.monotonic() < deadline, "a slot is still held after the storm"
        time.sleep(0.05)
    assert 'engine_requests_total{status="500"}' not in metrics()
