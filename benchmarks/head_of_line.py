"""Head-of-line blocking in batch jobs: one long line first, then many short ones (issue 12, item 2).

The file: line 0 asks for LONG new tokens (default 960), then SHORT_LINES lines (default 1023) ask for
SHORT each (default 16); prompts are 16 random token ids, greedy, eos ignored, dummy GPT-2 weights. On one
warmed-up engine (compile time excluded) `launch.batch`'s loop (`BatchJob`, output to a temporary file)
runs the whole file, the long line alone and the short lines alone; the figure is
whole / max(long alone, shorts alone), which should be <= 1.3. `--blocking` also runs the whole file
under the admission rule before issue 12 (lines that finished but wait for an earlier one count against
--max-in-flight), for comparison. "busy slots" is the mean over engine steps of the slots filled as each
step begins (`Stats.busy_slots`). Prints a table, then one JSON line last.

  python benchmarks/head_of_line.py --blocking                          # the issue's sizes
  python benchmarks/head_of_line.py --long-tokens 240 --short-lines 255   # a quarter of the work
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import environment  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from launch.batch_io import OutputWriter  # noqa: E402
from launch.batch_job import BatchJob, JobOptions  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset for dummy weights (gpt2, gpt2-medium, ...)")
    p.add_argument("--long-tokens", type=int, default=960)
    p.add_argument("--short-lines", type=int, default=1023)
    p.add_argument("--short-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, help="default: 4 x max-slots, as launch.batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--blocking", action="store_true", help="also run the whole file with the old admission rule")
    p.add_argument("--json-out", default=None, help="also write the final JSON line to this file")
    return p.parse_args(argv)


class BlockingJob(BatchJob):
    """The admission rule before issue 12: a finished line waiting for an earlier one holds its place in
    --max-in-flight until it is written (the loop's request count is read as requests + waiting lines)."""

    @property
    def _in_engine(self) -> int:
        return self._requests + self.ordered.waiting

    @_in_engine.setter
    def _in_engine(self, value: int) -> None:
        self._requests = value - self.ordered.waiting


def job_lines(args, long: bool, short: bool) -> list[tuple[int, bytes]]:
    rng = np.random.default_rng(0)
    wanted = ([("long", args.long_tokens)] if long else []) + \
        ([(f"s{i}", args.short_tokens) for i in range(args.short_lines)] if short else [])
    lines = []
    for number, (ident, tokens) in enumerate(wanted):
        obj = {"id": ident, "prompt_token_ids": rng.integers(0, 50257, args.prompt_len).tolist(),
               "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        lines.append((number, json.dumps(obj).encode()))
    return lines


def run_job(engine, lines, options: JobOptions, folder: str, job_class=BatchJob) -> dict:
    writer = OutputWriter(os.path.join(folder, "out.jsonl"), resume=False, overwrite=True)
    start = time.perf_counter()
    try:
        stats = job_class(engine, writer, options).run(lines)
    finally:
        writer.close()
    wall = time.perf_counter() - start
    return {"lines": len(lines), "tokens": stats.generated_tokens, "wall_s": wall,
            "tok_s": stats.generated_tokens / wall, "steps": stats.steps, "busy_slots": stats.busy_slots,
            "peak_waiting": stats.order.peak_waiting, "spilled": stats.order.spilled_lines}


def main(argv=None) -> None:
    args = parse_args(argv)
    from engine.engine import Engine

    if args.prompt_len + args.long_tokens > 1024:
        sys.exit(f"--prompt-len {args.prompt_len} + --long-tokens {args.long_tokens} exceed GPT-2's 1024 positions")
    engine = Engine.from_pretrained(args.model, load_format="dummy", dtype=args.dtype, max_slots=args.max_slots,
                                    decode_steps=args.decode_steps, max_seq_len=1024)
    started = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - started
    options = JobOptions(SamplingParams(), None, args.max_in_flight or 4 * args.max_slots, args.model)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        warm = dict(vars(args), short_lines=4, short_tokens=4)
        run_job(engine, job_lines(argparse.Namespace(**warm), False, True), options, folder)  # untimed
        runs["whole file"] = run_job(engine, job_lines(args, True, True), options, folder)
        runs["long line alone"] = run_job(engine, job_lines(args, True, False), options, folder)
        runs["short lines alone"] = run_job(engine, job_lines(args, False, True), options, folder)
        if args.blocking:
            runs["whole file, old admission"] = run_job(engine, job_lines(args, True, True), options, folder,
                                                        BlockingJob)
    report(args, runs, compile_s)


def report(args, runs: dict, compile_s: float) -> None:
    slower = max(runs["long line alone"]["wall_s"], runs["short lines alone"]["wall_s"])
    ratios = {name: r["wall_s"] / slower for name, r in runs.items() if name.startswith("whole")}
    print(f"1 x {args.long_tokens} + {args.short_lines} x {args.short_tokens} new tokens, {args.model} dummy "
          f"{args.dtype}, max-slots {args.max_slots}, decode-steps {args.decode_steps}, "
          f"max-in-flight {args.max_in_flight or 4 * args.max_slots}; warm-up {compile_s:.0f} s (excluded)")
    print(f"{'run':28} {'lines':>6} {'tokens':>7} {'wall s':>8} {'tok/s':>7} {'busy slots':>10} "
          f"{'peak waiting':>12} {'spilled':>7} {'/ slower part':>13}")
    for name, r in runs.items():
        ratio = f"{ratios[name]:.2f}x" if name in ratios else ""
        print(f"{name:28} {r['lines']:6d} {r['tokens']:7d} {r['wall_s']:8.1f} {r['tok_s']:7.1f} "
              f"{r['busy_slots']:10.1f} {r['peak_waiting']:12d} {r['spilled']:7d} {ratio:>13}")
    line = json.dumps({"head_of_line": {"args": vars(args), "runs": runs, "ratio": ratios["whole file"],
                                        "ratios": ratios, "compile_s": compile_s}, **environment()})
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
