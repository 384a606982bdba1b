"""Does the `data` axis scale prefill? One prefill-heavy job on one device and on data=D fake devices.

Workload (issue #12): 64 prompts x 480 tokens (random ids), 2 new tokens each, greedy, on a 3-layer GPT-2
(random weights, gpt2's width). Both engines run in this process over --devices fake CPU devices that share
this machine's cores: `data=1,model=1` on the first device, then `data=D,model=1` on all of them. A
data-parallel engine does the same total work on D devices (each prefills only its own slots' prompts),
so on shared cores its wall time should be about the one-device time; an engine that replicates prefill
over `data` costs up to D times as much. Warm-up (compiling) is excluded. Prints a table, then one JSON
line last.

  python benchmarks/data_parallel.py                # 64 x 480, data=8
  python benchmarks/data_parallel.py --prompts 16 --prompt-len 240
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices; the data axis of the second run")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=480)
    p.add_argument("--new-tokens", type=int, default=2)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mesh (the best is reported)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from benchmarks.common import Workload, engine_run
    from benchmarks.random_checkpoint import write_random_checkpoint
    from benchmarks.throughput import environment
    from engine import Engine
    from engine.config import GPT2Config
    from engine.sharding import make_mesh

    wl = Workload.fixed("prefill-heavy", args.prompts, args.prompt_len, args.new_tokens)
    folder = write_random_checkpoint(GPT2Config(n_layer=args.layers), tempfile.mkdtemp(prefix="dp_bench_"))
    options = dict(max_slots=args.max_slots, max_seq_len=512, decode_steps=args.new_tokens)
    rows = []
    for data in (1, args.devices):
        mesh = make_mesh(f"data={data},model=1", jax.devices()[:data])
        engine = Engine.from_pretrained(folder, mesh=mesh, **options)
        engine.warmup()
        wall = min(engine_run(engine, wl)["wall_s"] for _ in range(args.repeats))
        rows.append({"mesh": f"data={data},model=1", "wall_s": wall, "prompt_tok_s": sum(wl.prompt_lens) / wall})
        del engine
    result = {**environment(), "workload": f"{args.prompts} x {args.prompt_len} in, {args.new_tokens} out",
              "layers": args.layers, "devices": args.devices, "runs": rows,
              "data_over_one": rows[1]["wall_s"] / rows[0]["wall_s"]}
    print(f"{'mesh':<16} {'wall s':>8} {'prompt tok/s':>13}")
    for r in rows:
        print(f"{r['mesh']:<16} {r['wall_s']:8.2f} {r['prompt_tok_s']:13.0f}")
    print(f"data={args.devices} wall / one device: {result['data_over_one']:.2f}x "
          f"(replicated prefill would approach {args.devices}x)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
