"""Orbax save/restore of the converted NNX parameter state (our layout: padded vocab, [D,C,H,K] c_attn;
per-layer `h.{i}.X` arrays, or stacked `h.X` [n_layer, ...] when saved from a `scan_layers` model).

A converted folder holds `config.json` (HF GPT-2 format), `orbax/` (the parameter state as a pure dict,
saved uncompressed by orbax's PyTree handler) and, when the source had them, the tokenizer files. Restoring
builds abstract targets `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` from the model's shapes and the
caller's `sharding_fn`, so orbax reads each device's shard straight into place, on any mesh (not only
the one it was saved from) and in any dtype (orbax casts). Nothing is reshaped at restore time, except
when the stored layer layout is not the one asked for (`scan_layers`): the layers are then restored as
stored and stacked (or split) on the devices, holding both layouts of the layer parameters for a moment.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from engine.config import GPT2Config
from engine.model import is_stacked
from weights.hf import CheckpointError
from weights.loader import ShardingFn, _keys, _path_str, abstract_model, placer

ORBAX_DIR = "orbax"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")


def is_orbax(folder: Path) -> bool:
    return (Path(folder) / ORBAX_DIR).is_dir()


def save(folder: str | Path, cfg: GPT2Config, state: nnx.State, tokenizer_from: Path | None = None) -> Path:
    """Write `config.json`, `orbax/` and the tokenizer files of `tokenizer_from` (if any) into `folder`."""
    import orbax.checkpoint as ocp

    folder = Path(folder).expanduser().resolve()
    target = folder / ORBAX_DIR
    if target.exists():
        raise CheckpointError(f"{target} already exists; delete it or choose another output folder")
    folder.mkdir(parents=True, exist_ok=True)
    # Uncompressed: random-looking fp weights shrink ~8% under zstd, and decompressing slows every start-up.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
        checkpointer.save(target, args=ocp.args.PyTreeSave(nnx.to_pure_dict(state)))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    for name in TOKENIZER_FILES if tokenizer_from is not None else ():
        if (Path(tokenizer_from) / name).is_file():
            shutil.copy2(Path(tokenizer_from) / name, folder / name)
    return folder


def restore(folder: str | Path, cfg: GPT2Config, dtype, sharding_fn: ShardingFn | None = None,
            scan_layers: bool = False):
    """(graphdef, state) from `folder/orbax`, each array restored into `sharding_fn(path, shape)`, in the
    layer layout of a `scan_layers` model or not, whichever layout was saved."""
    import orbax.checkpoint as ocp

    path = Path(folder).expanduser().resolve() / ORBAX_DIR
    graphdef, abstract = abstract_model(cfg, dtype, scan_layers)
    target = placer(dtype, sharding_fn)

    with ocp.StandardCheckpointer() as checkpointer:
        stored = _stored(path, checkpointer)
        stored_scan = any(is_stacked(name) for name in stored)
        _, as_stored = abstract_model(cfg, dtype, stored_scan) if stored_scan != scan_layers else (None, abstract)
        targets = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(as_stored))
        # Checked up front: an orbax restore that fails midway leaves tensorstore callbacks on a closed loop.
        _check_stored(path, stored, {_path_str(_keys(p)): t.shape for p, t in _flat(targets)}, cfg)
        restored = checkpointer.restore(path, targets)
    if stored_scan != scan_layers:
        wanted = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(abstract))
        restored = _relayout(restored, wanted, cfg.n_layer)
    nnx.replace_by_pure_dict(abstract, restored)
    return graphdef, abstract


def _relayout(restored: dict, wanted: dict, layers: int) -> dict:
    """Stack per-layer `h` arrays into [L, ...] ones, or split stacked ones, placed as `wanted` says."""
    h = restored["h"]
    if set(map(str, h)) == set(map(str, range(layers))):  # per-layer (keys may come back as str)
        by_index = {int(i): v for i, v in h.items()}
        h = jax.tree.map(lambda *xs: jnp.stack(xs), *[by_index[i] for i in range(layers)])
    else:
        h = {i: jax.tree.map(lambda a, i=i: a[i], h) for i in range(layers)}
    out = dict(restored, h=h)
    return jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), out, wanted)


def _flat(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


_HINT = "was it written by `python -m weights.convert` from a checkpoint with this config.json?"


def _stored(path: Path, checkpointer) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array the checkpoint holds (its metadata only)."""
    try:
        return {leaf.name: tuple(leaf.shape) for _, leaf in _flat(checkpointer.metadata(path).item_metadata)}
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e}); {_HINT}") from None


def _check_stored(path: Path, stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  cfg: GPT2Config) -> None:
    """Raise a CheckpointError naming the first missing, extra or misshapen array of the stored state."""
    hint = _HINT
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{path}: has no array {name!r} for {cfg}; {hint}")
        if is_stacked(name) and stored[name][1:] == tuple(shape)[1:] and stored[name] != tuple(shape):
            raise CheckpointError(f"{path}: {name!r} holds {stored[name][0]} layers, expected n_layer="
                                  f"{shape[0]} for {cfg}; {hint}")
        if stored[name] != tuple(shape):
            raise CheckpointError(f"{path}: {name!r} has shape {list(stored[name])}, expected {list(shape)} for "
                                  f"{cfg}; {hint}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected array {extra[0]!r} ({len(extra)} in all) for {cfg}; {hint}")
