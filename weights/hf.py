"""HF GPT-2 checkpoints: where the files are (folder or hub id) and how each key maps onto the NNX model.

The name table is one function, `target_of`: an HF key (optional `transformer.` prefix stripped) -> the NNX
parameter path (the same dotted name) plus the reshape between HF's Conv1D layout and ours. Buffers
`attn.bias` / `attn.masked_bias` are ignored; `lm_head.weight` (tied to `wte`) is accepted and unused.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from engine.config import GPT2Config

CHECKPOINT_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "*.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")
_LAYER_PARAMS = {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight",
                 "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight",
                 "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"}
_TOP_PARAMS = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with the file/key and what was expected."""


def strip_prefix(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


def is_ignored(key: str) -> bool:
    return key == "lm_head.weight" or bool(_IGNORED.match(key))


def expected_keys(cfg: GPT2Config) -> set[str]:
    keys = set(_TOP_PARAMS)
    for i in range(cfg.n_layer):
        keys |= {f"h.{i}.{name}" for name in _LAYER_PARAMS}
    return keys


def hf_shape(key: str, cfg: GPT2Config) -> tuple[int, ...]:
    """The shape HF stores for a (prefix-stripped) key."""
    d, f = cfg.n_embd, cfg.n_inner
    layer = _LAYER.match(key)
    name = layer.group(2) if layer else key
    shapes = {
        "wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.n_positions, d), "lm_head.weight": (cfg.vocab_size, d),
        "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d),
    }
    return shapes.get(name, (d,))


def resolve(model: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched through `huggingface_hub` (its cache, offline mode)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise CheckpointError(f"{text}: no such model folder (expected a folder with config.json and "
                              f"model.safetensors, or a hub id such as 'gpt2')")
    return _download(text)


@functools.cache  # once per process: the batch CLI resolves the model for its tokenizer first
def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:  # the hub client raises many types: offline, not found, network, auth
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("HF_HUB_OFFLINE is set and the hub cache does not hold it" if offline
                else "check the id and the network, or pass a local folder")
        raise CheckpointError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from None


def read_config(folder: Path) -> GPT2Config:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected an HF GPT-2 model folder)")
    try:
        return GPT2Config.from_json_file(path)
    except ValueError as e:  # messages may already name the file: keep one prefix
        raise CheckpointError(f"{path}: {str(e).removeprefix(f'{path}: ').removeprefix('config.json: ')}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: `model.safetensors`, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json (found: {found}); "
                          f"only safetensors checkpoints are loaded")
