"""Mesh axes, the one logical-axis -> mesh-axis rules table, and the checks that reject unusable meshes.

The mesh always has the two axes `("data", "model")`: `data` splits decode slots (data parallel), `model`
splits attention heads, MLP columns/rows and the padded vocab (tensor parallel). Arrays never name mesh
axes themselves: parameters (`engine.model.PARAM_AXES`), the KV cache (`engine.kv_cache.CACHE_AXES`) and
the decode state (`engine.runner.state_axes`) declare logical axis names, and `RULES` maps each name to a
mesh axis (or None: replicated). Invariants:
- No two dimensions of one array land on the same mesh axis (`partition_spec` raises).
- A mesh is accepted only if `model` divides n_head, the padded vocab and 4 * n_embd, `data` divides
  max_slots, and data x model equals the number of devices it is built from (`make_mesh`, `check_mesh`).
- Version-sensitive APIs live in one helper each: the mesh constructor and its axis types in `_build_mesh`
  (Auto axes: shardings propagate, no op demands explicit ones), the shard_map entry point in `per_shard`.
- Multi-process: a mesh spans every process's devices; each process places only its own shards.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine.config import GPT2Config
from engine.model import param_axes

AXES = ("data", "model")

# The one rules table: logical axis name -> mesh axis (None = replicated).
RULES: dict[str, str | None] = {
    "vocab": "model",  # padded vocab rows of wte, and the logits the model computes
    "heads": "model",
    "mlp": "model",
    "slots": "data",  # KV cache slots and every per-slot decode array
    "embed": None,
    "head_dim": None,
    "layers": None,
    "positions": None,
    "rows": None,  # prefill rows, within one data shard's part of a call (the runner splits calls per shard)
    "sampled_vocab": None,  # sampling sorts / argmaxes the full vocab of a row: gathered, never split
    "key_data": None,  # the 2 words of a threefry key
    "vocab_bits": None,  # the u32 words of a per-slot bit set over the padded vocab (min_tokens' banned ids)
}

_SPEC = re.compile(r"^\s*(data|model)\s*=\s*(-1|\d+)\s*$")


def partition_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of an array with these logical axes; raises if two dims map to one mesh axis."""
    mesh_axes = []
    for name in logical_axes:
        if name is not None and name not in RULES:
            raise ValueError(f"logical axis {name!r} is not in engine.sharding.RULES ({sorted(RULES)})")
        mesh_axes.append(None if name is None else RULES[name])
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {tuple(logical_axes)} map two dimensions onto one mesh axis "
                         f"({tuple(mesh_axes)}); change engine.sharding.RULES or the axis names")
    return PartitionSpec(*mesh_axes)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def parse_mesh(spec: str, num_devices: int) -> tuple[int, int]:
    """"data=D,model=M" -> (D, M). One axis may be left out (or -1): it takes the remaining devices."""
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        match = _SPEC.match(part)
        if not match or match.group(1) in sizes:
            raise ValueError(f"mesh {spec!r}: expected 'data=D,model=M' (positive ints; one may be -1 or "
                             f"left out to take the remaining devices), e.g. 'data=2,model=4'")
        sizes[match.group(1)] = int(match.group(2))
    if any(v == 0 for v in sizes.values()):
        raise ValueError(f"mesh {spec!r}: axis sizes must be positive")
    free = [a for a in AXES if sizes.get(a, -1) == -1]
    if len(free) == 2:
        raise ValueError(f"mesh {spec!r}: give at least one of data= and model= a size")
    if free:
        other = AXES[1 - AXES.index(free[0])]
        if num_devices % sizes[other]:
            raise ValueError(f"mesh {spec!r}: there are {num_devices} devices, which do not split into "
                             f"{other}={sizes[other]} times a whole {free[0]} axis; give {other} a size among "
                             f"{_divisors(num_devices)}")
        sizes[free[0]] = num_devices // sizes[other]
    return sizes["data"], sizes["model"]


def make_mesh(spec: str | Mesh | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh from "data=D,model=M" over `devices` (default: every device of every
    process); None -> 1x1 on the first device; a Mesh is checked for its axis names and returned."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise ValueError(f"mesh axes are {tuple(spec.axis_names)}; this engine expects {AXES}")
        return spec
    devices = list(jax.devices() if devices is None else devices)
    if spec is None:
        if jax.process_count() > 1:
            raise ValueError(f"no mesh given, but this is one of {jax.process_count()} processes: pass a mesh "
                             f"over all {len(devices)} devices, e.g. 'data=1,model={len(devices)}'")
        return _build_mesh((1, 1), devices[:1])
    data, model = parse_mesh(spec, len(devices))
    if data * model != len(devices):
        raise _device_error(spec, data * model, len(devices))
    return _build_mesh((data, model), devices)


def _device_error(spec: str, wanted: int, available: int) -> ValueError:
    kind = jax.devices()[0].platform if jax.device_count() else "?"
    return ValueError(f"mesh {spec!r} needs {wanted} devices (data x model) but there are {available} "
                      f"{kind} devices; pick sizes whose product is {available}, e.g. "
                      f"'data=1,model={available}' or 'data={available},model=1'")


def _build_mesh(shape: tuple[int, int], devices: Sequence[jax.Device]) -> Mesh:
    """The version-sensitive part: Auto axis types where the installed JAX has them."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    grid = np.asarray(devices, dtype=object).reshape(shape)
    if axis_type is None:
        return Mesh(grid, AXES)
    return Mesh(grid, AXES, axis_types=(axis_type.Auto,) * len(AXES))


def per_shard(f, mesh: Mesh, in_specs, out_specs, axes: frozenset[str] | None = None):
    """`f` run once per shard of the mesh axes `axes` (default all; the others stay automatic: specs name
    only `axes`), without replication checks; the version-sensitive entry point of shard_map."""
    axes = frozenset(AXES if axes is None else axes)
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes),
                             check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False,
                     auto=frozenset(AXES) - axes)


def describe(mesh: Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in AXES)


def model_sizes(cfg: GPT2Config) -> list[int]:
    """Every `model` axis size the model can be split by: divides n_head, padded vocab and 4 * n_embd."""
    return [m for m in _divisors(cfg.n_head) if cfg.padded_vocab_size % m == 0 and cfg.n_inner % m == 0]


def check_mesh(mesh: Mesh, cfg: GPT2Config, max_slots: int) -> None:
    """Raise a ValueError naming what would work if the model or the slots cannot be split this way."""
    data, model = mesh.shape["data"], mesh.shape["model"]
    fits = model_sizes(cfg)
    if model not in fits:
        raise ValueError(
            f"mesh model={model} cannot split this GPT-2 (n_head={cfg.n_head}, padded vocab "
            f"{cfg.padded_vocab_size}, mlp width {cfg.n_inner}): the model axis must divide all three; "
            f"sizes that work: {', '.join(map(str, fits))}")
    if max_slots % data:
        up = max_slots + (-max_slots) % data
        raise ValueError(
            f"mesh data={data} must divide max_slots={max_slots}: use max_slots={up} (any multiple of "
            f"{data}), or data in {_divisors(max_slots)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_axes(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh: Mesh, axes_tree) -> object:
    """A pytree of logical-axes tuples -> the same pytree of NamedShardings."""
    return jax.tree.map(lambda axes: named_sharding(mesh, axes), axes_tree, is_leaf=_is_axes)


def manual_specs(axes_tree, axes: frozenset[str]) -> object:
    """A pytree of logical-axes tuples -> the same pytree of PartitionSpecs naming only the mesh axes in
    `axes` (the `per_shard` specs of arrays whose other axes stay automatic)."""
    def spec(logical) -> PartitionSpec:
        mesh_axes = partition_spec(logical)
        return PartitionSpec(*(a if a in axes else None for a in mesh_axes))

    return jax.tree.map(spec, axes_tree, is_leaf=_is_axes)


def param_sharding_fn(mesh: Mesh):
    """`(path, shape) -> NamedSharding` for the loaders, from `engine.model.param_axes` and `RULES`."""
    def sharding_fn(path: str, shape: tuple[int, ...]) -> NamedSharding:
        axes = param_axes(path)
        if len(axes) != len(shape):
            raise ValueError(f"parameter {path}: {len(shape)} dims but logical axes {axes}")
        return named_sharding(mesh, axes)

    return sharding_fn
