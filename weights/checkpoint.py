"""Orbax save/restore of the converted NNX parameter state (our layout: padded vocab, [D,C,H,K] c_attn).

A converted folder holds `config.json` (HF GPT-2 format), `orbax/` (the parameter state as a pure dict,
saved uncompressed by orbax's PyTree handler) and, when the source had them, the tokenizer files. Restoring
builds abstract targets `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` from the model's shapes and the
caller's `sharding_fn`, so orbax reads each device's shard straight into place, on any mesh (not only
the one it was saved from) and in any dtype (orbax casts). Nothing is reshaped at restore time.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from engine.config import GPT2Config
from weights.hf import CheckpointError
from weights.loader import ShardingFn, _keys, _path_str, abstract_model

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


def restore(folder: str | Path, cfg: GPT2Config, dtype, sharding_fn: ShardingFn | None = None):
    """(graphdef, state) from `folder/orbax`, each array restored into `sharding_fn(path, shape)`."""
    import orbax.checkpoint as ocp

    path = Path(folder).expanduser().resolve() / ORBAX_DIR
    graphdef, abstract = abstract_model(cfg, dtype)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(key_path, leaf) -> jax.ShapeDtypeStruct:
        name, shape = _path_str(_keys(key_path)), tuple(leaf.shape)
        sharding = sharding_fn(name, shape) if sharding_fn else default
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    targets = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(abstract))
    with ocp.StandardCheckpointer() as checkpointer:
        # Checked up front: an orbax restore that fails midway leaves tensorstore callbacks on a closed loop.
        _check_stored(path, checkpointer, {_path_str(_keys(p)): t.shape for p, t in _flat(targets)}, cfg)
        restored = checkpointer.restore(path, targets)
    nnx.replace_by_pure_dict(abstract, restored)
    return graphdef, abstract


def _flat(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _check_stored(path: Path, checkpointer, expected: dict[str, tuple[int, ...]], cfg: GPT2Config) -> None:
    """Raise a CheckpointError naming the first missing, extra or misshapen array of the stored state."""
    hint = "was it written by `python -m weights.convert` from a checkpoint with this config.json?"
    try:
        stored = {leaf.name: tuple(leaf.shape) for _, leaf in _flat(checkpointer.metadata(path).item_metadata)}
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e}); {hint}") from None
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{path}: has no array {name!r} for {cfg}; {hint}")
        if stored[name] != tuple(shape):
            raise CheckpointError(f"{path}: {name!r} has shape {list(stored[name])}, expected {list(shape)} for "
                                  f"{cfg}; {hint}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected array {extra[0]!r} ({len(extra)} in all) for {cfg}; {hint}")
