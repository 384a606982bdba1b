"""Why the decode program compiles ~1000 kernels: XLA:CPU emits every matrix-vector dot as a kernel of its own.

    python benchmarks/attention_kernels.py [--slots 4,16] [--repeats 20] [--json-out F]

A toy of one layer's decode attention as the engine builds it (`engine.model._attend_blocks`): 64 block
arrays [slots, 12 heads, 128 positions, 64], each score product q [slots, 12, 1, 64] x block in a
`lax.cond` (a block not read scores -inf), then summed. Each formulation is compiled in this process and
reports its compile seconds, the machine-code objects in the serialized executable (each is loaded as 3
code mappings), its size, and the median run time with every block read:
- `gemv` (the engine's): one batched matrix-vector product per block;
- `gemm2`: the query padded to 2 rows, so a matrix-matrix product the GEMM library runs without a kernel;
- `gemm2_flat`: the same with slots and heads as one batch axis;
- `mul_sum`: multiply and sum, a fusion (identical fusions share one kernel).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental.serialize_executable import serialize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit  # noqa: E402
from benchmarks.throughput import environment  # noqa: E402

BLOCKS, HEADS, POSITIONS, HEAD_DIM = 64, 12, 128, 64
MODES = ("gemv", "gemm2", "gemm2_flat", "mul_sum")


def _scores(mode: str, q: jax.Array, k: jax.Array) -> jax.Array:
    b, h, t, d = q.shape
    if mode == "mul_sum":
        return (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1)
    if mode == "gemm2_flat":
        return jnp.einsum("btk,bwk->btw", q.reshape(b * h, t, d), k.reshape(b * h, -1, d)).reshape(b, h, t, -1)
    return jnp.einsum("bhtk,bhwk->bhtw", q, k, preferred_element_type=jnp.float32)


def program(mode: str):
    def run(q, ks, count):
        total = None
        for i, k in enumerate(ks):
            part = jax.lax.cond(i < count, lambda q, k=k: _scores(mode, q, k),
                                lambda q: jnp.full(q.shape[:3] + (POSITIONS,), -1e30, jnp.float32), q)
            total = part if total is None else total + part
        return total
    return jax.jit(run)


def measure(mode: str, slots: int, repeats: int) -> dict:
    rows = 2 if mode.startswith("gemm2") else 1
    q = jnp.ones((slots, HEADS, rows, HEAD_DIM), jnp.float32)
    ks = [jnp.full((slots, HEADS, POSITIONS, HEAD_DIM), 0.01 * i, jnp.float32) for i in range(BLOCKS)]
    lowered = program(mode).lower(q, ks, BLOCKS)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    blob = serialize(compiled)[0]
    jax.block_until_ready(compiled(q, ks, BLOCKS))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, ks, BLOCKS))
        times.append(time.perf_counter() - t0)
    return {"compile_s": round(compile_s, 2), "objects": blob.count(b"\x7fELF"), "mb": round(len(blob) / 1e6, 2),
            "run_ms": round(1000 * sorted(times)[len(times) // 2], 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", default="4,16", help="comma-separated slot counts (rows of one slot group)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    results = {}
    for slots in (int(s) for s in args.slots.split(",")):
        for mode in MODES:
            results[f"{mode} slots={slots}"] = measure(mode, slots, args.repeats)
    print(f"{'formulation':22s} {'compile s':>9s} {'objects':>8s} {'MB':>6s} {'run ms':>8s} {'x gemv':>7s}", file=sys.stderr)
    for name, r in results.items():
        base = results[f"gemv slots={name.split('=')[1]}"]["run_ms"]
        print(f"{name:22s} {r['compile_s']:9.2f} {r['objects']:8d} {r['mb']:6.2f} {r['run_ms']:8.2f} "
              f"{r['run_ms'] / base:7.2f}", file=sys.stderr)
    out = {"benchmark": "attention_kernels", "blocks": BLOCKS, "results": results, "environment": environment()}
    emit(out, args.json_out)


if __name__ == "__main__":
    main()
