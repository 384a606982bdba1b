"""Prompt-scoring throughput of this engine against HF transformers forward passes, in the same run, and
the matmul roof both are measured against.

Workload: N prompts x L tokens (default 256 x 512, random ids, fixed seed), each scored: every token after
the first gets its log-probability given the tokens before it, plus the top-1 (what lm-eval's
log-likelihood requests need). The engine runs its batched scoring prefill (`SamplingParams(max_new_tokens=0,
prompt_logprobs=1)`, the requests `Engine.score` makes), each request's entries copied into one float32
array as it finishes and the request dropped, so memory stays flat whatever N; HF runs
`GPT2LMHeadModel(input_ids)` under `torch.inference_mode` in batches of --hf-batch prompts (one thread per
core, fp32), then fp32 log-softmax, gather and top-1, as lm-eval's `hf` backend does. Both use the same
random weights (an HF model saved with save_pretrained and loaded by our loader), so the run also reports
the largest logprob difference and how many top-1 ids differ.

On a shared machine the load moves by 2x within minutes, so the sides never run one after the other:
after an untimed warm-up (--warmup-prompts prompts each), the prompts go in rounds of --round, each side
scoring each round (which side goes first alternates), and after each round one sample of the roof
(`benchmarks/scoring_roof.py`: fp32 GEMM rates of jax and torch at the workload's shapes; the roof is
the workload's matmul FLOPs at each class's median rate over the samples). Reported: each side's summed
wall time, tok/s, achieved GFLOP/s and fraction of the roof, the 1-minute load average sampled every 5 s
while it ran, the ratio overall and per round. Prints a table, then one JSON line last.

  python benchmarks/scoring.py                          # 256 x 512, gpt2 fp32, rounds of 32
  python benchmarks/scoring.py --prompts 16 --prompt-len 128 --round 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hf_baseline, scoring_roof  # noqa: E402
from benchmarks.throughput import environment  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset (random weights): gpt2, gpt2-medium, ...")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-slots", type=int, default=4,
                   help="scoring requests free their slot at prefill: one call's prompts suffice (2048 / 512 = 4; "
                        "64 x 1024 positions of KV cache is 4.8 GB for gpt2)")
    p.add_argument("--prefill-token-budget", type=int, default=2048, help="tokens per scoring prefill call")
    p.add_argument("--hf-batch", type=int, default=4, help="prompts per HF forward pass")
    p.add_argument("--warmup-prompts", type=int, default=16, help="prompts of the untimed warm-up run")
    p.add_argument("--round", type=int, default=32,
                   help="prompts per round: each side scores each round in turn (alternating which goes first)")
    p.add_argument("--roof-repeats", type=int, default=2, help="timed calls per GEMM in each roof sample")
    p.add_argument("--skip-hf", action="store_true", help="measure the engine only")
    p.add_argument("--skip-roof", action="store_true", help="do not measure the GEMM roof")
    return p.parse_args(argv)


def make_checkpoint(name: str, folder: str):
    """An HF GPT-2 of the preset's shape with random weights, saved for our loader; returns the HF model."""
    from engine.config import preset

    model = hf_baseline._model(preset(name), "float32")
    model.save_pretrained(folder)
    return model


def engine_scores(engine, prompts: list[list[int]]) -> tuple[float, np.ndarray, np.ndarray]:
    """Wall seconds, logprobs f32[N, L-1] and top-1 ids i32[N, L-1], scoring every prompt through the
    engine's step loop; a finished request's entries go into the arrays and the request is dropped."""
    from engine import SamplingParams

    params = SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=1)
    logprobs = np.zeros((len(prompts), len(prompts[0]) - 1), np.float32)
    top = np.zeros(logprobs.shape, np.int32)
    start = time.perf_counter()
    row_of = {}
    for i, prompt in enumerate(prompts):
        (req,) = engine.requests.make(prompt, params)
        row_of[req.request_id] = i
        engine.add_request(req)
    while row_of:
        for update in engine.step():
            if update.finished:
                entries = update.request.prompt_logprobs[1:]
                i = row_of.pop(update.request.request_id)
                logprobs[i] = [e.logprob for e in entries]
                top[i] = [e.top[0][0] for e in entries]
    return time.perf_counter() - start, logprobs, top


def hf_scores(model, prompts: list[list[int]], batch: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Wall seconds, logprobs [N, L-1] and top-1 ids: forward, fp32 log-softmax, gather at the next token,
    top-1."""
    import torch

    out, tops = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch])
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[:, :-1]
            out.append(logp.gather(-1, ids[:, 1:, None])[..., 0].numpy())
            tops.append(logp.topk(1, dim=-1).indices[..., 0].numpy())
    return time.perf_counter() - start, np.concatenate(out), np.concatenate(tops)


class LoadSampler:
    """The 1-minute load average every `period` s while in a `with` block (`samples`, with one at entry and
    one at exit)."""

    def __init__(self, period: float = 5.0):
        self.period, self.samples, self._stop = period, [], threading.Event()

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def roof_rates(args, cfg) -> dict:
    """GEMM rates at the engine's call shapes: `prefill_token_budget` rows per block GEMM (HF's batches of 4 x
    512 are the same), LM-head chunks of SCORE_CHUNK rows (HF's whole batch is measured too)."""
    from engine.scoring import SCORE_CHUNK

    return scoring_roof.measure_rates(cfg.n_embd, cfg.n_head, cfg.vocab_size, args.prompt_len,
                                      args.prefill_token_budget, head_rows=SCORE_CHUNK, repeats=args.roof_repeats)


class Side:
    """One side's scoring function, its summed wall seconds and load samples, and its outputs [N, L-1]."""

    def __init__(self, name: str, fn, shape: tuple[int, int]):
        self.name, self.fn, self.seconds, self.loads, self.rounds = name, fn, 0.0, [], []
        self.logprobs, self.top = np.zeros(shape, np.float32), np.zeros(shape, np.int32)

    def run(self, prompts: list[list[int]], at: int) -> None:
        with LoadSampler() as load:
            wall, logprobs, top = self.fn(prompts)
        self.seconds += wall
        self.rounds.append(wall)
        self.loads += load.samples
        self.logprobs[at:at + len(prompts)], self.top[at:at + len(prompts)] = logprobs, top


def run_rounds(args, sides: list[Side], prompts: list[list[int]], cfg) -> list[dict]:
    """Warm each side up, then score the prompts in rounds of --round prompts, every side on each round (the
    order alternating round by round) and a roof sample after it: the sides share the machine's load."""
    for side in sides:
        side.fn(prompts[:args.warmup_prompts])  # compiles the engine's programs / first-call allocations
    roofs = []
    for i, at in enumerate(range(0, len(prompts), args.round)):
        part = prompts[at:at + args.round]
        for side in sides if i % 2 == 0 else sides[::-1]:
            side.run(part, at)
        if not args.skip_roof:
            roofs.append(roof_rates(args, cfg))
        print(f"round {i}: " + ", ".join(f"{s.name} {s.rounds[-1]:.1f}s" for s in sides), file=sys.stderr)
    return roofs


def side_fields(side: Side, tokens: int, roof: dict | None) -> dict:
    out = {f"{side.name}_s": side.seconds, f"{side.name}_tok_s": tokens / side.seconds,
           f"{side.name}_load": {"mean": round(float(np.mean(side.loads)), 2), "max": round(float(np.max(side.loads)), 2)},
           f"{side.name}_round_s": side.rounds}
    if roof is not None:
        out[f"{side.name}_gflops"] = roof["useful_tflop"] * 1e3 / side.seconds
        out[f"{side.name}_roof_fraction"] = roof["roof_s"] / side.seconds
    return out


def median_roof(flops: dict, roofs: list[dict]) -> dict | None:
    """The roof at each class's median rate over the samples (None without samples)."""
    if not roofs:
        return None
    rates = {k: float(np.median([r["gflops"][k] for r in roofs])) for k in roofs[0]["gflops"]}
    return {**scoring_roof.roof(flops, rates), "median_gflops": rates}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from engine import Engine
    from engine.config import preset

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = preset(args.model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 50257, (args.prompts, args.prompt_len)).tolist()
    with tempfile.TemporaryDirectory() as folder:
        hf_model = make_checkpoint(args.model, folder)
        engine = Engine.from_pretrained(folder, max_slots=args.max_slots, max_seq_len=min(1024, 2 * args.prompt_len),
                                        prefill_token_budget=args.prefill_token_budget)
    shape = (args.prompts, args.prompt_len - 1)
    sides = [Side("engine", lambda ps: engine_scores(engine, ps), shape)]
    if not args.skip_hf:
        sides.append(Side("hf", lambda ps: hf_scores(hf_model, ps, args.hf_batch), shape))
    roofs = run_rounds(args, sides, prompts, cfg)
    flops = scoring_roof.workload_flops(cfg.n_layer, cfg.n_embd, cfg.vocab_size, args.prompts, args.prompt_len)
    roof = median_roof(flops, roofs)
    tokens = args.prompts * args.prompt_len
    row = {"prompts": args.prompts, "prompt_len": args.prompt_len, "round": args.round}
    for side in sides:
        row.update(side_fields(side, tokens, roof))
    if len(sides) == 2:
        eng, hf = sides
        per_round = [h / e for e, h in zip(eng.rounds, hf.rounds)]
        row.update(ratio=hf.seconds / eng.seconds, ratio_per_round={"median": float(np.median(per_round)),
                                                                   "min": min(per_round), "max": max(per_round)},
                   max_abs_logprob_diff=float(np.abs(eng.logprobs - hf.logprobs).max()),
                   top1_id_mismatches=int((eng.top != hf.top).sum()))
        if roof is not None:
            row["max_ratio_at_roof"] = 1 / row["hf_roof_fraction"]
    if roof is not None:
        row.update(flops_tflop={k: v / 1e12 for k, v in flops.items()}, roof=roof, roof_samples=roofs)
    print_table(args, row)
    print(json.dumps({"benchmark": "scoring", "model": args.model, "max_slots": args.max_slots,
                      "prefill_token_budget": args.prefill_token_budget, "hf_batch": args.hf_batch,
                      "warmup_prompts": args.warmup_prompts, **row, **environment()}))


def print_table(args, row: dict) -> None:
    print(f"{'workload':>12} {'side':>6} {'tok/s':>7} {'GFLOP/s':>8} {'of roof':>7} {'load mean/max':>13}")
    for side in ("engine", "hf"):
        if f"{side}_s" not in row:
            continue
        gflops = row.get(f"{side}_gflops", float("nan"))
        frac = row.get(f"{side}_roof_fraction", float("nan"))
        load = row[f"{side}_load"]
        print(f"{args.prompts:>5}x{args.prompt_len:<6} {side:>6} {row[f'{side}_tok_s']:7.1f} {gflops:8.1f} "
              f"{frac:7.0%} {load['mean']:6.1f}/{load['max']:<4.1f}")
    if "roof" in row:
        print(f"roof {row['roof']['roof_gflops']:.1f} GFLOP/s ({row['roof']['roof_s']:.0f} s for "
              f"{row['roof']['useful_tflop']:.1f} TFLOP)")
    if "ratio" in row:
        r = row["ratio_per_round"]
        print(f"ratio {row['ratio']:.2f} (per round {r['median']:.2f}, {r['min']:.2f}-{r['max']:.2f}; max at the "
              f"roof: {row.get('max_ratio_at_roof', float('nan')):.2f}); max |logprob diff| "
              f"{row['max_abs_logprob_diff']:.2e}; top-1 mismatches {row['top1_id_mismatches']}")


if __name__ == "__main__":
    main()
