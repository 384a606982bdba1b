"""W1 (and with `--workloads`, W2/W3 of `throughput.py`) through the engine alone (greedy, dummy gpt2, 64
slots, 16 decode steps, 512 positions), run in the repository it is started from: for A/B runs of two
checkouts back to back (e.g. `cd ../old && python ../main/benchmarks/w1_engine.py`). `--one-window` compiles
decode for the whole context only (what the engine does since 2026-12-03; a no-op there). `--scan-layers`
runs the engine with `scan_layers=True`. `--lazy` skips `warmup()`: every workload runs once untimed first
(compiling what it meets), for old checkouts whose warm-up compiles many more programs. `--repeat N` times
each workload N times. `--prefill-buckets 16,64,256` sets `EngineConfig.prefill_buckets`. Prints one JSON line."""
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())

from benchmarks.common import engine_run  # noqa: E402
from benchmarks.throughput import WORKLOADS  # noqa: E402  (the checkout's own definitions)
from engine import Engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if "--one-window" in sys.argv:
    EngineConfig.decode_windows = lambda self, *_: (self.max_seq_len,)
names, repeat = option("--workloads", "W1").split(","), int(option("--repeat", "1"))
t0 = time.perf_counter()
scan = {"scan_layers": True} if "--scan-layers" in sys.argv else {}
if "--prefill-buckets" in sys.argv:
    scan["prefill_buckets"] = tuple(int(b) for b in option("--prefill-buckets", "").split(","))
engine = Engine.from_pretrained("gpt2", load_format="dummy", max_slots=64, decode_steps=16, max_seq_len=512, **scan)
t1 = time.perf_counter()
if "--lazy" in sys.argv:
    for name in names:
        engine_run(engine, WORKLOADS[name]())
else:
    engine.warmup()
t2 = time.perf_counter()
runs = {name: [engine_run(engine, WORKLOADS[name]()) for _ in range(repeat)] for name in names}
first = runs[names[0]][0]
print(json.dumps({"repo": os.getcwd(), "args": sys.argv[1:], "load_s": t1 - t0, "warmup_s": t2 - t1,
                  "tok_s": first["tok_s"], "wall_s": first["wall_s"],
                  "tpot_p50": sorted(first["tpot"])[len(first["tpot"]) // 2],
                  "workloads": {name: [r["tok_s"] for r in rs] for name, rs in runs.items()}}))
