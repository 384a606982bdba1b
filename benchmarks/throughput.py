"""Output-token throughput of this engine against HF transformers `generate`, in the same run.

Workloads (GPT-2 weights are random: speed does not depend on their values):
  W1 offline batch: 64 prompts x 128 tokens in, 128 out, greedy, eos ignored
  W2 latency:       1 prompt x 32 in, 128 out
  W3 mixed:         64 prompts, lengths drawn (fixed seed) from 16..256 in and 16..128 out;
                    HF runs it as a user would: left-padded batches of 16, each to its longest output
  W4 large batch:   256 x 128 in / 128 out (for accelerators; `--workloads W4`)
Compile / warm-up time is reported and excluded from throughput. Prints a table, then one JSON line last.

  python benchmarks/throughput.py                      # W1-W3, engine vs HF, fp32 on this machine
  python benchmarks/throughput.py --sweep-batch 1,8,32,64 --plot benchmarks/sweep.png
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hf_baseline  # noqa: E402
from benchmarks.common import Workload, engine_run, matmul_gflops, percentile, workload_flops  # noqa: E402

WORKLOADS = {
    "W1": lambda: Workload.fixed("W1", 64, 128, 128),
    "W2": lambda: Workload.fixed("W2", 1, 32, 128),
    "W3": lambda: Workload.mixed("W3", 64, (16, 256), (16, 128), seed=0),
    "W4": lambda: Workload.fixed("W4", 256, 128, 128),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset for dummy weights (gpt2, gpt2-medium, ...)")
    p.add_argument("--workloads", default="W1,W2,W3")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--skip-hf", action="store_true", help="measure the engine only")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="prefix reuse (forks, cached blocks); W1-W3 share no prefix, so on vs off measures its overhead")
    p.add_argument("--kv-slot-groups", type=int, default=None, help="KV cache slot groups (unset: the engine's default)")
    p.add_argument("--hf-batch", type=int, default=16, help="HF batch size for the mixed workload")
    p.add_argument("--sweep-batch", default=None, help="comma list of batch sizes: W1 shape at each size")
    p.add_argument("--plot", default="benchmarks/sweep.png", help="PNG written by --sweep-batch")
    p.add_argument("--json-out", default=None, help="also write the final JSON line to this file")
    p.add_argument("--after-dirty", action="store_true",
                   help="then run a sampled + penalised + logprobs batch and W1 again (free slots must not slow it)")
    return p.parse_args(argv)


def environment() -> dict:
    import jax

    env = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    try:
        import flax
        import torch
        import transformers

        env.update(flax=flax.__version__, torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return env


def run_workload(args, wl: Workload, engine) -> dict:
    eng = engine_run(engine, wl)
    row = {"workload": wl.name, "requests": wl.count, "engine_tok_s": eng["tok_s"], "engine_wall_s": eng["wall_s"],
           "ttft_p50_ms": percentile(eng["ttft"], 50), "ttft_p99_ms": percentile(eng["ttft"], 99),
           "tpot_p50_ms": percentile(eng["tpot"], 50), "tpot_p99_ms": percentile(eng["tpot"], 99),
           "output_tokens": eng["tokens"]}
    if not args.skip_hf:
        mixed = len(set(wl.prompt_lens)) > 1  # HF pads: mixed lengths run in batches of --hf-batch
        hf = hf_baseline.run(engine.config, wl, args.dtype, args.hf_batch if mixed else wl.count)
        row.update(hf_tok_s=hf["tok_s"], hf_wall_s=hf["wall_s"], ratio=eng["tok_s"] / hf["tok_s"])
    return row


def after_dirty(args, engine) -> dict:
    """W1 right after a batch that used every sampling, penalty and logprobs pass in every slot."""
    from engine import SamplingParams

    w1 = dataclasses.replace(WORKLOADS["W1"](), name="W1 after dirty")
    dirty = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                           frequency_penalty=0.5, logprobs=5, seed=0, max_new_tokens=8)
    engine.generate(list(w1.prompts()), dirty)
    return run_workload(args, w1, engine)


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = f"{'load':5} {'engine tok/s':>12} {'HF tok/s':>9} {'ratio':>6} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17}"
    print(head, file=out)
    for r in rows:
        hf = f"{r['hf_tok_s']:9.1f} {r['ratio']:6.2f}" if "hf_tok_s" in r else f"{'-':>9} {'-':>6}"
        print(f"{r['workload']:5} {r['engine_tok_s']:12.1f} {hf} {r['ttft_p50_ms']:8.0f}/{r['ttft_p99_ms']:<8.0f}"
              f" {r['tpot_p50_ms']:8.1f}/{r['tpot_p99_ms']:<8.1f}", file=out)


def sweep(args, engine, sizes: list[int]) -> list[dict]:
    rows = []
    for b in sizes:
        wl = Workload.fixed(f"B{b}", b, 128, 128)
        eng = engine_run(engine, wl)
        row = {"batch": b, "engine_tok_s": eng["tok_s"]}
        if not args.skip_hf:
            row["hf_tok_s"] = hf_baseline.run(engine.config, wl, args.dtype, b)["tok_s"]
        print(f"batch {b:4d}: engine {row['engine_tok_s']:8.1f} tok/s   HF {row.get('hf_tok_s', float('nan')):8.1f}",
              file=sys.stderr)
        rows.append(row)
    plot_sweep(rows, args.plot)
    return rows


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["batch"] for r in rows]
    ax.plot(sizes, [r["engine_tok_s"] for r in rows], "o-", label="this engine (JAX)")
    if all("hf_tok_s" in r for r in rows):
        ax.plot(sizes, [r["hf_tok_s"] for r in rows], "s--", label="HF transformers generate")
    ax.set(xscale="log", xlabel="batch size (prompts of 128 in / 128 out)", ylabel="output tokens / s",
           title="GPT-2 124M greedy decode throughput")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    from engine import Engine

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; expected some of {sorted(WORKLOADS)}")
    workloads = [WORKLOADS[n]() for n in names]
    need = max(w.max_total for w in workloads)
    max_seq_len = max(args.max_seq_len, need)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, load_format="dummy", dtype=args.dtype, max_slots=args.max_slots,
                                    decode_steps=args.decode_steps, max_seq_len=max_seq_len,
                                    enable_prefix_caching=args.enable_prefix_caching,
                                    kv_slot_groups=args.kv_slot_groups)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - t0
    print(f"loaded in {load_s:.1f}s, compiled in {compile_s:.1f}s", file=sys.stderr)
    result = {"model": args.model, "dtype": args.dtype, "max_slots": args.max_slots,
              "enable_prefix_caching": args.enable_prefix_caching,
              "kv_slot_groups": engine.engine_config.kv_slot_groups, "decode_steps": args.decode_steps,
              "max_seq_len": max_seq_len, "compile_s": compile_s,
              "load_s": load_s, **environment()}
    if args.sweep_batch:
        result["sweep"] = sweep(args, engine, [int(b) for b in args.sweep_batch.split(",")])
    rows = [run_workload(args, wl, engine) for wl in workloads]
    if args.after_dirty:
        rows.append(after_dirty(args, engine))
    gflops = matmul_gflops()
    for r, wl in zip(rows, workloads + [WORKLOADS["W1"]()] * args.after_dirty):
        # Every FLOP the job needs (prompt forward + each output token's forward), over the wall time.
        r["engine_gflop_s"] = workload_flops(engine.config, wl) / r["engine_wall_s"] / 1e9
        r["roof_fraction"] = r["engine_gflop_s"] / gflops
    result.update(workloads=rows, matmul_gflops=gflops)
    print_table(rows)
    print(f"matmul roof {gflops:.1f} GFLOP/s; engine achieved (prompt + output FLOPs / wall): "
          + ", ".join(f"{r['workload']} {r['engine_gflop_s']:.0f} GFLOP/s = {100 * r['roof_fraction']:.0f}%"
                      for r in rows))
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
