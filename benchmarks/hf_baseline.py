"""The HF transformers baseline: `GPT2LMHeadModel.generate` on the same workload, run as a user would."""
from __future__ import annotations

import os
import time

from benchmarks.common import Workload


def _model(cfg, dtype: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                        n_positions=cfg.n_positions)
    model = GPT2LMHeadModel(hf_cfg).eval().to(_device())
    return model.to(torch.bfloat16) if dtype == "bfloat16" else model


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_CACHE: dict = {}


def run(cfg, wl: Workload, dtype: str, batch: int) -> dict:
    """Greedy generate, eos ignored, in left-padded batches of `batch` (each to its longest output).

    Counts only the tokens each request asked for; returns output tokens/s over the wall time."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    key = (cfg, dtype)
    if key not in _CACHE:
        _CACHE[key] = _model(cfg, dtype)
    model = _CACHE[key]
    prompts = wl.prompts()
    order = list(range(wl.count))
    batch = min(batch, wl.count)
    _generate(model, [prompts[0][:8]], 2)  # warm-up
    start = time.perf_counter()
    for i in range(0, wl.count, batch):
        idx = order[i: i + batch]
        _generate(model, [prompts[j] for j in idx], max(wl.output_lens[j] for j in idx))
    _sync()
    wall = time.perf_counter() - start
    return {"tok_s": sum(wl.output_lens) / wall, "wall_s": wall}


def _generate(model, prompts: list[list[int]], new_tokens: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 50256, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        return model.generate(input_ids=ids.to(_device()), attention_mask=mask.to(_device()), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
