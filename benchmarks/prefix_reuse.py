"""Prefix reuse: the engine with prefix caching (forks + cached blocks) on against off, in the same run.

Workloads (GPT-2 weights are random: speed does not depend on their values; default EngineConfig):
  shared  32 prompts = one 512-token prefix + 32 distinct tokens each, 16 new tokens, greedy
  fork    one 512-token prompt, n=8 samples (temperature 1, seeded), 32 new tokens
Each repeat draws a fresh prefix (the cache never helps a repeat with an earlier one's blocks); the
reported wall time is the median of the repeats. Compile time is excluded: an untimed run of each workload
first compiles the programs it meets (lazily: a full warm-up compiles every shape, most unused here).
Prints a table, then one JSON line last.

  python benchmarks/prefix_reuse.py [--model gpt2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import environment  # noqa: E402


def shared_prefix(rng, count: int = 32) -> tuple[list, object]:
    from engine import SamplingParams

    prefix = rng.integers(0, 50257, 512).tolist()
    prompts = [prefix + rng.integers(0, 50257, 32).tolist() for _ in range(count)]
    return prompts, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


def fork(rng, count: int = 1) -> tuple[list, object]:
    from engine import SamplingParams

    prompt = rng.integers(0, 50257, 512).tolist()
    return [prompt], SamplingParams(n=8, max_new_tokens=32, temperature=1.0, seed=int(rng.integers(1 << 30)),
                                    ignore_eos=True)


WORKLOADS = {"shared": shared_prefix, "fork": fork}


def timed(engine, make, seed: int, **size) -> tuple[float, int, list]:
    prompts, params = make(np.random.default_rng(seed), **size)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - start, sum(len(c.token_ids) for c in out), [c.token_ids for c in out]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default="shared,fork")
    p.add_argument("--shared-prompts", type=int, default=32, help="prompts of the shared-prefix workload")
    p.add_argument("--skip-untimed", action="store_true",
                   help="no untimed first run (programs then load from the persistent compile cache in the timed one)")
    args = p.parse_args(argv)
    from engine import Engine

    engines = {on: Engine.from_pretrained(args.model, load_format="dummy", enable_prefix_caching=on)
               for on in (True, False)}
    compile_s = {True: 0.0, False: 0.0}
    rows = []
    for w, name in enumerate(args.workloads.split(",")):
        seed = 1000 * (w + 1)  # every run draws its own tokens: no workload reuses another's cached blocks
        size = {"count": args.shared_prompts} if name == "shared" else {}
        for on in (True, False) if not args.skip_untimed else ():  # untimed: compiles the programs it meets
            compile_s[on] += timed(engines[on], WORKLOADS[name], seed - 1, **size)[0]
        walls, same = {True: [], False: []}, True
        for r in range(args.repeats):
            out = {}
            for on in (True, False):
                wall, tokens, out[on] = timed(engines[on], WORKLOADS[name], seed + r, **size)
                walls[on].append(wall)
            same &= out[True] == out[False]  # greedy (shared) and seeded samples (fork) alike
        on_s, off_s = statistics.median(walls[True]), statistics.median(walls[False])
        rows.append({"workload": name, "tokens": tokens, "cached_s": on_s, "uncached_s": off_s,
                     "cached_tok_s": tokens / on_s, "uncached_tok_s": tokens / off_s, "speedup": off_s / on_s,
                     "same_tokens": same, "walls": {"cached": walls[True], "uncached": walls[False]}})
        print(f"{name}: cached {walls[True]} s, uncached {walls[False]} s", file=sys.stderr)
    queried, hit, blocks = engines[True].scheduler.prefix_stats
    print(f"{'workload':8} {'tokens':>6} {'cached s':>9} {'uncached s':>11} {'cached tok/s':>13} "
          f"{'uncached tok/s':>15} {'speedup':>8} {'same tokens':>12}")
    for r in rows:
        print(f"{r['workload']:8} {r['tokens']:6d} {r['cached_s']:9.2f} {r['uncached_s']:11.2f} "
              f"{r['cached_tok_s']:13.1f} {r['uncached_tok_s']:15.1f} {r['speedup']:7.2f}x {str(r['same_tokens']):>12}")
    print(f"prefix cache: {hit}/{queried} prompt tokens reused ({100 * hit / max(queried, 1):.0f}%), "
          f"{blocks} blocks cached; untimed first runs (compiling) s: cached engine {compile_s[True]:.1f}, "
          f"uncached {compile_s[False]:.1f}")
    print(json.dumps({"model": args.model, "repeats": args.repeats, "shared_prompts": args.shared_prompts,
                      "skip_untimed": args.skip_untimed, "workloads": rows, "hit_tokens": hit,
                      "query_tokens": queried, "cached_blocks": blocks,
                      "first_run_s": {"cached": compile_s[True], "uncached": compile_s[False]}, **environment()}))


if __name__ == "__main__":
    main()
