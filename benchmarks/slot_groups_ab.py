"""What the KV cache's slot groups cost at start-up and buy in decode: the default 16-slot engine with 4
groups (the default) against 1 (`kv_slot_groups=1`), in one process (calls alternate, so load hits both alike).

    python benchmarks/slot_groups_ab.py [--calls 6] [--json-out F]

gpt2 dummy weights, 16 slots, 1024 positions, 8 decode steps per call. Per engine: for the 16-wide decode,
the block copy and the 128-token extend, the compile seconds, machine-code objects (3 code mappings each),
serialized MB and `deserialize_and_load` seconds; then the median decode call (ms) for live slots of equal
and of mixed lengths and at widths 4 and 1. Every program is compiled here (no compile cache).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit  # noqa: E402
from benchmarks.throughput import environment  # noqa: E402

SPREAD = sorted(np.linspace(100, 900, 16).astype(int).tolist(), reverse=True)  # longest first, as admitted
CASES = {"16 live at 300": (16, [308] * 16), "4 at 900 + 12 at 100": (16, [908] * 4 + [108] * 12),
         "16 from 900 to 100": (16, [s + 8 for s in SPREAD]), "width 4 at 300": (4, [308] * 4 + [0] * 12),
         "width 1 at 300": (1, [308] + [0] * 15)}


def program_costs(engine) -> dict:
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    out = {}
    for program, key, args in engine.runner.programs((), (1024,), (16,), extend=(128,)):
        if program.name not in ("decode", "copy", "extend"):
            continue
        lowered = program.lower(*args)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        blob = serialize(compiled)
        t0 = time.perf_counter()
        deserialize_and_load(*blob)
        out[program.name] = {"compile_s": round(compile_s, 1), "objects": blob[0].count(b"\x7fELF"),
                             "mb": round(len(blob[0]) / 1e6, 1), "load_s": round(time.perf_counter() - t0, 2)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=6, help="timed decode calls per engine and case")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    from engine import Engine

    engines, costs = {}, {}
    for groups in (4, 1):
        engine = Engine.from_pretrained("gpt2", load_format="dummy", max_slots=16, max_seq_len=1024,
                                        kv_slot_groups=groups, compile_cache=False)
        assert engine.runner.groups == groups
        engines[groups], costs[groups] = engine, program_costs(engine)
    decode = {}
    for name, (width, reach) in CASES.items():
        for engine in engines.values():  # compile / first call
            np.asarray(engine.runner.decode(1024, width, reach).tokens)
        times = {g: [] for g in engines}
        for _ in range(args.calls):
            for g, engine in engines.items():
                t0 = time.perf_counter()
                np.asarray(engine.runner.decode(1024, width, reach).tokens)
                times[g].append(time.perf_counter() - t0)
        decode[name] = {g: round(1000 * sorted(t)[len(t) // 2]) for g, t in times.items()}
    print(f"{'program (4 groups -> 1)':24s} {'compile s':>14s} {'objects':>12s} {'MB':>12s} {'load s':>12s}",
          file=sys.stderr)
    for name in costs[4]:
        a, b = costs[4][name], costs[1][name]
        print(f"{name:24s} " + " ".join(f"{a[k]:>6} -> {b[k]:<5}" for k in ("compile_s", "objects", "mb", "load_s")),
              file=sys.stderr)
    print(f"{'decode call, median ms':24s} {'4 groups':>9s} {'1 group':>9s} {'ratio':>6s}", file=sys.stderr)
    for name, row in decode.items():
        print(f"{name:24s} {row[4]:9d} {row[1]:9d} {row[1] / row[4]:6.2f}", file=sys.stderr)
    out = {"benchmark": "slot_groups_ab", "programs": costs, "decode_ms": decode, "environment": environment()}
    emit(out, args.json_out)


if __name__ == "__main__":
    main()
