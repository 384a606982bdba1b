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
def batch_env() -> dict:
    """The environment of a `launch.batch` subprocess: offline, 8 fake CPU devices, and the compile cache
    every entry point uses (`engine.compile_cache.enable_compilation_cache`), as the in-process tests do:
    only the first run of a program compiles it, and a later session loads it from the executable store."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
