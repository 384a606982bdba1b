"""safetensors -> NNX state, each array placed shard by shard straight onto its sharding.

Every parameter is built with `jax.make_array_from_callback`: the callback reads only the slice a device
needs (`safe_open(...).get_slice`), so no host ever holds a full copy per device. The layout changes of
`engine.model` (c_attn [D,3D] -> [D,C,H,K], attn c_proj [D,D] -> [H,K,D], wte padded to V rows) are done
per slice, never on the whole tensor. Before any read, every file's size is checked against its header
and every key and shape against the config: a bad checkpoint is one `CheckpointError`, never random weights.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from engine.config import GPT2Config
from engine.model import GPT2, is_stacked
from weights.hf import CheckpointError, expected_keys, hf_shape, is_ignored, strip_prefix

_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


class _Source:
    """The open safetensors files of one checkpoint: (prefix-stripped) key -> (handle, stored key)."""

    def __init__(self, files: list[Path], cfg: GPT2Config):
        self.handles, self.keys, self.files = [], {}, files
        for path in files:
            _check_complete(path)
            try:
                handle = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); expected the output of "
                                      f"save_pretrained or safetensors' save_file") from None
            self.handles.append(handle)
            for key in handle.keys():
                self.keys[strip_prefix(key)] = (handle, key, path)
        self._check(cfg)

    def _check(self, cfg: GPT2Config) -> None:
        expected = expected_keys(cfg)
        unexpected = sorted(k for k in self.keys if k not in expected and not is_ignored(k))
        if unexpected:
            raise CheckpointError(f"{self.keys[unexpected[0]][2]}: unexpected key {unexpected[0]!r} "
                                  f"({len(unexpected)} unexpected in all); expected only GPT-2 keys for "
                                  f"n_layer={cfg.n_layer} (does config.json match the weights?)")
        missing = sorted(expected - set(self.keys))
        if missing:
            names = ", ".join(str(p) for p in self.files)
            raise CheckpointError(f"{names}: missing key {missing[0]!r} ({len(missing)} of the {len(expected)} "
                                  f"keys expected for n_layer={cfg.n_layer} are missing)")
        for key, (handle, stored, path) in self.keys.items():
            if _is_buffer(key):
                continue
            shape = tuple(handle.get_slice(stored).get_shape())
            if shape != hf_shape(key, cfg):
                raise CheckpointError(f"{path}: key {stored!r} has shape {list(shape)}, expected "
                                      f"{list(hf_shape(key, cfg))} for {cfg}")

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        handle, stored, path = self.keys[key]
        try:
            return np.asarray(handle.get_slice(stored)[index])
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read {stored!r} ({e}); is the file truncated?") from None


def _check_complete(path: Path) -> None:
    """Raise if the file is shorter than its header says (a cut download), naming the file."""
    needed = _declared_size(path)
    size = path.stat().st_size
    if needed is not None and size < needed:
        raise CheckpointError(f"{path}: truncated safetensors file: its header declares {needed} bytes, the "
                              f"file has {size}; download or save it again")


def _declared_size(path: Path) -> int | None:
    """Bytes a safetensors file must have per its header, or None where it does not start like one (left
    to safetensors to reject). Layout: u64 little-endian header size N, N bytes of JSON, tensor data."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            text = f.read(min(n, _MAX_HEADER))
        if n > _MAX_HEADER or not text.startswith(b"{"):
            return None
        if len(text) < n:  # cut inside the header
            return 8 + n
        entries = [v for k, v in json.loads(text).items() if k != "__metadata__"]
        return 8 + n + max((int(v["data_offsets"][1]) for v in entries), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _is_buffer(key: str) -> bool:
    """The attention mask buffers: ignored without a shape check (`lm_head.weight` is shape-checked)."""
    return is_ignored(key) and key != "lm_head.weight"


def _span(s: slice, size: int) -> tuple[int, int]:
    start, stop, _ = s.indices(size)
    return start, stop


def _read_param(src: _Source, path: str, shape: tuple[int, ...], index: tuple[slice, ...], cfg: GPT2Config):
    """The slice `index` of NNX parameter `path` (our layout), read from the HF tensor(s): a stacked
    layer parameter (`h.X`, [L, ...]) reads its layers' `h.{i}.X` one by one."""
    if is_stacked(path):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))  # a whole array may come as ()
        return np.stack([_read_param(src, f"h.{i}.{path[2:]}", shape[1:], index[1:], cfg)
                         for i in range(*index[0].indices(shape[0]))])
    d, k = cfg.n_embd, cfg.head_dim
    if path.endswith("attn.c_attn.weight") or path.endswith("attn.c_attn.bias"):
        is_w = path.endswith("weight")
        lead = index[:1] if is_w else ()
        (c0, c1), (h0, h1) = _span(index[-3], 3), _span(index[-2], cfg.n_head)
        parts = [src.read(path, lead + (slice(c * d + h0 * k, c * d + h1 * k),)) for c in range(c0, c1)]
        block = np.stack([p.reshape(p.shape[:-1] + (h1 - h0, k)) for p in parts], axis=-3)
        return block[..., index[-1]]
    if path.endswith("attn.c_proj.weight"):
        (h0, h1) = _span(index[0], cfg.n_head)
        rows = src.read(path, (slice(h0 * k, h1 * k), index[2]))
        return rows.reshape(h1 - h0, k, -1)[:, index[1]]
    if path == "wte.weight":  # rows from vocab_size on are zero padding
        v0, v1 = _span(index[0], shape[0])
        out = np.zeros((v1 - v0, len(range(*index[1].indices(shape[1])))), np.float32)
        real_end = min(v1, cfg.vocab_size)
        if v0 < real_end:
            out[: real_end - v0] = src.read(path, (slice(v0, real_end), index[1]))
        return out
    return src.read(path, index)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: GPT2Config, dtype, scan_layers: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and an abstract (shape-only) state, with no memory allocated."""
    return nnx.split(nnx.eval_shape(lambda: GPT2(cfg, dtype, scan_layers=scan_layers)))


def placer(dtype, sharding_fn: ShardingFn | None = None) -> Callable:
    """`(pytree path, leaf) -> jax.ShapeDtypeStruct`: where every loader puts a parameter (its shape, `dtype`
    and `sharding_fn(name, shape)`, else the first device)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(path: tuple, leaf) -> jax.ShapeDtypeStruct:
        name, shape = _path_str(_keys(path)), tuple(leaf.shape)
        sharding = sharding_fn(name, shape) if sharding_fn else default
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

    return place


def abstract_params(cfg: GPT2Config, dtype, sharding_fn: ShardingFn | None = None, scan_layers: bool = False):
    """(graphdef, state of `jax.ShapeDtypeStruct`s) placed as the loaders place the parameters (`placer`),
    before any weight is read."""
    graphdef, abstract = abstract_model(cfg, dtype, scan_layers)
    return graphdef, jax.tree_util.tree_map_with_path(placer(dtype, sharding_fn), abstract)


def load_safetensors(files: list[Path], cfg: GPT2Config, dtype, sharding_fn: ShardingFn | None = None,
                     scan_layers: bool = False):
    """Read an HF checkpoint into (graphdef, state), each array placed per `sharding_fn(path, shape)`
    (`scan_layers`: the stacked layout, each layer read from its own HF tensors)."""
    src = _Source(files, cfg)
    graphdef, placed = abstract_params(cfg, dtype, sharding_fn, scan_layers)

    def build(path: tuple, target: jax.ShapeDtypeStruct) -> jax.Array:
        name, shape = _path_str(_keys(path)), target.shape

        def callback(index):
            return _read_param(src, name, shape, index, cfg).astype(target.dtype, copy=False)

        return jax.make_array_from_callback(shape, target.sharding, callback)

    return graphdef, jax.tree_util.tree_map_with_path(build, placed)


def _keys(path) -> tuple:
    """A pytree path of an NNX state leaf as plain names, without the Variable's trailing `value`."""
    keys = tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def init_dummy(cfg: GPT2Config, dtype, seed: int = 0, sharding_fn: ShardingFn | None = None,
               scan_layers: bool = False):
    """Random weights for a config (GPT-2's init scales: std 0.02, wpe 0.01, LayerNorms 1/0, biases 0, drawn
    uniform rather than normal: 4x faster, as vLLM's dummy weights are uniform too), drawn on the host with
    NumPy per parameter (one stream per name and `seed`) and placed shard by shard: no program is
    compiled, so a dummy gpt2 loads in about a second. For benchmarks and tests. The same
    seed gives the same weights in either layout (`scan_layers`)."""
    graphdef, placed = abstract_params(cfg, dtype, sharding_fn, scan_layers)

    def build(path: tuple, target: jax.ShapeDtypeStruct) -> jax.Array:
        name, shape = _path_str(_keys(path)), target.shape
        full = []  # drawn once, at the first shard's request

        def callback(index):
            if not full:
                full.append(_dummy_param(name, shape, seed).astype(target.dtype, copy=False))
            return full[0][index]

        return jax.make_array_from_callback(shape, target.sharding, callback)

    return graphdef, jax.tree_util.tree_map_with_path(build, placed)


def _dummy_param(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One stream per HF name: a stacked layer parameter draws each layer as `h.{i}.X`."""
    if is_stacked(name):
        return np.stack([_dummy_param(f"h.{i}.{name[2:]}", shape[1:], seed) for i in range(shape[0])])
    if name.endswith("bias"):
        return np.zeros(shape, np.float32)
    if ".ln_" in name or name.startswith("ln_"):
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.random(shape, np.float32)  # uniform [0, 1): mean 1/2, std 1/sqrt(12)
    values -= np.float32(0.5)
    values *= np.float32((0.01 if name.startswith("wpe") else 0.02) * np.sqrt(12.0))
    return values
