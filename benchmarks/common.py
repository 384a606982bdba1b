"""Workloads and measurements shared by the benchmark scripts (engine side, roof, FLOP counts)."""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    @classmethod
    def fixed(cls, name: str, count: int, prompt_len: int, output_len: int) -> Workload:
        return cls(name, (prompt_len,) * count, (output_len,) * count)

    @classmethod
    def mixed(cls, name: str, count: int, prompt_range, output_range, seed: int) -> Workload:
        rng = np.random.default_rng(seed)
        prompts = rng.integers(prompt_range[0], prompt_range[1] + 1, count)
        outputs = rng.integers(output_range[0], output_range[1] + 1, count)
        return cls(name, tuple(int(p) for p in prompts), tuple(int(o) for o in outputs))

    @property
    def count(self) -> int:
        return len(self.prompt_lens)

    @property
    def max_total(self) -> int:
        return max(p + o for p, o in zip(self.prompt_lens, self.output_lens))

    def prompts(self, vocab: int = 50257, seed: int = 1) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab, n).tolist() for n in self.prompt_lens]


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def engine_run(engine, wl: Workload, seed: int = 1) -> dict:
    """Run a workload through the engine's step loop (all requests queued at t=0), greedy, eos ignored;
    `seed` draws the prompts' tokens. An untimed warm-up of 4 short requests draws its own (a prefix
    cache must not find the timed prompts' blocks there).

    Returns output tokens/s over the wall time and per-request TTFT / TPOT in milliseconds."""
    from engine import SamplingParams

    def submit(count=None, max_out=None, tokens_seed=seed):
        reqs = []
        for prompt, out_len in list(zip(wl.prompts(seed=tokens_seed), wl.output_lens))[:count]:
            out_len = min(out_len, max_out or out_len)
            sp = SamplingParams(max_new_tokens=out_len, temperature=0.0, ignore_eos=True)
            (req,) = engine.requests.make(prompt, sp)
            engine.add_request(req)
            reqs.append(req)
        return reqs

    warm = submit(count=4, max_out=4, tokens_seed=seed + 1)  # untimed: first-call allocations (compiled already)
    while not all(r.finished for r in warm):
        engine.step()
    start = time.perf_counter()
    reqs, first, done = submit(), {}, {}
    while len(done) < len(reqs):
        updates = engine.step()
        now = time.perf_counter()
        for u in updates:
            first.setdefault(id(u.request), now)
            if u.finished:
                done[id(u.request)] = now
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in reqs)
    ttft = [1e3 * (first[id(r)] - start) for r in reqs]
    tpot = [1e3 * (done[id(r)] - first[id(r)]) / max(1, len(r.output_token_ids) - 1) for r in reqs]
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "ttft": ttft, "tpot": tpot}


def matmul_gflops(m: int = 256, k: int = 768, n: int = 3072, repeats: int = 20) -> float:
    """The machine's fp32 matmul roof for GPT-2-shaped products: best of JAX and torch, median of repeats."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = 2 * m * k * n / median_time(lambda: jax.block_until_ready(f(a, b)), repeats) / 1e9
    try:
        import torch

        ta, tb = torch.ones(m, k), torch.ones(k, n)
        best = max(best, 2 * m * k * n / median_time(lambda: ta @ tb, repeats) / 1e9)
    except ImportError:
        pass
    return best


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def token_flops(cfg, context: int, lm_head: bool) -> float:
    """Forward FLOPs of one token: weight matmuls, attention over `context` keys, the tied LM head if used."""
    d, layers = cfg.n_embd, cfg.n_layer
    weights = layers * 12 * d * d + (d * cfg.vocab_size if lm_head else 0)
    return 2.0 * weights + 4.0 * layers * d * context


def workload_flops(cfg, wl: Workload) -> float:
    """FLOPs a workload needs: each prompt's forward (LM head on its last token only), then each output
    token's forward over its growing context."""
    total = 0.0
    for p, o in zip(wl.prompt_lens, wl.output_lens):
        total += sum(token_flops(cfg, i + 1, lm_head=i == p - 1) for i in range(p))
        total += sum(token_flops(cfg, p + j + 1, lm_head=True) for j in range(o - 1))
    return total


def emit(result: dict, json_out: str | None) -> None:
    """The benchmark's one JSON line on stdout (last), and the same object in `json_out` when given."""
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
