"""Online serving benchmark: streaming clients against the OpenAI server on loopback.

Starts `python -m launch.serve` on a free 127.0.0.1 port (or targets `--url`, which must be loopback),
sends `--num-requests` streaming completions with random token-id prompts, at most `--concurrency` in
flight, arriving at `--request-rate` per second (Poisson; default: all at once), and measures per request:
  TTFT  request sent -> first token chunk;   TPOT (E2E - TTFT) / (output tokens - 1);
  ITL   gaps between consecutive token chunks (a chunk holds the tokens of one engine step);   E2E.
Warm-up requests run first and are excluded. Bounded: `--max-duration` ends the run (unfinished requests
count as failed). Prints a table, then one JSON line last.

  python benchmarks/serving.py --model gpt2 --load-format dummy --num-requests 64 --concurrency 16
  python benchmarks/serving.py --url http://127.0.0.1:8000 --num-requests 200 --request-rate 20
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import percentile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = ("127.0.0.1", "localhost")
SERVER_FLAGS = ("load_format", "tokenizer", "dtype", "max_slots", "max_seq_len", "decode_steps", "prefill_buckets",
                "mesh", "max_waiting")


@dataclasses.dataclass
class Result:
    status: int = 0  # HTTP status; 0 when the request never got one (timeout, connection error)
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # arrival of each token chunk
    tokens: int = 0
    finished: bool = False  # saw a finish_reason and [DONE]
    error: str | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="target a running server (loopback only) instead of starting one")
    p.add_argument("--model", default="gpt2", help="server --model (a preset with --load-format dummy)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer")
    p.add_argument("--dtype")
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int)
    p.add_argument("--prefill-buckets")
    p.add_argument("--mesh")
    p.add_argument("--max-waiting", type=int, default=1024)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="mean arrivals per second")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument("--max-duration", type=float, default=600.0, help="seconds; the run stops there")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url: only a loopback server is benchmarked (127.0.0.1 or localhost), got {args.url!r}")
    for name in ("num_requests", "concurrency", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.prompt_len + args.max_tokens > args.max_seq_len and not args.url:
        p.error(f"--prompt-len {args.prompt_len} + --max-tokens {args.max_tokens} exceed --max-seq-len "
                f"{args.max_seq_len}")
    return args


@contextlib.contextmanager
def server(args: argparse.Namespace):
    """Yield the base URL: `--url`, or a server started here (stopped on exit; its log in a temp file)."""
    if args.url:
        yield args.url.rstrip("/")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "launch.serve", "--model", args.model, "--port", str(port), "--log-level", "WARNING"]
    for name in SERVER_FLAGS:
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log, args.startup_timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise SystemExit(f"server did not come up (exit {proc.poll()}):\n{log.read()[-3000:]}")
        time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    res, sent = Result(), time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:200]
                return res
            async for line in r.aiter_lines():
                _on_line(res, line, time.perf_counter() - sent)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _on_line(res: Result, line: str, now_s: float) -> None:
    if not line.startswith("data: "):
        return
    data = line[len("data: "):]
    if data == "[DONE]":
        res.e2e_s = now_s
        return
    chunk = json.loads(data)
    if "error" in chunk:
        res.error = chunk["error"]["message"]
    if chunk.get("usage"):
        res.tokens = chunk["usage"]["completion_tokens"]
    for choice in chunk.get("choices", []):
        res.chunk_times.append(now_s)
        res.ttft_s = res.ttft_s if res.ttft_s is not None else now_s
        res.finished = res.finished or choice["finish_reason"] is not None


async def run_load(url: str, model: str, args: argparse.Namespace) -> tuple[list[Result], float]:
    rng = np.random.default_rng(args.seed)
    bodies = [{"model": model, "prompt": rng.integers(0, 50257, args.prompt_len).tolist(),
               "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}} for _ in range(args.num_requests)]
    gaps = rng.exponential(1 / args.request_rate, args.num_requests) if np.isfinite(args.request_rate) else \
        np.zeros(args.num_requests)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.max_duration), limits=limits) as client:
        for body in bodies[: args.warmup_requests]:
            await one_request(client, url, body)
        gate = asyncio.Semaphore(args.concurrency)

        async def paced(i: int, delay: float) -> Result:
            await asyncio.sleep(delay)
            async with gate:
                return await one_request(client, url, bodies[i])

        start = time.perf_counter()
        tasks = [asyncio.create_task(paced(i, t)) for i, t in enumerate(np.cumsum(gaps))]
        done, pending = await asyncio.wait(tasks, timeout=args.max_duration)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
    results = [t.result() if t in done else Result(error="not finished within --max-duration") for t in tasks]
    return results, wall


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200 and r.finished and r.e2e_s is not None and r.error is None]
    ms = lambda xs: [1e3 * x for x in xs]  # noqa: E731
    series = {
        "ttft_ms": ms(r.ttft_s for r in ok), "e2e_ms": ms(r.e2e_s for r in ok),
        "tpot_ms": ms((r.e2e_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1),
        "itl_ms": ms(b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])),
    }
    tokens = sum(r.tokens for r in ok)
    out = {"requests": len(results), "completed": len(ok), "rejected_429": sum(r.status == 429 for r in results),
           "failed": len(results) - len(ok), "wall_s": wall, "requests_per_s": len(ok) / wall,
           "output_tokens": tokens, "output_tokens_per_s": tokens / wall}
    for name, xs in series.items():  # None (JSON null) where there is no sample
        out[name] = {"mean": float(np.mean(xs)) if xs else None, "p50": percentile(xs, 50) if xs else None,
                     "p99": percentile(xs, 99) if xs else None}
    errors = [r.error for r in results if r.error]
    out["first_error"] = errors[0] if errors else None
    return out


def print_table(summary: dict, args: argparse.Namespace) -> None:
    print(f"requests {summary['requests']}: {summary['completed']} completed, {summary['rejected_429']} x 429, "
          f"{summary['failed']} not completed, in {summary['wall_s']:.2f} s "
          f"(concurrency {args.concurrency}, rate {args.request_rate}/s)")
    print(f"throughput: {summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s")
    print(f"{'metric':<10}{'mean':>10}{'p50':>10}{'p99':>10}   (ms)")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        cells = "".join(f"{'-' if v is None else f'{v:.2f}':>10}" for v in summary[name].values())
        print(f"{name[:-3].upper():<10}{cells}")
    if summary["first_error"]:
        print(f"first error: {summary['first_error']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    with server(args) as url:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        results, wall = asyncio.run(run_load(url, card["id"], args))
    summary = summarize(results, wall)
    print_table(summary, args)
    config = {k: v for k, v in vars(args).items() if v is not None and v != float("inf")}
    env = {"python": platform.python_version(), "machine": platform.machine(), "server": card.get("device"),
           **{pkg: _version(pkg) for pkg in ("jax", "flax", "httpx", "uvicorn")}}
    print(json.dumps({"benchmark": "serving", **summary, "config": config, "env": env}))
    return 0


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
