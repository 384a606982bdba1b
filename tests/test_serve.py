"""The OpenAI-compatible server end to end: a real `python -m launch.serve` subprocess on a loopback port,
driven over HTTP (httpx and the official `openai` client) with a tiny random GPT-2."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.checkpoints import TOKENIZER_DIR, make_tiny_checkpoint
from tests.storm import STORM_FLAGS, check_storm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
MAX_SLOTS, MAX_WAITING = 4, 6
SERVER_FLAGS = ["--max-slots", str(MAX_SLOTS), "--max-seq-len", "128", "--decode-steps", "4", "--prefill-buckets",
                "128", "--prefill-token-budget", "32", "--max-waiting", str(MAX_WAITING), "--log-level", "WARNING",
                *STORM_FLAGS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

    def post(self, body: dict, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", json={"model": self.model, **body}, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait_idle(self) -> dict[str, float]:
        wait_until(lambda: (m := self.metrics())["engine_slots_used"] == 0 and m["engine_queue_depth"] == 0)
        return self.metrics()


def wait_until(predicate, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(folder, flags, log_path):
    """`python -m launch.serve --model folder *flags` on a free loopback port until /health answers; yields
    (url, log file); terminates the server after."""
    port, log = free_port(), open(log_path, "w+")
    cmd = [sys.executable, "-m", "launch.serve", "--model", str(folder), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
    try:
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server did not come up (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.25)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    with running_server(folder, SERVER_FLAGS, tmp_path_factory.mktemp("log") / "server.log") as (url, _):
        yield Served(url, str(folder))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def sse_events(lines) -> list:
    """Decoded `data:` payloads of an event stream ('[DONE]' kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_health_and_default_host(served):
    from launch.serve import build_parser

    cards = httpx.get(f"{served.url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [served.model]
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"


def test_openai_client_completion_seed_and_stream(served):
    kw = dict(model=served.model, prompt="Hello there", max_tokens=7, temperature=1.0, seed=1234)
    first, again = served.client.completions.create(**kw), served.client.completions.create(**kw)
    other = served.client.completions.create(**{**kw, "seed": 99})
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text
    assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 7
    assert first.usage.prompt_tokens == 2 and first.object == "text_completion"
    chunks = list(served.client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == first.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_every_warmup_program_gets_into_memory_and_metrics_count_them(served):
    """The server opens its port once nothing is left to compile; stored programs load after it."""
    wait_until(lambda: (m := served.metrics())["engine_programs_ready"] == m["engine_programs_total"], 120)
    assert served.metrics()["engine_programs_total"] >= 5  # prefill, 2 decode widths, copy, move at least


def test_openai_client_n_and_prompt_lists(served):
    before = served.metrics()
    out = served.client.completions.create(model=served.model, prompt=["One", "Two three"], n=3, max_tokens=4,
                                           seed=7)
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 24
    from engine.tokenizer import Tokenizer

    ids = Tokenizer.from_path(TOKENIZER_DIR).encode_batch(["One", "Two three"])
    by_ids = served.post({"prompt": ids, "n": 3, "max_tokens": 4, "seed": 7}).json()
    assert [c["text"] for c in by_ids["choices"]] == [c.text for c in out.choices]  # same tokens, same seeds
    single = served.post({"prompt": ids[1], "max_tokens": 4, "seed": 7}).json()
    assert single["choices"][0]["text"] == out.choices[3].text
    after = served.wait_idle()  # n = 3 forks one prefill per prompt: reused prompt tokens are counted
    hits = after["engine_prefix_cache_hits_total"] - before.get("engine_prefix_cache_hits_total", 0)
    assert hits > 0 and 0 < after["engine_prefix_cache_hit_rate"] <= 1
    assert after["engine_prefix_cache_queries_total"] >= hits and "engine_prefix_cache_blocks" in after


def test_stop_string_cuts_text_in_both_modes(served):
    kw = dict(model=served.model, prompt="Stop here", max_tokens=12, temperature=0)
    full = served.client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = served.client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    chunks = list(served.client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.text and chunks[-1].choices[0].finish_reason == "stop"


def test_min_tokens_holds_back_a_stop_token(served):
    """The greedy first token as a stop id ends a request at once; with min_tokens 5 it is banned (the
    first token changes) and the request runs on to max_tokens."""
    kw = dict(prompt="Hello there", max_tokens=8, temperature=0)
    first = served.post({**kw, "max_tokens": 1}).json()["choices"][0]["text"]
    [stop_id] = httpx.post(f"{served.url}/tokenize", json={"prompt": first}, timeout=10).json()["tokens"]
    stopped = served.post({**kw, "stop_token_ids": [stop_id]}).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    held = served.post({**kw, "stop_token_ids": [stop_id], "min_tokens": 5}).json()
    assert held["usage"]["completion_tokens"] >= 5 and not held["choices"][0]["text"].startswith(first)
    via_client = served.client.completions.create(model=served.model, **kw, extra_body={"min_tokens": 8})
    assert via_client.usage.completion_tokens == 8


def test_logprobs_and_usage_chunk(served):
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as r:
        events = sse_events(r.iter_lines())
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = events[:-1]
    tokens = sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks if c["choices"]), [])
    assert len(tokens) == 3 and all(len(c["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
                                    for c in chunks if c["choices"] and c["choices"][0]["logprobs"]["tokens"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body, param", [
    ({"prompt": []}, "prompt"), ({"prompt": [1, 99999]}, "prompt"), ({"prompt": ["a", 3]}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"), ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"), ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "echo": "yes"}, "echo"), ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"), ({"prompt": "x", "min_tokens": 1.5}, "min_tokens"),
    ({"prompt": "x", "min_tokens": "3"}, "min_tokens"), ({"prompt": "x", "min_tokens": True}, "min_tokens"),
    ({"prompt": "x", "max_tokens": 16, "min_tokens": 10**30}, "min_tokens"),
    ({"prompt": "x", "seed": -1}, "seed"), ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
])
def test_bad_field_gets_openai_error_400(served, body, param):
    r = served.post(body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["code"] is None
    assert err["param"] == param and err["message"].startswith(f"{param}: ")


def test_malformed_json_unknown_model_and_client_errors(served):
    r = httpx.post(f"{served.url}/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    r = served.post({"prompt": "x", "model": "gpt-5"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=served.model, prompt="x", max_tokens=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


async def _one_stream(client, url: str, model: str, i: int) -> str:
    body = {"model": model, "prompt": f"Request {i}", "max_tokens": 12, "ignore_eos": True, "stream": True}
    async with client.stream("POST", url, json=body) as r:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert json.loads(await r.aread())["error"]["code"] == "queue_full"
            return "429"
        assert r.status_code == 200
        events = sse_events([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    return "ok"


def test_load_every_request_completes_or_gets_429(served):
    before = served.metrics()

    async def load():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            url = f"{served.url}/v1/completions"
            return await asyncio.wait_for(
                asyncio.gather(*(_one_stream(client, url, served.model, i) for i in range(200))), 90)

    outcomes = asyncio.run(load())
    ok, rejected = outcomes.count("ok"), outcomes.count("429")
    assert ok + rejected == 200 and ok >= MAX_SLOTS and rejected > 0
    assert httpx.get(f"{served.url}/health").status_code == 200
    after = served.wait_idle()
    assert after['engine_requests_total{status="429"}'] - before.get('engine_requests_total{status="429"}', 0) \
        == rejected
    assert after["engine_generated_tokens_total"] - before["engine_generated_tokens_total"] == 12 * ok


def test_disconnected_clients_are_cancelled_and_free_their_slots(served):
    before = served.wait_idle()
    long = {"model": served.model, "prompt": "Hi", "max_tokens": 120, "ignore_eos": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        other = served.post({"prompt": "meanwhile", "max_tokens": 5})  # work proceeds alongside
    assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 5
    body = json.dumps(long).encode()
    with socket.create_connection(("127.0.0.1", served.port)) as s:  # a non-streaming client that gives up
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: served.metrics()["engine_slots_used"] >= 1)
    key = 'engine_requests_total{status="499"}'
    wait_until(lambda: served.metrics().get(key, 0) - before.get(key, 0) == 2)  # both counted as gone
    after = served.wait_idle()
    # Had either run to the end, its slot would have held until all 120 tokens were generated.
    assert after["engine_generated_tokens_total"] - before["engine_generated_tokens_total"] < 120 + 5


def test_hostile_storm_gets_4xx_and_leaves_the_server_as_it_was(served):
    check_storm(served.url, served.port)  # tests/storm.py: what is sent and what each must get
