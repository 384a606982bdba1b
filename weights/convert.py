"""`python -m weights.convert MODEL OUT_DIR [--dtype float32|bfloat16]`: HF safetensors -> orbax.

Reads MODEL (a local HF GPT-2 folder or a hub id) through the safetensors loader, then writes the converted
NNX state as an orbax checkpoint plus `config.json` and the tokenizer files into OUT_DIR.
`Engine.from_pretrained(OUT_DIR)` then restores it straight into any mesh's shardings, skipping the
per-slice layout work of the safetensors path.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import jax.numpy as jnp

from engine.config import DTYPES
from weights import checkpoint, hf
from weights.loader import load_safetensors

log = logging.getLogger("weights.convert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m weights.convert", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="HF GPT-2 folder (config.json + *.safetensors) or hub id")
    parser.add_argument("out_dir", help="output folder (gets config.json, orbax/, tokenizer files)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype to store")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        folder = hf.resolve(args.model)
        cfg = hf.read_config(folder)
        _, state = load_safetensors(hf.weight_files(folder), cfg, jnp.dtype(args.dtype))
        out = checkpoint.save(args.out_dir, cfg, state, tokenizer_from=folder)
    except hf.CheckpointError as e:
        log.error("%s", e)
        return 1
    log.info("wrote %s (%s, %s) in %.1f s", out, args.dtype, cfg, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
