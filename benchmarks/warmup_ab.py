"""`Engine.warmup()` of one layer mode, no compile cache: load seconds, warm-up wall seconds and compile
seconds per program class (summed over the thread pool). Run the two modes back to back to compare:

    python benchmarks/warmup_ab.py loop [model]; python benchmarks/warmup_ab.py scan [model]

(model: a preset for `--load-format dummy`, default gpt2). Prints one JSON line."""
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())

from engine import Engine  # noqa: E402

mode, model = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gpt2"
if mode not in ("loop", "scan"):
    sys.exit(f"mode: expected loop or scan, got {mode!r}")
t0 = time.perf_counter()
engine = Engine.from_pretrained(model, load_format="dummy", compile_cache=False, scan_layers=mode == "scan")
t1 = time.perf_counter()
seconds = engine.warmup()
t2 = time.perf_counter()
print(json.dumps({"mode": mode, "model": model, "programs": engine.num_programs, "load_s": round(t1 - t0, 1),
                  "warmup_wall_s": round(t2 - t1, 1), "compile_s": {k: round(v, 1) for k, v in seconds.items()},
                  "compile_s_sum": round(sum(seconds.values()), 1), "load_average": os.getloadavg()}))
