"""Tracing and lowering every program of the default engine (gpt2 dummy weights), nothing compiled.

    python benchmarks/lowering.py [--json-out F]

Lowering is the Python side of a cold start (`Engine.warmup` traces each program while the thread pool
compiles the last one; on two cores it competes with the compiles) and all of a start after an engine
upgrade (the executable store's fingerprint changed, JAX's own cache still answers the compiles). Per
program class: seconds to lower and characters of StableHLO text (what XLA then parses and optimizes).
It imports the engine from the working directory, so two checkouts compare by running it from each.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.getcwd())

from benchmarks.common import emit  # noqa: E402
from benchmarks.throughput import environment  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    from engine import Engine

    engine = Engine.from_pretrained("gpt2", load_format="dummy", compile_cache=False)
    sc = engine.scheduler.config
    seconds, chars, count = collections.Counter(), collections.Counter(), collections.Counter()
    for program, _, example in engine.runner.programs(sc.prefill_buckets, sc.decode_windows, sc.decode_slot_counts,
                                                      extend=engine._extend_buckets()):
        t0 = time.perf_counter()
        text = program.lower(*example).as_text()
        seconds[program.name] += time.perf_counter() - t0
        chars[program.name] += len(text)
        count[program.name] += 1
    print(f"{'class':12s} {'programs':>8s} {'lower s':>8s} {'StableHLO MB':>13s}", file=sys.stderr)
    for name in seconds:
        print(f"{name:12s} {count[name]:8d} {seconds[name]:8.1f} {chars[name] / 1e6:13.1f}", file=sys.stderr)
    print(f"{'all':12s} {sum(count.values()):8d} {sum(seconds.values()):8.1f} {sum(chars.values()) / 1e6:13.1f}",
          file=sys.stderr)
    out = {"benchmark": "lowering", "repo": os.getcwd(), "programs": dict(count),
           "lower_s": {k: round(v, 2) for k, v in seconds.items()}, "lower_s_sum": round(sum(seconds.values()), 1),
           "stablehlo_mb": {k: round(v / 1e6, 2) for k, v in chars.items()}, "environment": environment()}
    emit(out, args.json_out)


if __name__ == "__main__":
    main()
