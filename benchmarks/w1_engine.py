"""W1 through the engine alone (64 prompts x 128 in / 128 out, greedy, dummy gpt2, 64 slots, 16 decode
steps, 512 positions), run in the repository it is started from: for A/B runs of two checkouts back to
back (e.g. `cd ../old && python ../main/benchmarks/w1_engine.py`). `--one-window` compiles decode for the
whole context only (what the engine does since 2026-12-03; a no-op there). `--scan-layers` runs the engine
with `scan_layers=True`. Prints one JSON line."""
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())

from benchmarks.common import Workload, engine_run  # noqa: E402
from engine import Engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402

if "--one-window" in sys.argv:
    EngineConfig.decode_windows = lambda self, *_: (self.max_seq_len,)
t0 = time.perf_counter()
scan = {"scan_layers": True} if "--scan-layers" in sys.argv else {}
engine = Engine.from_pretrained("gpt2", load_format="dummy", max_slots=64, decode_steps=16, max_seq_len=512, **scan)
t1 = time.perf_counter()
engine.warmup()
t2 = time.perf_counter()
run = engine_run(engine, Workload.fixed("W1", 64, 128, 128))
print(json.dumps({"repo": os.getcwd(), "args": sys.argv[1:], "load_s": t1 - t0, "warmup_s": t2 - t1,
                  "tok_s": run["tok_s"], "wall_s": run["wall_s"], "tpot_p50": sorted(run["tpot"])[len(run["tpot"]) // 2]}))
