"""Write a random GPT-2 checkpoint in HF's safetensors layout (`config.json` + `model.safetensors`).

The file is streamed tensor by tensor (8-byte header size, JSON header, raw little-endian data), so
writing gpt2-xl never holds more than one tensor in memory. Values are N(0, 0.02) (LayerNorm weights 1);
only the shapes and byte sizes matter to the load benchmarks that use it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from engine.config import GPT2Config
from weights.hf import expected_keys, hf_shape

_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def _values(shape: tuple[int, ...], rng: np.random.Generator, dtype: str, ones: bool) -> bytes:
    x = np.ones(shape, np.float32) if ones else rng.standard_normal(shape, np.float32) * np.float32(0.02)
    if dtype == "bfloat16":  # the top 16 bits of a float32 are its bfloat16 (truncation)
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    return x.astype("<f4").tobytes()


def write_random_checkpoint(cfg: GPT2Config, folder: str | Path, dtype: str = "float32", seed: int = 0) -> Path:
    """`folder/config.json` + `folder/model.safetensors` with every GPT-2 key of `cfg`; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(expected_keys(cfg))
    itemsize = 2 if dtype == "bfloat16" else 4
    header, offset = {}, 0
    for key in keys:
        shape = hf_shape(key, cfg)
        size = int(np.prod(shape)) * itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key in keys:
            f.write(_values(hf_shape(key, cfg), rng, dtype, ones=key.endswith(("ln_1.weight", "ln_2.weight",
                                                                                 "ln_f.weight"))))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    return folder
