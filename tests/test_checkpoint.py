"""Orbax checkpoints: `python -m weights.convert`, and restoring into any mesh's shardings.

8 fake CPU devices (tests/conftest.py); a tiny HF checkpoint made here is the source of truth.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine import Engine
from engine.config import GPT2Config
from engine.model import param_axes
from engine.sharding import make_mesh, param_sharding_fn, partition_spec
from tests.checkpoints import make_tiny_checkpoint
from weights import checkpoint, convert, hf
from weights.loader import load_safetensors

ENGINE_OPTS = dict(max_slots=8, max_seq_len=32, decode_steps=2, prefill_buckets=(16,))
TEXT = "Orbax restores each shard straight onto its device."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"), seed=1)


def mesh_of(data: int, model: int):
    return make_mesh(f"data={data},model={model}", jax.devices()[: data * model])


def flat_params(state) -> dict[str, jax.Array]:
    return {".".join(map(str, path)): var[...] for path, var in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def saved_on_2x4(tiny_model, tmp_path_factory) -> Path:
    """The tiny model loaded onto a data=2,model=4 mesh, then saved from there."""
    cfg = hf.read_config(tiny_model)
    _, state = load_safetensors(hf.weight_files(tiny_model), cfg, jnp.float32, param_sharding_fn(mesh_of(2, 4)))
    return checkpoint.save(tmp_path_factory.mktemp("orbax") / "tiny", cfg, state, tokenizer_from=tiny_model)


def test_convert_cli_writes_orbax_config_and_tokenizer(tiny_model, tmp_path):
    out = tmp_path / "converted"
    assert convert.main([str(tiny_model), str(out), "--dtype", "bfloat16"]) == 0
    assert checkpoint.is_orbax(out) and not checkpoint.is_orbax(tiny_model)
    assert GPT2Config.from_hf_dict(json.loads((out / "config.json").read_text())) == hf.read_config(tiny_model)
    for name in ("vocab.json", "merges.txt"):  # the tokenizer files the tiny checkpoint has
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes()
    _, state = checkpoint.restore(out, hf.read_config(tiny_model), jnp.bfloat16)
    assert {a.dtype for a in flat_params(state).values()} == {jnp.dtype(jnp.bfloat16)}
    assert convert.main([str(tiny_model), str(out)]) == 1  # never overwrites an existing checkpoint


@pytest.mark.parametrize("data,model", [(4, 2), (1, 1)])
def test_restore_on_another_mesh_is_exact(tiny_model, saved_on_2x4, data, model):
    mesh = mesh_of(data, model)
    restored = Engine.from_pretrained(saved_on_2x4, mesh=mesh, **ENGINE_OPTS)  # load_format "auto" -> orbax
    direct = Engine.from_pretrained(tiny_model, mesh=mesh, load_format="safetensors", **ENGINE_OPTS)
    got, want = flat_params(restored.runner.params), flat_params(direct.runner.params)
    assert got.keys() == want.keys()
    for name, arr in got.items():
        assert arr.sharding.spec == partition_spec(param_axes(name)) == want[name].sharding.spec, name
        assert arr.sharding.mesh.devices.shape == (data, model)
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(want[name]), err_msg=name)
    assert restored.tokenizer is not None
    ids = restored.tokenizer.encode(TEXT)
    np.testing.assert_array_equal(restored.logits(ids), direct.logits(ids))


def test_restore_casts_to_the_requested_dtype(saved_on_2x4, tiny_model):
    cfg = hf.read_config(tiny_model)
    _, state = checkpoint.restore(saved_on_2x4, cfg, jnp.bfloat16, param_sharding_fn(mesh_of(1, 2)))
    wte = flat_params(state)["wte.weight"]
    assert wte.dtype == jnp.bfloat16 and wte.shape == (cfg.padded_vocab_size, cfg.n_embd)
    assert wte.addressable_shards[0].data.shape == (cfg.padded_vocab_size // 2, cfg.n_embd)


def test_orbax_format_on_a_plain_hf_folder_says_how_to_convert(tiny_model):
    with pytest.raises(hf.CheckpointError, match=r"no orbax/ folder; write one with `python -m weights.convert"):
        Engine.from_pretrained(tiny_model, load_format="orbax", **ENGINE_OPTS)


@pytest.mark.parametrize("wrong,message", [
    (GPT2Config(n_layer=2, n_head=4, n_embd=128),
     r"'h.0.attn.c_attn.bias' has shape \[3, 4, 16\], expected \[3, 4, 32\]"),
    (GPT2Config(n_layer=3, n_head=4, n_embd=64), r"has no array 'h.2.attn.c_attn.bias'"),
    (GPT2Config(n_layer=1, n_head=4, n_embd=64), r"unexpected array 'h.1.attn.c_attn.bias' \(12 in all\)")])
def test_restore_with_the_wrong_config_fails_before_reading(saved_on_2x4, wrong, message):
    with pytest.raises(hf.CheckpointError, match=message + r" for GPT2Config.*python -m weights.convert"):
        checkpoint.restore(saved_on_2x4, wrong, jnp.float32)


def test_restore_into_the_other_layer_layout(saved_on_2x4, tiny_model, tmp_path):
    """A per-layer checkpoint restores into a scan_layers model (stacked on the devices), and one saved
    from a scan_layers model restores per layer: the same numbers, placed per the rules, either way;
    the stacked one's layer-count mismatch is named."""
    cfg = hf.read_config(tiny_model)
    mesh = mesh_of(2, 4)
    _, per_layer = checkpoint.restore(saved_on_2x4, cfg, jnp.float32, param_sharding_fn(mesh))
    _, stacked = checkpoint.restore(saved_on_2x4, cfg, jnp.float32, param_sharding_fn(mesh), scan_layers=True)
    flat, flat_stacked = flat_params(per_layer), flat_params(stacked)
    for name, arr in flat_stacked.items():
        assert arr.sharding.spec == partition_spec(param_axes(name)), name
        if name.startswith("h."):
            for i in range(cfg.n_layer):
                np.testing.assert_array_equal(np.asarray(arr[i]), np.asarray(flat[f"h.{i}.{name[2:]}"]))
        else:
            np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat[name]))
    out = checkpoint.save(tmp_path / "stacked", cfg, stacked)
    _, back = checkpoint.restore(out, cfg, jnp.float32, param_sharding_fn(mesh))
    for name, arr in flat_params(back).items():
        assert arr.sharding.spec == partition_spec(param_axes(name)), name
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat[name]))
    wrong = GPT2Config(n_layer=3, n_head=4, n_embd=64)
    with pytest.raises(hf.CheckpointError, match=r"'h.attn.c_attn.bias' holds 2 layers, expected n_layer=3"):
        checkpoint.restore(out, wrong, jnp.float32, scan_layers=True)
