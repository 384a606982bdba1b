"""Start-up: how long until the engine serves, with an empty and with a warm compile cache.

    python benchmarks/startup.py [--skip-xl] [--skip-batch] [--modes loop,scan,one-group] [--json-out startup.json]

Each figure is a fresh process (`python -m launch.serve` or `python -m launch.batch`) timed from spawn:
- serve gpt2 (a random 124M safetensors checkpoint), default engine: until `/health` answers 200, every
  program compiled (the server warms up before it opens its port; programs already in the executable
  store load in the background after it opens); cold = empty compile cache ($XDG_CACHE_HOME in a new
  temporary folder), warm = the same folder again; then the latency of a first request (4 tokens) sent
  right after, and the seconds from spawn until every program is in memory (/metrics
  engine_programs_ready) with the peak maps until then;
- serve gpt2-xl (`--load-format dummy`), cold: compile time should barely grow with depth;
- `launch.batch examples/prompts.jsonl` with the gpt2 checkpoint, process start to exit, cold and warm,
  with the context sized to the job (the default) and with the whole 1024 positions (`ctx 1024`);
- `init_dummy` of gpt2 in this process.
`--modes` picks the engines measured: `loop` (the default engine), `scan` (`--scan-layers`) and/or
`one-group` (`--kv-slot-groups 1`); rows of the last two are marked `[scan]` / `[1 group]`.
The peak `/proc/PID/maps` line count of each child is sampled every 0.2 s (the kernel's default
vm.max_map_count is 65,530). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import environment  # noqa: E402
from benchmarks.random_checkpoint import write_random_checkpoint  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _maps(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _env(cache: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "GPT2_ENGINE_COMPILE_CACHE": str(cache / "xla"),
            "JAX_PLATFORMS": "cpu"}


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), None)


def _first_request(port: int) -> float:
    """Seconds of one completion (4 tokens) sent as soon as the server is healthy."""
    body = json.dumps({"model": "m", "prompt": "The quick brown fox", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        r.read()
    return time.perf_counter() - t0


def _until_loaded(proc, port: int, t0: float, timeout: float, peak: int) -> tuple[float, int]:
    """Seconds from spawn until every program is in memory (/metrics engine_programs_ready = _total)."""
    while time.perf_counter() - t0 < timeout:
        peak = max(peak, _maps(proc.pid))
        ready, total = _metric(port, "engine_programs_ready"), _metric(port, "engine_programs_total")
        if ready is not None and ready >= total:
            return time.perf_counter() - t0, max(peak, _maps(proc.pid))
        time.sleep(0.2)
    raise RuntimeError(f"programs not loaded after {timeout}s")


def serve(model: str, cache: Path, extra: list[str], timeout: float) -> dict:
    """Seconds from spawn to /health 200, and the peak map count until then; then the latency of a first
    request and the seconds from spawn until every program is in memory (with the peak maps until then)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "launch.serve", "--model", model, "--port", str(port), "--served-model-name", "m",
           *extra]
    t0, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        while time.perf_counter() - t0 < timeout:
            peak = max(peak, _maps(proc.pid))
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if _healthy(port):
                out = {"seconds": time.perf_counter() - t0, "peak_maps": max(peak, _maps(proc.pid))}
                first = _first_request(port)
                loaded, peak = _until_loaded(proc, port, t0, timeout, out["peak_maps"])
                return {**out, "first_request_s": first, "loaded_s": loaded, "loaded_peak_maps": peak}
            time.sleep(0.2)
        raise RuntimeError(f"{cmd} not healthy after {timeout}s")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def batch(model: str, cache: Path, work: Path, extra: list[str]) -> dict:
    out = work / "prompts.out.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "launch.batch", str(ROOT / "examples/prompts.jsonl"), "--model", model,
           "--output", str(out), *extra]
    t0, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    while proc.poll() is None:
        peak = max(peak, _maps(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_maps": peak}


def dummy_init_seconds() -> float:
    import jax
    import jax.numpy as jnp

    from engine.config import preset
    from weights.loader import init_dummy

    t0 = time.perf_counter()
    jax.block_until_ready(init_dummy(preset("gpt2"), jnp.float32)[1])
    return time.perf_counter() - t0


def _tokenizer_dir() -> Path | None:
    for d in (ROOT / "engine/gpt2_tokenizer", ROOT.parent / "shared/data/gpt2-tokenizer"):
        if (d / "vocab.json").is_file():
            return d
    return None


# The batch job's context: sized to its lines (the default: 128 positions and one slot group for the
# example file, `launch.batch_context`) and the whole 1024 positions (rows marked ` ctx 1024`).
BATCH_CONTEXTS = {"": [], " ctx 1024": ["--max-seq-len", "1024"]}
# --modes: the engine flags of each mode, and the tag of its rows
MODES = {"loop": ([], ""), "scan": (["--scan-layers"], " [scan]"), "one-group": (["--kv-slot-groups", "1"], " [1 group]")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-xl", action="store_true")
    p.add_argument("--skip-batch", action="store_true")
    p.add_argument("--modes", default="loop", help="comma-separated engine modes: loop (the default engine), scan "
                                                   "(--scan-layers), one-group (--kv-slot-groups 1)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            p.error(f"--modes: expected some of {', '.join(MODES)}, got {mode!r}")
    from engine.config import preset

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    try:
        ckpt = write_random_checkpoint(preset("gpt2"), work / "gpt2")
        tok = _tokenizer_dir()
        if tok is not None:
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(tok / f, ckpt / f)
        rows = {}
        for mode in modes:
            extra, tag = MODES[mode]
            cache = work / f"cache-serve-{mode}"
            rows["serve gpt2 cold" + tag] = serve(str(ckpt), cache, extra, args.timeout)
            rows["serve gpt2 warm" + tag] = serve(str(ckpt), cache, extra, args.timeout)
            if not args.skip_xl:
                rows["serve gpt2-xl cold (dummy)" + tag] = serve(
                    "gpt2-xl", work / f"cache-xl-{mode}", ["--load-format", "dummy", *extra], args.timeout)
            if not args.skip_batch:
                for context, flags in BATCH_CONTEXTS.items():
                    cache = work / f"cache-batch-{mode}{context}"
                    for run in ("cold", "warm"):
                        rows[f"batch prompts.jsonl gpt2 {run}{context}{tag}"] = batch(str(ckpt), cache, work,
                                                                                      [*extra, *flags])
        rows["init_dummy gpt2 (in process)"] = {"seconds": dummy_init_seconds(), "peak_maps": None}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'what':44s} {'seconds':>8s} {'peak maps':>10s} {'1st request s':>14s} {'all loaded s':>13s} "
          f"{'maps then':>10s}", file=sys.stderr)
    for name, r in rows.items():
        extra = (f" {r['first_request_s']:14.2f} {r['loaded_s']:13.1f} {r['loaded_peak_maps']:10}"
                 if "loaded_s" in r else "")
        print(f"{name:44s} {r['seconds']:8.1f} {r['peak_maps'] if r['peak_maps'] is not None else '-':>10}{extra}",
              file=sys.stderr)
    line = json.dumps({"startup": rows, **environment()})
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
