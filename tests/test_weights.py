"""Checkpoint loading: every file layout loads to the same logits, every bad checkpoint is one clear error.

One tiny random `transformers.GPT2LMHeadModel` (fixed seed) is written by `save_pretrained` and then
rewritten by hand in the other layouts: the hub's own `gpt2` layout (bare keys, `h.{i}.attn.bias` mask
buffers [1,1,1024,1024], no `lm_head.weight`), `save_pretrained` keys plus a tied `lm_head.weight`, and a
sharded checkpoint (`model.safetensors.index.json` + two shards). Same weights, same program: the logits
must be bitwise identical, and the save_pretrained ones match HF's within 1e-4 (see test_model.py).

Each broken checkpoint must raise one `CheckpointError`, raised directly (no chained cause), on one line,
naming the file or key and what was expected. `load_format="dummy"` builds random weights with no files.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import engine.config
from engine.config import GPT2Config
from engine.engine import Engine
from tests.checkpoints import tiny_gpt2
from weights.hf import CheckpointError

OPTS = dict(max_slots=1, max_seq_len=32, decode_steps=1, prefill_buckets=(16,))
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
N_LAYER = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A save_pretrained folder (keys `transformer.*`) of a random 2-layer, 4-head model."""
    folder = tmp_path_factory.mktemp("saved")
    model = tiny_gpt2(n_layer=N_LAYER).eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        np.save(folder / "hf_logits.npy", model(torch.tensor([PROMPT])).logits[0].numpy())
    return folder


@pytest.fixture(scope="module")
def reference_logits(saved) -> np.ndarray:
    ours = Engine.from_pretrained(saved, **OPTS).logits(PROMPT)
    hf = np.load(saved / "hf_logits.npy")
    assert np.abs(ours - hf).max() <= 1e-4 and hf.std() > 1e-2
    return ours


def _tensors(saved: Path) -> dict[str, np.ndarray]:
    return load_file(saved / "model.safetensors")


def _folder(tmp_path: Path, tensors: dict[str, np.ndarray] | None, saved: Path, name: str = "ckpt") -> Path:
    """A new checkpoint folder: the saved config.json plus `tensors` as model.safetensors (if given)."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(saved / "config.json", folder / "config.json")
    if tensors is not None:
        save_file(tensors, folder / "model.safetensors")
    return folder


def _hub_layout(tmp_path: Path, saved: Path) -> Path:
    tensors = {k.removeprefix("transformer."): v for k, v in _tensors(saved).items()}
    mask = np.tril(np.ones((1024, 1024), np.float32))[None, None]
    tensors |= {f"h.{i}.attn.bias": mask for i in range(N_LAYER)}
    assert "lm_head.weight" not in tensors and "wte.weight" in tensors
    return _folder(tmp_path, tensors, saved)


def _with_lm_head(tmp_path: Path, saved: Path) -> Path:
    tensors = _tensors(saved)
    return _folder(tmp_path, {**tensors, "lm_head.weight": tensors["transformer.wte.weight"]}, saved)


def _sharded(tmp_path: Path, saved: Path) -> Path:
    folder = _folder(tmp_path, None, saved)
    tensors = _tensors(saved)
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if "wte" in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if "wte" not in k}}
    for name, part in shards.items():
        save_file(part, folder / name)
    weight_map = {key: name for name, part in shards.items() for key in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("layout", [_hub_layout, _with_lm_head, _sharded])
def test_layouts_load_to_identical_logits(layout, saved, reference_logits, tmp_path):
    folder = layout(tmp_path, saved)
    np.testing.assert_array_equal(Engine.from_pretrained(folder, **OPTS).logits(PROMPT), reference_logits)


def _drop_key(tmp_path, saved):
    tensors = _tensors(saved)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    return _folder(tmp_path, tensors, saved), r"ckpt/model\.safetensors: missing key 'h\.1\.mlp\.c_fc\.bias'"


def _extra_layer(tmp_path, saved):
    tensors = _tensors(saved)
    tensors |= {k.replace(".h.1.", ".h.2."): v for k, v in tensors.items() if ".h.1." in k}
    return (_folder(tmp_path, tensors, saved),
            r"ckpt/model\.safetensors: unexpected key 'h\.2\.[a-z_.12]+' .*n_layer=2")


def _wrong_shape(tmp_path, saved):
    tensors = {**_tensors(saved), "transformer.h.0.attn.c_attn.weight": np.zeros((64, 128), np.float32)}
    return (_folder(tmp_path, tensors, saved),
            r"ckpt/model\.safetensors: key 'transformer\.h\.0\.attn\.c_attn\.weight' has shape \[64, 128\], "
            r"expected \[64, 192\]")


def _cut(keep: Callable[[bytes], int]):
    def make(tmp_path, saved):
        data = (saved / "model.safetensors").read_bytes()
        folder = _folder(tmp_path, None, saved)
        (folder / "model.safetensors").write_bytes(data[: keep(data)])
        return folder, r"ckpt/model\.safetensors: truncated safetensors file: its header declares \d+ bytes"
    return make


def _garbage(tmp_path, saved):
    folder = _folder(tmp_path, None, saved)
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return folder, r"ckpt/model\.safetensors: not a readable safetensors file .*expected the output of save_pretr"


def _no_config(tmp_path, saved):
    folder = _folder(tmp_path, _tensors(saved), saved)
    (folder / "config.json").unlink()
    return folder, r"ckpt: no config\.json \(expected an HF GPT-2 model folder\)"


def _config(change: dict, match: str):
    def make(tmp_path, saved):
        folder = _folder(tmp_path, _tensors(saved), saved)
        d = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**d, **change}))
        return folder, match
    return make


def _config_not_json(tmp_path, saved):
    folder = _folder(tmp_path, _tensors(saved), saved)
    (folder / "config.json").write_text("{not json")
    return folder, r"ckpt/config\.json: not valid JSON \(Expecting"


def _pytorch_bin(tmp_path, saved):
    folder = _folder(tmp_path, None, saved)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    return folder, r"ckpt: no model\.safetensors or model\.safetensors\.index\.json .*pytorch_model\.bin.*only safet"


def _missing_shard(tmp_path, saved):
    folder = _sharded(tmp_path, saved)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder, r"ckpt/model\.safetensors\.index\.json: names shard files that are missing: .*model-00002-of-00002"


def _hub_id(tmp_path, saved):
    return "no-such-org/no-such-model-xyz", r"^cannot fetch 'no-such-org/no-such-model-xyz' from the Hugging Face hub"


def _no_path(tmp_path, saved):
    return tmp_path / "does-not-exist", r"does-not-exist: no such model folder"


BAD = {
    "missing key": _drop_key,
    "unexpected key": _extra_layer,
    "wrong shape": _wrong_shape,
    "truncated data": _cut(lambda data: len(data) - 1000),
    "truncated header": _cut(lambda data: 100),
    "not safetensors": _garbage,
    "no config.json": _no_config,
    "llama config": _config({"model_type": "llama"}, r"ckpt/config\.json: model_type is 'llama'; .* only 'gpt2'"),
    "config/weights mismatch": _config({"n_layer": 3}, r"missing key 'h\.2\.[a-z_.12]+' .*n_layer=3"),
    "config not json": _config_not_json,
    "only pytorch_model.bin": _pytorch_bin,
    "index names a missing shard": _missing_shard,
    "unreachable hub id": _hub_id,
    "nonexistent local path": _no_path,
}


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
def test_bad_checkpoint_is_one_clear_error(make, saved, tmp_path):
    model, match = make(tmp_path, saved)
    with pytest.raises(CheckpointError, match=match) as info:
        Engine.from_pretrained(model, **OPTS)
    err = info.value
    assert type(err) is CheckpointError
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "chained error"
    assert "\n" not in str(err) and len(str(err)) < 600


def test_dummy_weights_from_a_folder_config(saved, tmp_path):
    folder = _folder(tmp_path, None, saved)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    eng = Engine.from_pretrained(folder, load_format="dummy", **OPTS)
    logits = eng.logits(PROMPT)
    assert eng.config == GPT2Config(n_layer=N_LAYER, n_head=4, n_embd=64)
    assert logits.shape == (len(PROMPT), 50257) and np.isfinite(logits).all() and logits.std() > 1e-3


def test_dummy_weights_from_a_preset_name(monkeypatch):
    # The path taken by "gpt2" (a name: no folder, no file, no hub), with the preset shrunk because a real
    # 124M random init costs ~20 s on a small CPU.
    tiny = GPT2Config(n_layer=1, n_head=2, n_embd=32)
    monkeypatch.setitem(engine.config.PRESETS, "gpt2", tiny)
    eng = Engine.from_pretrained("gpt2", load_format="dummy", **OPTS)
    logits = eng.logits(PROMPT)
    assert eng.config == tiny and eng.tokenizer.encode("Hi my name is") == [17250, 616, 1438, 318]
    assert logits.shape == (len(PROMPT), 50257) and np.isfinite(logits).all() and logits.std() > 1e-3


@pytest.mark.parametrize("model,load_format,match", [
    ("gpt3", "dummy", r"unknown GPT-2 preset 'gpt3'; expected one of \['gpt2', 'gpt2-large'"),
    ("gpt2", "pytorch", r"load_format: expected one of \(.*'dummy'.*\), got 'pytorch'"),
])
def test_bad_preset_or_load_format_is_a_value_error(model, load_format, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(model, load_format=load_format, **OPTS)
