"""Shared test setup: 8 fake CPU devices (set before JAX initialises), offline hub and datasets access, and
one tiny engine shared by the test files that only need engine behaviour (its compiled programs are reused)."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads its task files through `datasets`
os.environ.setdefault("JAX_PLATFORMS", "cpu")


TINY_ENGINE_OPTIONS = dict(max_slots=2, max_seq_len=128, decode_steps=4, prefill_buckets=(32,), prefill_token_budget=32)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """An Engine over a tiny random GPT-2 with TINY_ENGINE_OPTIONS; tests must leave it idle."""
    from engine.engine import Engine
    from tests.checkpoints import make_tiny_checkpoint

    return Engine.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_engine")), **TINY_ENGINE_OPTIONS)


@pytest.fixture(scope="session")
def batch_model(tmp_path_factory):
    """A tiny GPT-2 checkpoint folder (with the GPT-2 tokenizer) for the `launch.batch` subprocess tests."""
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("batch_gpt2"))


@pytest.fixture(scope="session")
def batch_env(tmp_path_factory) -> dict:
    """The environment of a `launch.batch` subprocess: offline, 8 fake CPU devices, and one compilation cache
    shared by every such run, so only the first compiles."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
