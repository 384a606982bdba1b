"""Tiny random GPT-2 checkpoints for the tests: a `transformers.GPT2LMHeadModel` written by `save_pretrained`
(safetensors), plus the real GPT-2 tokenizer files the `engine` package ships (`engine/gpt2_tokenizer/`): the
suite never reads files from outside the repository.

Invariants: the weights depend only on `seed` and the config (torch's global RNG is seeded right before the
model is built), so each test file that picks its own seed and sizes gets the same checkpoint every run.
A missing torch/transformers skips the calling test, naming what is missing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.tokenizer import PACKAGED_DIR

TOKENIZER_DIR = PACKAGED_DIR
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def require_tokenizer() -> Path:
    """The packaged GPT-2 tokenizer folder (part of the repository: a missing one is a failure)."""
    assert all((TOKENIZER_DIR / f).is_file() for f in TOKENIZER_FILES), f"missing {TOKENIZER_DIR}/{TOKENIZER_FILES}"
    return TOKENIZER_DIR


def copy_tokenizer(folder: Path, source: Path = TOKENIZER_DIR) -> None:
    """Copies the GPT-2 tokenizer files from `source` (a tokenizer folder or a checkpoint) into `folder`."""
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)


def tiny_gpt2(*, n_layer: int = 2, n_head: int = 4, n_embd: int = 64, seed: int = 0, **config):
    """A random `GPT2LMHeadModel` (train mode, as constructed); `config` goes to `GPT2Config` as is."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                                                **config))


def make_tiny_checkpoint(folder: Path, *, with_tokenizer: bool = True, seed: int = 0, **config) -> Path:
    """`folder` holding a `tiny_gpt2(seed=seed, **config)` checkpoint and, unless told otherwise, the
    tokenizer files; returns `folder`."""
    if with_tokenizer:
        require_tokenizer()
    tiny_gpt2(seed=seed, **config).save_pretrained(folder)
    if with_tokenizer:
        copy_tokenizer(folder)
    return folder


def run_aborting(engine, prompts, params, aborted) -> list:
    """Queue every prompt, run one engine step (all admitted and prefilled, one decode call), abort the
    requests at indexes `aborted`, then step until the others finish; returns the requests."""
    reqs = [engine.requests.make(p, sp)[0] for p, sp in zip(prompts, params)]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    for i in aborted:
        assert engine.scheduler.abort(reqs[i].request_id)
    while not all(r.finished for r in reqs):
        engine.step()
    return reqs
