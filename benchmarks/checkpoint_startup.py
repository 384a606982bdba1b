"""Start-up time: `Engine.from_pretrained` on an HF safetensors folder vs the same weights as orbax.

    python benchmarks/checkpoint_startup.py --model gpt2 --repeats 3 [--mesh data=1,model=4 --devices 4]

Writes a random checkpoint of the preset (safetensors, `--ckpt-dtype`), converts it with
`python -m weights.convert`, then times in fresh subprocesses (warm page cache after the first read):
the process's wall time until `from_pretrained` returned with every parameter ready, and the
`from_pretrained` call alone. Compilation is lazy and excluded from both. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CHILD = """
import json, sys, time
import jax
from engine import Engine
start = time.perf_counter()
engine = Engine.from_pretrained(sys.argv[1], dtype=sys.argv[2], mesh=None if sys.argv[3] == "none" else sys.argv[3],
                                max_slots=8, max_seq_len=64, load_format=sys.argv[4])
jax.block_until_ready(engine.runner.params)
print(json.dumps({"load_s": time.perf_counter() - start}))
"""


def time_child(folder: Path, fmt: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), args.dtype, args.mesh, fmt], env=env,
                         capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{fmt} load failed:\n{out.stderr[-3000:]}")
    return {"process_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="preset whose shapes the random checkpoint has")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--ckpt-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="none", help="'none' (one device) or data=D,model=M")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from benchmarks.random_checkpoint import write_random_checkpoint
    from engine.config import preset

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    try:
        hf_dir = write_random_checkpoint(preset(args.model), work / "hf", args.ckpt_dtype)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "weights.convert", str(hf_dir), str(work / "orbax"), "--dtype",
                        args.dtype], check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
        convert_s = time.perf_counter() - start
        runs = {fmt: [time_child(folder, fmt, args) for _ in range(args.repeats)]
                for fmt, folder in (("safetensors", hf_dir), ("orbax", work / "orbax"))}
    finally:
        shutil.rmtree(work)
    med = {fmt: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "process_s")} for fmt, rs in runs.items()}
    print(f"{args.model} ({args.ckpt_dtype} on disk -> {args.dtype}), mesh {args.mesh}, {args.devices} device(s); "
          f"{platform.machine()}, {os.cpu_count()} cores; median of {args.repeats}; convert took {convert_s:.1f} s")
    print(f"{'format':<13}{'from_pretrained s':>19}{'process to ready s':>20}")
    for fmt, m in med.items():
        print(f"{fmt:<13}{m['load_s']:>19.2f}{m['process_s']:>20.2f}")
    saved = med["safetensors"]["load_s"] - med["orbax"]["load_s"]
    print(f"orbax saves {saved:.2f} s of from_pretrained ({saved / med['safetensors']['load_s']:.0%})")
    print(json.dumps({"benchmark": "checkpoint_startup", "model": args.model, "mesh": args.mesh,
                      "devices": args.devices, "dtype": args.dtype, "convert_s": round(convert_s, 2),
                      "median": {f: {k: round(v, 3) for k, v in m.items()} for f, m in med.items()}}))


if __name__ == "__main__":
    main()
