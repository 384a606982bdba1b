"""GPT-2 inference on JAX + Flax NNX: `Engine`, `SamplingParams`, `Completion`.

`Engine`, `Completion` and `TokenLogprob` are imported on first use, so `import engine` (and the command
lines' flag checks) stay fast and JAX-free until the engine itself is needed.
"""
from __future__ import annotations

import importlib

from engine.config import EngineConfig, GPT2Config
from engine.sampling import SamplingParams

_LAZY = {"Engine": "engine.engine", "Completion": "engine.requests", "TokenLogprob": "engine.requests"}

__all__ = ["Completion", "Engine", "EngineConfig", "GPT2Config", "SamplingParams", "TokenLogprob"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
