"""Prefix reuse: the engine with prefix caching (forks + cached blocks) on against off, in the same run.

Workloads (GPT-2 weights are random: speed does not depend on their values; default EngineConfig):
  shared  32 prompts = one 512-token prefix + 32 distinct tokens each, 16 new tokens, greedy
  fork    one 512-token prompt, n=8 samples (temperature 1, seeded), 32 new tokens
Each repeat draws a fresh prefix (the cache never helps a repeat with an earlier one's blocks); the
reported wall time is the median of the repeats. Compile time is excluded: an untimed run of each workload
first compiles the programs it meets (lazily: a full warm-up compiles every shape, most unused here).
With `--parts`, each device call is timed to its end (`block_until_ready`) and summed per kind (prefill,
copy, extend, decode, move; the rest of the wall time is host work), and the fork row gets its bound: the
unforked run prefills 8 x 512 tokens, the forked one 512 tokens once, both decode the same 8 x 32 tokens,
so the best a fork can do is (unforked prefill + decode) / (forked prefill + decode), from those parts.
Prints a table, then one JSON line last.

  python benchmarks/prefix_reuse.py [--model gpt2] [--repeats 3] [--workloads fork] [--parts]
  python benchmarks/prefix_reuse.py --model /path/to/hf-folder --load-format safetensors
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
PARTS = ("prefill", "copy", "extend", "decode", "move")


class PartTimer:
    """Seconds of each kind of device call of one engine (each call timed to its end), reset per run."""

    def __init__(self, engine):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        runner = engine.runner
        for name in PARTS:
            setattr(runner, name, self._timed(name, getattr(runner, name), runner))

    def _timed(self, name, call, runner):
        import jax

        def run(*args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            jax.block_until_ready(runner.state)
            self.seconds[name] += time.perf_counter() - start
            return out
        return run

    def take(self, wall: float) -> dict:
        parts, self.seconds = self.seconds, dict.fromkeys(PARTS, 0.0)
        return {**parts, "host": wall - sum(parts.values())}


def timed(engine, make, seed: int, **size) -> tuple[float, int, list]:
    prompts, params = make(np.random.default_rng(seed), **size)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - start, sum(len(c.token_ids) for c in out), [c.token_ids for c in out]


def median_parts(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fork_bound(parts: dict) -> dict:
    """Best forked/unforked ratio from the measured parts: the forked run can at best skip the copies and
    the host work, the unforked run prefills 8 prompts where the forked one prefills 1."""
    on, off = parts["cached"], parts["uncached"]
    best = (off["prefill"] + off["decode"]) / (on["prefill"] + on["decode"])
    return {"best_speedup": best, "unforked_prefill_s": off["prefill"], "forked_prefill_s": on["prefill"],
            "decode_s": {"forked": on["decode"], "unforked": off["decode"]}, "copy_s": on["copy"]}


def measure(engines, timers, name: str, index: int, args, compile_s: dict) -> dict:
    """One workload: an untimed run per engine (compiling), then `repeats` interleaved timed runs."""
    seed = 1000 * (index + 1)  # every run draws its own tokens: no workload reuses another's cached blocks
    size = {"count": args.shared_prompts} if name == "shared" else {}
    for on in (True, False) if not args.skip_untimed else ():  # untimed: compiles the programs it meets
        compile_s[on] += timed(engines[on], WORKLOADS[name], seed - 1, **size)[0]
    for t in (timers or {}).values():
        t.take(0.0)  # the untimed run's parts are dropped
    load_before = os.getloadavg()[0]
    walls, same, parts = {True: [], False: []}, True, {True: [], False: []}
    for r in range(args.repeats):
        out = {}
        for on in (True, False):
            wall, tokens, out[on] = timed(engines[on], WORKLOADS[name], seed + r, **size)
            walls[on].append(wall)
            if timers:
                parts[on].append(timers[on].take(wall))
        same &= out[True] == out[False]  # greedy (shared) and seeded samples (fork) alike
    on_s, off_s = statistics.median(walls[True]), statistics.median(walls[False])
    row = {"workload": name, "tokens": tokens, "cached_s": on_s, "uncached_s": off_s,
           "cached_tok_s": tokens / on_s, "uncached_tok_s": tokens / off_s, "speedup": off_s / on_s,
           "same_tokens": same, "walls": {"cached": walls[True], "uncached": walls[False]},
           "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0]}}
    if timers:
        row["parts_s"] = {"cached": median_parts(parts[True]), "uncached": median_parts(parts[False])}
        if name == "fork":
            row["bound"] = fork_bound(row["parts_s"])
    print(f"{name}: cached {walls[True]} s, uncached {walls[False]} s", file=sys.stderr)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'workload':8} {'tokens':>6} {'cached s':>9} {'uncached s':>11} {'cached tok/s':>13} "
          f"{'uncached tok/s':>15} {'speedup':>8} {'same tokens':>12}")
    for r in rows:
        print(f"{r['workload']:8} {r['tokens']:6d} {r['cached_s']:9.2f} {r['uncached_s']:11.2f} "
              f"{r['cached_tok_s']:13.1f} {r['uncached_tok_s']:15.1f} {r['speedup']:7.2f}x {str(r['same_tokens']):>12}")
    for r in rows:
        for side, part in r.get("parts_s", {}).items():
            print(f"  {r['workload']} {side} parts (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in part.items() if v))
        if "bound" in r:
            print(f"  fork bound: (unforked prefill + decode) / (forked prefill + decode) = "
                  f"{r['bound']['best_speedup']:.2f}x (measured {r['speedup']:.2f}x)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset (random weights) or an HF folder")
    p.add_argument("--load-format", default="dummy", help="dummy: random weights; auto: the folder's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default="shared,fork")
    p.add_argument("--shared-prompts", type=int, default=32, help="prompts of the shared-prefix workload")
    p.add_argument("--skip-untimed", action="store_true",
                   help="no untimed first run (programs then load from the persistent compile cache in the timed one)")
    p.add_argument("--parts", action="store_true", help="time prefill / copy / decode calls and host work apart")
    args = p.parse_args(argv)
    from engine import Engine

    engines = {on: Engine.from_pretrained(args.model, load_format=args.load_format, enable_prefix_caching=on)
               for on in (True, False)}
    timers = {on: PartTimer(engines[on]) for on in engines} if args.parts else None
    compile_s = {True: 0.0, False: 0.0}
    rows = [measure(engines, timers, name, w, args, compile_s) for w, name in enumerate(args.workloads.split(","))]
    queried, hit, blocks = engines[True].scheduler.prefix_stats
    print_table(rows)
    print(f"prefix cache: {hit}/{queried} prompt tokens reused ({100 * hit / max(queried, 1):.0f}%), "
          f"{blocks} blocks cached; untimed first runs (compiling) s: cached engine {compile_s[True]:.1f}, "
          f"uncached {compile_s[False]:.1f}")
    print(json.dumps({"model": args.model, "load_format": args.load_format, "repeats": args.repeats,
                      "shared_prompts": args.shared_prompts, "skip_untimed": args.skip_untimed, "workloads": rows,
                      "hit_tokens": hit, "query_tokens": queried, "cached_blocks": blocks,
                      "first_run_s": {"cached": compile_s[True], "uncached": compile_s[False]}, **environment()}))


if __name__ == "__main__":
    main()
