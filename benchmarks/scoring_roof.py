"""The matmul roof of a scoring workload: what the machine's fp32 GEMMs allow, whoever runs them.

Scoring N prompts x L tokens with GPT-2 is a chain of matmuls. Per token (D embed, F = 4D mlp, V vocab,
layers): the blocks' GEMMs 2 x D x (3D + D + F + F) per layer, the LM head 2 x D x V (every scored token
needs the whole row of logits for an exact log-softmax normaliser), and attention 4 x D x (t + 1) per layer
at position t (QK^T and PV over the causal prefix; both implementations compute the full L x L and mask
it, which `attention_implemented` counts). Elementwise work (LayerNorm, GELU, softmax, log-softmax) is
not counted: it is what an implementation can fuse or not, the overhead above the roof. The total equals
`benchmarks.common.token_flops` summed over every position with the LM head on.

`measure_rates` times, in this process and under the machine's current load, the fp32 GEMMs of the
workload's shapes with jax (XLA:CPU) and torch (oneDNN/MKL): [M, D] x [D, 3D | D | F], [M, F] x [F, D],
the LM head [C, D] x [D, V] at both sides' row counts, and the batched attention matmuls. The roof time
of the workload is sum over matmul classes of FLOPs / (the faster library's rate for that class): no
implementation of the exact computation can run faster on this machine at this load. A side's fraction
of the roof is roof time / its measured time; 1 / (HF's fraction) is the largest engine-vs-HF ratio the
machine allows.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from benchmarks.common import median_time


def workload_flops(n_layer: int, n_embd: int, vocab: int, prompts: int, length: int) -> dict[str, float]:
    """FLOPs of scoring `prompts` x `length` tokens, per matmul class (attention: causal, i.e. useful)."""
    d, f, tokens = n_embd, 4 * n_embd, prompts * length
    causal = length * (length + 1) / 2  # sum over positions t of the t + 1 keys each attends to
    return {
        "blocks": 2.0 * d * (3 * d + d + 2 * f) * n_layer * tokens,
        "lm_head": 2.0 * d * vocab * tokens,
        "attention": 4.0 * d * causal * n_layer * prompts,
        "attention_implemented": 4.0 * d * length * length * n_layer * prompts,
    }


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # first call: compilation, allocations
    return median_time(run, repeats)


def _jax_rate(shapes: tuple[tuple[int, ...], ...], repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    a, b = (jnp.asarray(np.random.default_rng(0).standard_normal(s, np.float32)) for s in shapes)
    f = jax.jit(jnp.matmul)
    return _matmul_flops(shapes) / _median_seconds(lambda: f(a, b).block_until_ready(), repeats) / 1e9


def _torch_rate(shapes: tuple[tuple[int, ...], ...], repeats: int) -> float:
    import torch

    a, b = (torch.from_numpy(np.random.default_rng(0).standard_normal(s, np.float32)) for s in shapes)
    with torch.inference_mode():
        return _matmul_flops(shapes) / _median_seconds(lambda: torch.matmul(a, b), repeats) / 1e9


def _matmul_flops(shapes: tuple[tuple[int, ...], ...]) -> float:
    (*batch, m, k), (*_, n) = shapes
    return 2.0 * float(np.prod(batch or [1])) * m * k * n


def gemm_shapes(n_embd: int, n_head: int, vocab: int, length: int, rows: int, head_rows: int) -> dict:
    """class -> list of (a shape, b shape): `rows` tokens per block GEMM, `head_rows` per LM-head chunk."""
    d, f, heads = n_embd, 4 * n_embd, n_head
    per_call = max(1, rows // length)  # prompts in one call's attention
    k = d // n_head
    return {
        "blocks": [((rows, d), (d, 3 * d)), ((rows, d), (d, d)), ((rows, d), (d, f)), ((rows, f), (f, d))],
        "lm_head": [((head_rows, d), (d, vocab)), ((rows, d), (d, vocab))],
        "attention": [((per_call * heads, length, k), (per_call * heads, k, length)),
                      ((per_call * heads, length, length), (per_call * heads, length, k))],
    }


def measure_rates(n_embd: int, n_head: int, vocab: int, length: int, rows: int, head_rows: int,
                  repeats: int = 5) -> dict:
    """GFLOP/s per class for jax and torch: a class's GEMMs timed one by one, its rate = its FLOPs (weighted
    as the workload weighs them: blocks by their FLOPs, the LM head at its best row count) / their time;
    `load` is the 1-minute load average before and after."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    before = os.getloadavg()[0]
    rates = {}
    for cls, shapes in gemm_shapes(n_embd, n_head, vocab, length, rows, head_rows).items():
        for lib, rate in (("jax", _jax_rate), ("torch", _torch_rate)):
            measured = [(_matmul_flops(s), rate(s, repeats)) for s in shapes]
            if cls == "lm_head":  # one GEMM per call shape: the faster row count is the roof
                rates[f"{cls}_{lib}"] = max(r for _, r in measured)
            else:
                rates[f"{cls}_{lib}"] = sum(fl for fl, _ in measured) / sum(fl / r for fl, r in measured)
    return {"gflops": rates, "load": [before, os.getloadavg()[0]]}


def roof(flops: dict[str, float], rates: dict[str, float]) -> dict:
    """Roof seconds (useful FLOPs at the faster library's rate per class) and the rate it implies."""
    classes = ("blocks", "lm_head", "attention")
    best = {c: max(rates[f"{c}_jax"], rates[f"{c}_torch"]) for c in classes}
    seconds = sum(flops[c] / (best[c] * 1e9) for c in classes)
    total = sum(flops[c] for c in classes)
    return {"roof_s": seconds, "roof_gflops": total / seconds / 1e9, "useful_tflop": total / 1e12,
            "best_gflops": best}
