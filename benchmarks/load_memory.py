"""Peak host memory of loading a safetensors checkpoint, unsharded vs sharded over fake CPU devices.

    python benchmarks/load_memory.py --model gpt2-xl --mesh data=1,model=5 --devices 5

Writes a random checkpoint of the preset once (streamed, `--ckpt-dtype bfloat16` halves it), then loads it
in fresh subprocesses with `weights.loader.load_safetensors`: once onto one device, once onto the mesh
(`--devices` fake CPU devices). Each child reports its own peak RSS (`ru_maxrss`) before and after the
load. On CPU the "device" memory is host memory, so the params themselves count once in both runs; what
sharding must not add is a full copy per device (each device's slice is read straight from the file).
The checkpoint is deleted afterwards unless `--keep`. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args: argparse.Namespace) -> None:
    import resource

    import jax
    import jax.numpy as jnp

    from engine.sharding import make_mesh, param_sharding_fn
    from weights import hf
    from weights.loader import load_safetensors

    folder = Path(args.dir)
    cfg = hf.read_config(folder)
    mesh = make_mesh(None if args.mesh == "none" else args.mesh)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    _, state = load_safetensors(hf.weight_files(folder), cfg, jnp.dtype(args.dtype), param_sharding_fn(mesh))
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(state)
    per_device = sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == mesh.devices.flat[0])
    print(json.dumps({"mesh": args.mesh, "devices": mesh.devices.size, "load_s": round(seconds, 2),
                      "rss_before_mb": before // 1024,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "params_mb": sum(a.nbytes for a in leaves) // 2**20,
                      "params_on_device0_mb": per_device // 2**20}))


def run_child(args: argparse.Namespace, mesh: str, devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, __file__, "--child", "--dir", args.dir, "--mesh", mesh, "--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {mesh} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-xl", help="preset whose shapes the random checkpoint has")
    p.add_argument("--mesh", default="data=1,model=5", help="the sharded run's mesh")
    p.add_argument("--devices", type=int, default=5, help="fake CPU devices for the sharded run")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype loaded into")
    p.add_argument("--ckpt-dtype", default="bfloat16", choices=("float32", "bfloat16"), help="dtype on disk")
    p.add_argument("--dir", default=None, help="checkpoint folder (default /tmp/<model>-random-<ckpt-dtype>)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dir = args.dir or f"/tmp/{args.model}-random-{args.ckpt_dtype}"
    if args.child:
        return child(args)
    from benchmarks.random_checkpoint import write_random_checkpoint
    from engine.config import preset

    if not (Path(args.dir) / "model.safetensors").is_file():
        start = time.perf_counter()
        write_random_checkpoint(preset(args.model), args.dir, args.ckpt_dtype)
        print(f"wrote {args.dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    size_mb = (Path(args.dir) / "model.safetensors").stat().st_size // 2**20
    try:
        rows = [run_child(args, "none", 1), run_child(args, args.mesh, args.devices)]
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)
    print(f"{args.model}: checkpoint {size_mb} MB ({args.ckpt_dtype}) loaded as {args.dtype}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'mesh':<18}{'devices':>8}{'load s':>9}{'params MB':>11}{'on dev0 MB':>12}{'RSS before':>12}"
          f"{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['mesh']:<18}{r['devices']:>8}{r['load_s']:>9}{r['params_mb']:>11}{r['params_on_device0_mb']:>12}"
              f"{r['rss_before_mb']:>12}{r['peak_rss_mb']:>13}")
    print(json.dumps({"benchmark": "load_memory", "model": args.model, "checkpoint_mb": size_mb,
                      "ckpt_dtype": args.ckpt_dtype, "dtype": args.dtype, "runs": rows}))


if __name__ == "__main__":
    main()
