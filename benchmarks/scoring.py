"""Prompt-scoring throughput of this engine against HF transformers forward passes, in the same run.

Workload: N prompts x L tokens (default 256 x 512, random ids, fixed seed), each scored: every token after
the first gets its log-probability given the tokens before it, plus the top-1 (what lm-eval's
log-likelihood requests need). The engine runs `Engine.score` (prompts packed into its batched scoring
prefill); HF runs `GPT2LMHeadModel(input_ids)` under `torch.inference_mode` in batches of each --hf-batch
size (one thread per core, fp32), then fp32 log-softmax, gather and top-1, as lm-eval's `hf` backend does;
the ratio is against the fastest HF batch size. Both use the same random weights (an HF model saved with
save_pretrained and loaded by our loader), so the run also reports the largest logprob difference. Warm-up
(compiling, first calls: the first --warmup-prompts prompts) is excluded; the median of --repeats timed
runs is reported. Prints a table, then one JSON line last.

  python benchmarks/scoring.py                          # 256 x 512, gpt2 fp32
  python benchmarks/scoring.py --prompts 32 --prompt-len 128 --repeats 2
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

from benchmarks import hf_baseline  # noqa: E402
from benchmarks.throughput import environment  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset (random weights): gpt2, gpt2-medium, ...")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-slots", type=int, default=8,
                   help="scoring requests free their slot at prefill: a few slots suffice (64 x 1024 positions of "
                        "KV cache is 4.8 GB for gpt2)")
    p.add_argument("--prefill-token-budget", type=int, default=2048, help="tokens per scoring prefill call")
    p.add_argument("--hf-batch", type=int, nargs="+", default=[8], help="prompts per HF forward pass (several: each)")
    p.add_argument("--warmup-prompts", type=int, default=16, help="prompts of the untimed warm-up run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="measure the engine only")
    return p.parse_args(argv)


def make_checkpoint(name: str, folder: str):
    """An HF GPT-2 of the preset's shape with random weights, saved for our loader; returns the HF model."""
    from engine.config import preset

    model = hf_baseline._model(preset(name), "float32")
    model.save_pretrained(folder)
    return model


def engine_scores(engine, prompts: list[list[int]]) -> tuple[float, np.ndarray]:
    """Wall seconds and the logprobs [N, L-1] of one `Engine.score` over every prompt."""
    start = time.perf_counter()
    scored = engine.score(prompts, top_n=1)
    wall = time.perf_counter() - start
    return wall, np.array([[e.logprob for e in s[1:]] for s in scored], np.float32)


def hf_scores(model, prompts: list[list[int]], batch: int) -> tuple[float, np.ndarray]:
    """Wall seconds and logprobs [N, L-1]: forward, fp32 log-softmax, gather at the next token, top-1."""
    import torch

    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch])
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[:, :-1]
            chosen = logp.gather(-1, ids[:, 1:, None])[..., 0]
            logp.topk(1, dim=-1)
            out.append(chosen.numpy())
    return time.perf_counter() - start, np.concatenate(out)


def timed(fn, prompts: list[list[int]], warmup: int, repeats: int) -> tuple[float, np.ndarray]:
    fn(prompts[:warmup])  # warm-up: compiles the engine's programs / first-call allocations
    runs = [fn(prompts) for _ in range(repeats)]
    return float(np.median([w for w, _ in runs])), runs[-1][1]


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from engine import Engine

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 50257, (args.prompts, args.prompt_len)).tolist()
    with tempfile.TemporaryDirectory() as folder:
        hf_model = make_checkpoint(args.model, folder)
        engine = Engine.from_pretrained(folder, max_slots=args.max_slots, max_seq_len=min(1024, 2 * args.prompt_len),
                                        prefill_token_budget=args.prefill_token_budget)
    tokens = args.prompts * args.prompt_len
    eng_s, eng_lp = timed(lambda ps: engine_scores(engine, ps), prompts, args.warmup_prompts, args.repeats)
    row = {"prompts": args.prompts, "prompt_len": args.prompt_len, "engine_s": eng_s, "engine_tok_s": tokens / eng_s}
    if not args.skip_hf:
        hf = {b: timed(lambda ps, b=b: hf_scores(hf_model, ps, b), prompts, args.warmup_prompts, args.repeats)
              for b in args.hf_batch}
        best = min(hf, key=lambda b: hf[b][0])
        hf_s, hf_lp = hf[best]
        row.update(hf_s=hf_s, hf_tok_s=tokens / hf_s, hf_best_batch=best, ratio=hf_s / eng_s,
                   hf_tok_s_per_batch={b: tokens / s for b, (s, _) in hf.items()},
                   max_abs_logprob_diff=float(np.abs(eng_lp - hf_lp).max()))
    print(f"{'workload':>12} {'engine tok/s':>12} {'HF tok/s':>9} {'ratio':>6} {'max |diff|':>10}")
    hf_cols = (f"{row['hf_tok_s']:9.0f} {row['ratio']:6.2f} {row['max_abs_logprob_diff']:10.2e}"
               if "hf_s" in row else f"{'-':>9} {'-':>6} {'-':>10}")
    print(f"{args.prompts:>5}x{args.prompt_len:<6} {row['engine_tok_s']:12.0f} {hf_cols}")
    print(json.dumps({"benchmark": "scoring", "model": args.model, "max_slots": args.max_slots,
                      "prefill_token_budget": args.prefill_token_budget, "warmup_prompts": args.warmup_prompts,
                      "repeats": args.repeats, **row, **environment()}))


if __name__ == "__main__":
    main()
