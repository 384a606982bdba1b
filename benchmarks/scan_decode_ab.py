"""Decode speed of `scan_layers` against the layer loop, in one process (the two engines' calls alternate,
so machine load hits both alike): gpt2 dummy weights, 16 slots, 1024 positions, 8 decode steps per call,
16 and 1 live slots at 300 positions.

    python benchmarks/scan_decode_ab.py [calls per engine, default 8]
"""
import sys, os, time
sys.path.insert(0, os.getcwd())
import numpy as np
from engine import Engine
engines = {m: Engine.from_pretrained("gpt2", load_format="dummy", max_slots=16, max_seq_len=1024, scan_layers=(m == "scan"))
           for m in ("loop", "scan")}
res = {}
for width, fill in ((16, 300), (1, 300)):
    reach = [fill + 8] * width + [0] * (16 - width)
    for m, e in engines.items():
        np.asarray(e.runner.decode(1024, 16 if width > 4 else 4, reach).tokens)  # compile
    times = {m: [] for m in engines}
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
        for m, e in engines.items():
            t = time.perf_counter(); np.asarray(e.runner.decode(1024, 16 if width > 4 else 4, reach).tokens)
            times[m].append(time.perf_counter() - t)
    row = {m: (round(1000 * min(t)), round(1000 * sorted(t)[len(t) // 2])) for m, t in times.items()}
    print(f"live slots {width} at {fill} positions, 8 steps: ms (min, median)", row,
          "scan/loop median %.2f" % (row["scan"][1] / row["loop"][1]), flush=True)
