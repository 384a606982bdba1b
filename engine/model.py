"""GPT-2 as Flax NNX modules with the checkpoint's parameter names, and its pure forward.

Dimension legend (used in shapes and einsum subscripts):
  B rows (prompts or cache slots)  T tokens  D embed  H heads  K head dim (64)  F mlp (4D)
  V padded vocab  L layers  S cache slots  W attention window (cache positions read)  C the 3 of Q|K|V

Parameter layout: names follow HF (`wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`, ...). With
`scan_layers` the layers are stacked instead: `h` is one `Block` whose every parameter has a leading L axis
(`h.attn.c_attn.weight[i]` is HF's `h.{i}.attn.c_attn.weight`; logical axis `layers`). HF's Conv1D stores
`[in, out]` and computes `x @ W + b`, kept here without a transpose; `c_attn` is stored as `[D, C, H, K]`
and the attention `c_proj` as `[H, K, D]` (pure reshapes of HF's `[D, 3D]` / `[D, D]`) so that heads can
be sharded. `wte` is padded to V rows (zeros); padded logits are -inf.

The forward is a pure function of (tokens, positions, cache): it never samples, tokenizes or schedules.
Layers run as a Python loop (every program holds n_layer copies of the layer: compile time grows with
depth), or with `scan_layers` (MaxText's name) as one `lax.scan` over the stacked parameters, the KV cache
in the carry, updated in place at the layer index: every program holds one layer's code whatever the
depth, so it compiles several times faster, but each step slices every layer's weights and cache blocks
out of the stacked arrays, which XLA:CPU copies (decode ~1.6x slower on CPU; see README).
`GPT2.hidden` stops before the LM head (final hidden states); `GPT2.__call__` applies `GPT2.logits` to them.
LayerNorm, softmax and logits are computed in float32 whatever the parameter dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from engine.config import GPT2Config
from engine.kv_cache import KVCache, Runs, at_layer
from engine.slicing import when

# Logical axis names of every parameter, declared once (engine.sharding maps them to mesh axes).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "wte.weight": ("vocab", "embed"),
    "wpe.weight": (None, "embed"),
    "ln_1.weight": ("embed",), "ln_1.bias": ("embed",),
    "ln_2.weight": ("embed",), "ln_2.bias": ("embed",),
    "ln_f.weight": ("embed",), "ln_f.bias": ("embed",),
    "attn.c_attn.weight": ("embed", None, "heads", "head_dim"),
    "attn.c_attn.bias": (None, "heads", "head_dim"),
    "attn.c_proj.weight": ("heads", "head_dim", "embed"),
    "attn.c_proj.bias": ("embed",),
    "mlp.c_fc.weight": ("embed", "mlp"),
    "mlp.c_fc.bias": ("mlp",),
    "mlp.c_proj.weight": ("mlp", "embed"),
    "mlp.c_proj.bias": ("embed",),
}

_NEG = float(jnp.finfo(jnp.float32).min)


def is_stacked(path: str) -> bool:
    """`h.X` (every layer's X, stacked: a `scan_layers` model), not `h.{i}.X` (one layer's, as HF names it)."""
    parts = path.split(".")
    return parts[0] == "h" and len(parts) > 1 and not parts[1].isdigit()


def param_axes(path: str) -> tuple[str | None, ...]:
    """Logical axes of a parameter given its dotted path (`h.3.attn.c_attn.weight` -> its entry; stacked
    `h.attn.c_attn.weight` -> `layers`, then its entry's)."""
    if is_stacked(path):
        return ("layers",) + PARAM_AXES[path[2:]]
    parts = path.split(".")
    return PARAM_AXES[".".join(parts[2:]) if parts[0] == "h" else path]


def _param(shape: tuple[int, ...], dtype, rngs: nnx.Rngs | None, std: float = 0.02, lead=()) -> nnx.Param:
    """`lead`: the stacked layers' leading dims ((L,) in `GPT2.h`)."""
    shape = tuple(lead) + shape
    if rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _const(shape: tuple[int, ...], value: float, dtype, lead=()) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(lead) + shape, value, dtype))


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, lead=()):
        self.weight = _const((dim,), 1.0, dtype, lead)
        self.bias = _const((dim,), 0.0, dtype, lead)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """HF Conv1D: weight [in, out], y = x @ W + b."""

    def __init__(self, d_in: int, d_out: int, dtype, rngs: nnx.Rngs | None, lead=()):
        self.weight = _param((d_in, d_out), dtype, rngs, lead=lead)
        self.bias = _const((d_out,), 0.0, dtype, lead)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight[...] + self.bias[...]


class QKV(nnx.Module):
    """`attn.c_attn`: weight [D, C, H, K], bias [C, H, K]; returns q, k, v as [B, H, T, K]."""

    def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs | None, lead=()):
        self.weight = _param((cfg.n_embd, 3, cfg.n_head, cfg.head_dim), dtype, rngs, lead=lead)
        self.bias = _const((3, cfg.n_head, cfg.head_dim), 0.0, dtype, lead)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # A plain GEMM ([B*T, D] x [D, C*H*K]); moving C and H to the front afterwards is cheap, while asking
        # the dot itself for a transposed output makes XLA:CPU several times slower.
        qkv = jnp.einsum("btd,dchk->btchk", x, self.weight[...]) + self.bias[...]
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]


class OutProj(nnx.Module):
    """`attn.c_proj`: weight [H, K, D], bias [D]."""

    def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs | None, lead=()):
        self.weight = _param((cfg.n_head, cfg.head_dim, cfg.n_embd), dtype, rngs, lead=lead)
        self.bias = _const((cfg.n_embd,), 0.0, dtype, lead)

    def __call__(self, o: jax.Array) -> jax.Array:
        """o [B, T, H, K] -> [B, T, D]."""
        return jnp.einsum("bthk,hkd->btd", o, self.weight[...]) + self.bias[...]


def _attend(q: jax.Array, ks, vs, q_pos: jax.Array, k_pos: jax.Array, segments=None) -> jax.Array:
    """q [B,H,T,K]; keys/values as blocks ks/vs [B,H,Wi,K] (W = sum Wi); q_pos [B,T], k_pos [B,W].

    Returns [B,T,H,K]; a key is visible iff k_pos <= q_pos and (with `segments` [B,T], keys = this call's
    tokens) it belongs to the query's segment. Scores of all blocks share one softmax."""
    scores = jnp.concatenate([jnp.einsum("bhtk,bhwk->bhtw", q, k, preferred_element_type=jnp.float32)
                              for k in ks], axis=-1)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(q.shape[-1])))
    visible = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    if segments is not None:
        visible &= segments[:, None, None, :] == segments[:, None, :, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, _NEG), axis=-1).astype(vs[0].dtype)
    out, start = None, 0
    for v in vs:
        part = jnp.einsum("bhtw,bhwk->bhtk", probs[..., start: start + v.shape[2]], v)
        out, start = part if out is None else out + part, start + v.shape[2]
    return out.transpose(0, 2, 1, 3)


class Where(NamedTuple):
    """How one call's tokens meet the cache (see `GPT2.__call__`)."""

    runs: Runs | None = None  # prefill, extend: which tokens go to which slot (`KVCache.write_runs`)
    window: int | None = None  # decode: attend to cache positions [0, window)
    segments: jax.Array | None = None  # i32[B,T] prefill: each token's packed prompt
    blocks: jax.Array | None = None  # i32[G] decode: blocks each slot group reads (default: the window's)


def _attend_groups(q, positions, k_groups, v_groups, blocks, layer) -> jax.Array:
    """Decode attention group by group: rows of q [B,H,T,K] are the cache slots in group order; group g
    reads layer `layer` (index in the blocks' slab) of its first blocks[g] blocks. Each block's score and
    value products sit in a `lax.cond` on `block < blocks[g]` (only a taken one slices the layer out and
    reads); a block not read scores -inf, so the softmax over the whole window equals the one over the
    blocks read. Per block and group, one cond each way: the program holds 2 x blocks products per group
    and layer (a `lax.switch` over every block count held blocks x (blocks + 1): ~2x the compile time and
    2.2x the mapped code; a decode call of 16 slots at 300 positions is ~6% slower this way, at 900 the same)."""
    window = len(k_groups[0])
    outs, start = [], 0
    for g, (ks, vs) in enumerate(zip(k_groups, v_groups)):
        n = ks[0].shape[1]
        qg, pg = q[start: start + n], positions[start: start + n]
        count = window if blocks is None else blocks[g]
        outs.append(_attend_blocks(qg, pg, ks, vs, count, layer))
        start += n
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def _scores(q, k_slab, layer):
    return jnp.einsum("bhtk,bhwk->bhtw", q, at_layer((k_slab,), layer)[0], preferred_element_type=jnp.float32)


def _unread(q, k_slab, layer):
    return jnp.full(q.shape[:3] + (k_slab.shape[3],), _NEG, jnp.float32)


def _values(p, v_slab, layer):
    return jnp.einsum("bhtw,bhwk->bhtk", p, at_layer((v_slab,), layer)[0])


def _nothing(p, v_slab, layer):
    return jnp.zeros(p.shape[:3] + (v_slab.shape[4],), p.dtype)


def _attend_blocks(q, q_pos, ks, vs, count, layer) -> jax.Array:
    """q [B,H,T,K] over the first `count` (traced) of the blocks ks/vs (each [layers, B, H, Wi, K]) at
    `layer`; q_pos [B,T]. Returns [B,T,H,K] (zeros when count is 0). Each block's products are in a cond
    of their own (`slicing.when`: the same branch functions every time, so each shape traces once)."""
    parts = [when(i < count, _scores, _unread, q, k, layer) for i, k in enumerate(ks)]
    width = sum(k.shape[3] for k in ks)
    s = jnp.concatenate(parts, axis=-1) * (1.0 / jnp.sqrt(jnp.float32(q.shape[-1])))
    visible = jnp.arange(width, dtype=q_pos.dtype)[None, None, None, :] <= q_pos[:, None, :, None]
    probs = jax.nn.softmax(jnp.where(visible, s, _NEG), axis=-1).astype(vs[0].dtype)
    out, start = None, 0
    for i, v in enumerate(vs):
        p = probs[..., start: start + v.shape[3]]
        part = when(i < count, _values, _nothing, p, v, layer)
        out, start = part if out is None else out + part, start + v.shape[3]
    return out.transpose(0, 2, 1, 3)


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs | None, lead=()):
        self.c_attn = QKV(cfg, dtype, rngs, lead)
        self.c_proj = OutProj(cfg, dtype, rngs, lead)

    def __call__(self, x, positions, cache: KVCache | None, layer, where: Where):
        """Self-attention over this call's tokens (inside each segment when given), or (window set) over
        the first `window` cache positions.

        With a cache, this call's K/V are first written: run by run (prefill and extend, `where.runs`),
        or each token at (its row's slot, its position) (decode). `layer`: this layer's index (a Python
        int in the loop, traced in the scan).
        """
        q, k, v = self.c_attn(x)
        if where.runs is not None:  # prefill / extend: positions below T / the window
            cache = cache.write_runs(layer, where.runs, k, v, limit=where.window or x.shape[1])
        elif cache is not None:  # decode (extend with slots over `data`): row b is slot b
            cache = cache.write(layer, positions, k, v, limit=where.window)
        if where.window is None:
            out = _attend(q, (k,), (v,), positions, positions, where.segments)
        else:
            k_groups, v_groups, index = cache.window(layer, where.window)
            out = _attend_groups(q, positions, k_groups, v_groups, where.blocks, index)
        return self.c_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs | None, lead=()):
        self.c_fc = Linear(cfg.n_embd, cfg.n_inner, dtype, rngs, lead)
        self.c_proj = Linear(cfg.n_inner, cfg.n_embd, dtype, rngs, lead)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    """One transformer layer; built with `lead=(L,)` it holds all L layers' parameters stacked, and
    `GPT2.hidden` runs it on one layer's slice at a time."""

    def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs | None, lead=()):
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype, lead)
        self.attn = Attention(cfg, dtype, rngs, lead)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype, lead)
        self.mlp = MLP(cfg, dtype, rngs, lead)

    def __call__(self, x, positions, cache, layer, where: Where):
        a, cache = self.attn(self.ln_1(x), positions, cache, layer, where)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class Embedding(nnx.Module):
    def __init__(self, rows: int, dim: int, dtype, rngs: nnx.Rngs | None, std: float):
        self.weight = _param((rows, dim), dtype, rngs, std)


class GPT2(nnx.Module):
    def __init__(self, cfg: GPT2Config, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 scan_layers: bool = False):
        """Random init (std 0.02) with `rngs`; zeros without (to be overwritten by a loader). `scan_layers`:
        stacked layer parameters and a scanned forward (module docstring)."""
        self.config, self.scan_layers = cfg, scan_layers
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, dtype, rngs, 0.02)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd, dtype, rngs, 0.01)
        if scan_layers:
            self.h = Block(cfg, dtype, rngs, lead=(cfg.n_layer,))
        else:
            self.h = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype)

    def __call__(self, tokens, positions, cache: KVCache | None = None, **where):
        """tokens/positions [B,T] -> (logits f32 [B,T,V], or [N,V] with `select`, cache): `logits` of
        `hidden` (same arguments)."""
        h, cache = self.hidden(tokens, positions, cache, **where)
        return self.logits(h), cache

    def hidden(self, tokens, positions, cache: KVCache | None = None, *, runs=None, window=None,
               segments=None, blocks=None, select=None):
        """tokens/positions [B,T] -> (final hidden states after `ln_f` [B,T,D], or [N,D] for `select` [N]
        flat token indices (row * T + column), cache). Callers that need only part of the logits (scoring
        reduces them chunk by chunk) apply `logits` themselves.

        cache None: plain causal forward. cache + `runs` (`engine.kv_cache.Runs`): each run's tokens write
        their K/V into its slot from its start (prefill: 0; out-of-range slots are dropped); `segments`
        [B,T] keeps attention inside each packed prompt. cache + `window`: rows are the cache slots in
        order and attend to cache positions [0, window) (decode; extend, which writes its tokens by
        `runs`); `blocks` [G] limits each slot group to its first blocks.
        """
        where = Where(runs, window, segments, blocks)
        x = self.wte.weight[...][tokens] + self.wpe.weight[...][positions]
        if self.scan_layers:
            graphdef, stacked = nnx.split(self.h)

            def layer(carry, xs):
                x, cache = carry
                index, params = xs
                return nnx.merge(graphdef, params)(x, positions, cache, index, where), None

            layers = jnp.arange(self.config.n_layer, dtype=jnp.int32)
            (x, cache), _ = jax.lax.scan(layer, (x, cache), (layers, stacked))
        else:
            for index, block in enumerate(self.h):
                x, cache = block(x, positions, cache, index, where)
        if select is not None:
            x = x.reshape(-1, x.shape[-1])[select]
        return self.ln_f(x), cache

    def logits(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> f32 [..., V] through the tied `wte`; padded vocab entries are -inf."""
        wte = self.wte.weight[...]
        out = jnp.einsum("...d,vd->...v", h.astype(wte.dtype), wte, preferred_element_type=jnp.float32)
        valid = jnp.arange(wte.shape[0]) < self.config.vocab_size
        return jnp.where(valid, out, -jnp.inf)
