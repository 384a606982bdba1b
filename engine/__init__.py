"""GPT-2 inference on JAX + Flax NNX: `Engine`, `SamplingParams`, `Completion`."""
from engine.config import EngineConfig, GPT2Config
from engine.engine import Engine
from engine.requests import Completion, TokenLogprob
from engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "GPT2Config", "SamplingParams", "TokenLogprob"]
