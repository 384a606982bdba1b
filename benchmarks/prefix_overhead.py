"""What prefix caching costs prompts that share nothing: W1-W3 (benchmarks/throughput.py's workloads and
engine settings: dummy gpt2, 64 slots, 16 decode steps, 512 positions) through two engines in one process,
`enable_prefix_caching` on and off, run alternately in ABBA order (on, off, off, on, ...: a steady drift
in the machine's speed hits both alike). Each engine is warmed up first (every program compiled, excluded). Prompts are random
token ids drawn afresh each round (the same for both engines), so no prompt shares a block with another
or with an earlier round's. Reports each side's median
tokens/s per workload and on/off - 1 (negative: caching on is slower), and the process CPU seconds of each
run (less sensitive than wall time to other jobs sharing the cores). Prints a table, then one JSON line.

  python benchmarks/prefix_overhead.py [--rounds 2] [--workloads W1,W2,W3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import engine_run  # noqa: E402
from benchmarks.throughput import WORKLOADS, environment  # noqa: E402

SETTINGS = dict(max_slots=64, decode_steps=16, max_seq_len=512)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="on/off pairs per workload")
    p.add_argument("--workloads", default="W1,W2,W3")
    p.add_argument("--off-first", action="store_true",
                   help="make, warm and run the caching-off engine first (checks for an order effect)")
    args = p.parse_args(argv)
    order = (False, True) if args.off_first else (True, False)
    from engine import Engine

    engines = {on: Engine.from_pretrained("gpt2", load_format="dummy", enable_prefix_caching=on, **SETTINGS)
               for on in order}
    compile_s = {on: sum(e.warmup().values()) for on, e in engines.items()}
    rows = []
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]()
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for on in order if r % 2 == 0 else order[::-1]:
                load, cpu = os.getloadavg()[0], time.process_time()
                run = engine_run(engines[on], wl, seed=100 + 10 * r)  # fresh tokens per round, same on both
                runs[on].append({"tok_s": run["tok_s"], "wall_s": run["wall_s"], "load_avg_1m": load,
                                 "cpu_s": time.process_time() - cpu})
                print(f"{name} caching {'on ' if on else 'off'}: {run['tok_s']:.1f} tok/s (load {load:.2f})",
                      file=sys.stderr, flush=True)
        on_tok, off_tok = (statistics.median(r["tok_s"] for r in runs[on]) for on in (True, False))
        on_cpu, off_cpu = (statistics.median(r["cpu_s"] for r in runs[on]) for on in (True, False))
        rows.append({"workload": name, "on_tok_s": on_tok, "off_tok_s": off_tok, "on_vs_off": on_tok / off_tok - 1,
                     "on_cpu_s": on_cpu, "off_cpu_s": off_cpu, "runs": {"on": runs[True], "off": runs[False]}})
    print(f"{'workload':8} {'on tok/s':>9} {'off tok/s':>10} {'on vs off':>10} {'on CPU s':>9} {'off CPU s':>10}")
    for r in rows:
        print(f"{r['workload']:8} {r['on_tok_s']:9.1f} {r['off_tok_s']:10.1f} {100 * r['on_vs_off']:+9.1f}% "
              f"{r['on_cpu_s']:9.1f} {r['off_cpu_s']:10.1f}")
    print(json.dumps({"model": "gpt2", **SETTINGS, "rounds": args.rounds, "off_first": args.off_first, "workloads": rows,
                      "compile_s": {"on": compile_s[True], "off": compile_s[False]},
                      "prefix_stats_on": engines[True].scheduler.prefix_stats, **environment()}))


if __name__ == "__main__":
    main()
