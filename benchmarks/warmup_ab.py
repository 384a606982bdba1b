"""`Engine.warmup()` of one layer mode, no compile cache: load seconds, warm-up wall seconds, compile
seconds per program class (summed over the thread pool) and the peak `/proc/self/maps` line count (sampled
every 0.2 s). Run the two modes back to back to compare:

    python benchmarks/warmup_ab.py loop [model]; python benchmarks/warmup_ab.py scan [model]

(model: a preset for `--load-format dummy`, default gpt2; `--prefill-buckets 16,64,256,1024` sets
`EngineConfig.prefill_buckets`). It imports the engine from the working directory,
so two checkouts compare by running it from each. Prints one JSON line."""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.getcwd())

from engine import Engine  # noqa: E402

options = {}
if "--prefill-buckets" in sys.argv:
    at = sys.argv.index("--prefill-buckets")
    options["prefill_buckets"] = tuple(int(b) for b in sys.argv[at + 1].split(","))
    del sys.argv[at: at + 2]
mode, model = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gpt2"
if mode not in ("loop", "scan"):
    sys.exit(f"mode: expected loop or scan, got {mode!r}")
peak_maps = 0


def _watch_maps() -> None:
    global peak_maps
    while True:
        with open("/proc/self/maps") as f:
            peak_maps = max(peak_maps, sum(1 for _ in f))
        time.sleep(0.2)


threading.Thread(target=_watch_maps, daemon=True).start()
t0 = time.perf_counter()
engine = Engine.from_pretrained(model, load_format="dummy", compile_cache=False, scan_layers=mode == "scan",
                                 **options)
t1 = time.perf_counter()
seconds = engine.warmup()
t2 = time.perf_counter()
print(json.dumps({"mode": mode, "model": model, "programs": engine.num_programs, "load_s": round(t1 - t0, 1),
                  "warmup_wall_s": round(t2 - t1, 1), "compile_s": {k: round(v, 1) for k, v in seconds.items()},
                  "compile_s_sum": round(sum(seconds.values()), 1), "peak_maps": peak_maps, "options": options,
                  "load_average": os.getloadavg(), "repo": os.getcwd()}))
