"""Prompt-scoring throughput of this engine against HF transformers forward passes, in the same run, and
the matmul roof both are measured against.

Workload: N prompts x L tokens (default 256 x 512, random ids, fixed seed), each scored: every token after
the first gets its log-probability given the tokens before it, plus the top-1 (what lm-eval's
log-likelihood requests need). The engine runs its batched scoring prefill (`SamplingParams(max_new_tokens=0,
prompt_logprobs=1)`, the requests `Engine.score` makes), each request's entries copied into one float32
array as it finishes and the request dropped, so memory stays flat whatever N; HF runs
`GPT2LMHeadModel(input_ids)` under `torch.inference_mode` in batches of each --hf-batch size (one thread
per core, fp32), then fp32 log-softmax, gather and top-1, as lm-eval's `hf` backend does; the ratio is
against the fastest HF batch size. Both use the same random weights (an HF model saved with
save_pretrained and loaded by our loader), so the run also reports the largest logprob difference and how
many top-1 ids differ. Warm-up (compiling, first calls: the first --warmup-prompts prompts) is excluded;
the median of --repeats timed runs is reported.

The roof (`benchmarks/scoring_roof.py`): the workload's matmul FLOPs over the fp32 GEMM rates jax and
torch reach on this machine for the workload's shapes, measured before the engine, between the two sides
and after HF (the machine is shared: each side is held against the mean of the two roofs around it). The
1-minute load average is sampled every 5 s during each phase and reported with it. Prints a table, then
one JSON line last.

  python benchmarks/scoring.py --repeats 1              # 256 x 512, gpt2 fp32
  python benchmarks/scoring.py --prompts 32 --prompt-len 128 --repeats 2
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
    p.add_argument("--hf-batch", type=int, nargs="+", default=[4], help="prompts per HF forward pass (several: each)")
    p.add_argument("--warmup-prompts", type=int, default=16, help="prompts of the untimed warm-up run")
    p.add_argument("--repeats", type=int, default=3)
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
    """The 1-minute load average every `period` s while in a `with` block: mean and max."""

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

    def summary(self) -> dict:
        return {"mean": round(float(np.mean(self.samples)), 2), "max": round(float(np.max(self.samples)), 2)}


def timed(fn, prompts: list[list[int]], warmup: int, repeats: int) -> tuple[float, tuple, dict]:
    """(median wall seconds, the last run's outputs, the load during the timed runs)."""
    fn(prompts[:warmup])  # warm-up: compiles the engine's programs / first-call allocations
    with LoadSampler() as load:
        runs = [fn(prompts) for _ in range(repeats)]
    return float(np.median([r[0] for r in runs])), runs[-1][1:], load.summary()


def roof_rates(args, cfg) -> dict:
    """GEMM rates at the engine's call shapes: `prefill_token_budget` rows per block GEMM (HF's batches of 4 x
    512 are the same), LM-head chunks of SCORE_CHUNK rows (HF's whole batch is measured too)."""
    from engine.scoring import SCORE_CHUNK

    return scoring_roof.measure_rates(cfg.n_embd, cfg.n_head, cfg.vocab_size, args.prompt_len,
                                      args.prefill_token_budget, head_rows=SCORE_CHUNK)


def add_roof(row: dict, flops: dict, before: dict, after: dict, side: str) -> None:
    """Hold `side` against the mean of the roofs measured before and after it."""
    rates = {k: (before["gflops"][k] + after["gflops"][k]) / 2 for k in before["gflops"]}
    r = scoring_roof.roof(flops, rates)
    row[f"{side}_roof_s"] = r["roof_s"]
    row[f"{side}_gflops"] = r["useful_tflop"] * 1e3 / row[f"{side}_s"]
    row[f"{side}_roof_fraction"] = r["roof_s"] / row[f"{side}_s"]


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
    tokens = args.prompts * args.prompt_len
    flops = scoring_roof.workload_flops(cfg.n_layer, cfg.n_embd, cfg.vocab_size, args.prompts, args.prompt_len)
    roofs = [] if args.skip_roof else [roof_rates(args, cfg)]
    eng_s, (eng_lp, eng_top), eng_load = timed(lambda ps: engine_scores(engine, ps), prompts, args.warmup_prompts,
                                                args.repeats)
    row = {"prompts": args.prompts, "prompt_len": args.prompt_len, "engine_s": eng_s, "engine_tok_s": tokens / eng_s,
           "engine_load": eng_load}
    if not args.skip_roof:
        roofs.append(roof_rates(args, cfg))
        add_roof(row, flops, roofs[0], roofs[1], "engine")
    if not args.skip_hf:
        hf = {b: timed(lambda ps, b=b: hf_scores(hf_model, ps, b), prompts, args.warmup_prompts, args.repeats)
              for b in args.hf_batch}
        best = min(hf, key=lambda b: hf[b][0])
        hf_s, (hf_lp, hf_top), hf_load = hf[best]
        row.update(hf_s=hf_s, hf_tok_s=tokens / hf_s, hf_best_batch=best, ratio=hf_s / eng_s, hf_load=hf_load,
                   hf_tok_s_per_batch={b: tokens / s for b, (s, _, _) in hf.items()},
                   max_abs_logprob_diff=float(np.abs(eng_lp - hf_lp).max()),
                   top1_id_mismatches=int((eng_top != hf_top).sum()))
        if not args.skip_roof:
            roofs.append(roof_rates(args, cfg))
            add_roof(row, flops, roofs[1], roofs[2], "hf")
            row["max_ratio_at_roof"] = 1 / row["hf_roof_fraction"]
    if roofs:
        row.update(flops={k: v / 1e12 for k, v in flops.items()}, roof_measurements=roofs)
    print_table(args, row)
    print(json.dumps({"benchmark": "scoring", "model": args.model, "max_slots": args.max_slots,
                      "prefill_token_budget": args.prefill_token_budget, "warmup_prompts": args.warmup_prompts,
                      "repeats": args.repeats, **row, **environment()}))


def print_table(args, row: dict) -> None:
    print(f"{'workload':>12} {'side':>6} {'tok/s':>7} {'GFLOP/s':>8} {'of roof':>7} {'load':>10}")
    for side in ("engine", "hf"):
        if f"{side}_s" not in row:
            continue
        gflops = row.get(f"{side}_gflops", float("nan"))
        frac = row.get(f"{side}_roof_fraction", float("nan"))
        load = row[f"{side}_load"]
        print(f"{args.prompts:>5}x{args.prompt_len:<6} {side:>6} {row[f'{side}_tok_s']:7.1f} {gflops:8.1f} "
              f"{frac:7.0%} {load['mean']:5.1f}/{load['max']:<4.1f}")
    if "ratio" in row:
        print(f"ratio {row['ratio']:.2f} (max at the roof: {row.get('max_ratio_at_roof', float('nan')):.2f}); "
              f"max |logprob diff| {row['max_abs_logprob_diff']:.2e}; top-1 mismatches {row['top1_id_mismatches']}")


if __name__ == "__main__":
    main()
