"""Configuration: the GPT-2 architecture (`GPT2Config`, with presets) and the engine (`EngineConfig`).

Both are frozen dataclasses; variants are made with `dataclasses.replace`. CLI flags map onto fields 1:1.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

VOCAB_PAD_MULTIPLE = 128  # and n_head: gpt2/medium 50304, large 50560, xl 51200 (see padded_vocab_size)
# HF GPT2Config flags whose other values change the math (HF's defaults are plain GPT-2's values).
_GPT2_FLAGS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
               "tie_word_embeddings": True, "add_cross_attention": False}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{field}: expected a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 128 and of n_head, so every `model` mesh size that splits the
        heads (xl: 5 or 25) also splits the vocab."""
        multiple = math.lcm(VOCAB_PAD_MULTIPLE, self.n_head)
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf_dict(cls, d: Mapping) -> GPT2Config:
        """Build from the contents of an HF `config.json`; reject anything that is not GPT-2."""
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"config.json: model_type is {model_type!r}; this engine runs only 'gpt2' checkpoints")
        activation = d.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ValueError(f"config.json: activation_function {activation!r} is not supported (expected 'gelu_new')")
        n_inner = d.get("n_inner")
        if n_inner is not None and n_inner != 4 * d.get("n_embd", 768):
            raise ValueError(f"config.json: n_inner={n_inner} is not supported (expected null or 4 * n_embd)")
        for key, needed in _GPT2_FLAGS.items():  # variants that would load but compute different logits
            if d.get(key, needed) != needed:
                raise ValueError(f"config.json: {key}={d[key]!r} is not supported (GPT-2 uses {needed!r})")
        eos = d.get("eos_token_id", 50256)
        return cls(
            n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=d.get("n_embd", 768),
            vocab_size=d.get("vocab_size", 50257), n_positions=d.get("n_positions", 1024),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GPT2Config:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(data)

    def to_hf_dict(self) -> dict:
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": self.n_layer,
            "n_head": self.n_head, "n_embd": self.n_embd, "vocab_size": self.vocab_size,
            "n_positions": self.n_positions, "n_ctx": self.n_positions,
            "layer_norm_epsilon": self.layer_norm_epsilon, "activation_function": "gelu_new",
            "bos_token_id": self.eos_token_id, "eos_token_id": self.eos_token_id,
        }


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}


def preset(name: str) -> GPT2Config:
    """A preset by name; `openai-community/gpt2-xl` style hub ids map to their preset too."""
    key = name.rsplit("/", 1)[-1]
    if key not in PRESETS:
        raise ValueError(f"unknown GPT-2 preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]


DTYPES = ("float32", "bfloat16")


# Programs `Engine.warmup` compiles for the default EngineConfig on a 1024-position model (README
# "Start-up and compilation"): 17 prefill (bucket x rows), 3 first-token (widths 1, 4, 16), 3 decode (1
# window x widths 1, 4, 16), 1 block copy, 1 row move, and for prefix caching 2 extend (suffix buckets 32
# and 128).
DEFAULT_PROGRAMS = 27
# Each KV cache slot group adds its own attention kernels to every decode, extend and copy program (~1,000
# code mappings for gpt2, 4x that for gpt2-xl): more than this would approach the kernel's map limit.
MAX_SLOT_GROUPS = 8


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: slots, context, decode steps per call, prefill buckets, dtype, mesh."""

    max_slots: int = 16
    max_seq_len: int = 1024
    decode_steps: int = 8
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    prefill_token_budget: int = 1024  # tokens per prefill call (per data shard): bounds how many prompts it packs
    dtype: str = "float32"
    mesh: str | None = None
    seed: int | None = None  # engine-level seed for requests without their own
    # Prefix reuse (engine.prefix_cache): n > 1 forks one prefill, and full cache blocks of finished
    # prompts stay cached in free slots for later prompts that start with them.
    enable_prefix_caching: bool = True
    prefix_cache_max_blocks: int | None = None  # cached blocks kept in free slots (None: all of them)
    prefix_extend_buckets: tuple[int, ...] = (32, 128)  # suffix lengths compiled for resuming a cached prompt
    # Layers as one lax.scan over stacked parameters (engine.model): compile time independent of depth,
    # decode slower on XLA:CPU (it copies each layer's slices). Off: a Python loop over per-layer arrays.
    scan_layers: bool = False
    # Slot groups of the KV cache (engine.kv_cache): decode reads, per group, only the blocks its own live
    # slots reach. None: 4 (else 2, else 1) dividing max_slots, 1 with the slots over `data`. Fewer groups
    # compile and load the decode, extend and copy programs several times faster, but every slot then reads
    # up to the longest one's length (README "Start-up and compilation").
    kv_slot_groups: int | None = None

    def __post_init__(self) -> None:
        for field in ("max_slots", "max_seq_len", "decode_steps", "prefill_token_budget"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{field}: expected a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype: expected one of {DTYPES}, got {self.dtype!r}")
        buckets = tuple(sorted(set(int(b) for b in self.prefill_buckets)))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"EngineConfig.prefill_buckets: expected positive ints, got {self.prefill_buckets!r}")
        object.__setattr__(self, "prefill_buckets", buckets)
        object.__setattr__(self, "prefix_extend_buckets", tuple(sorted(set(self.prefix_extend_buckets))))
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"EngineConfig.scan_layers: expected a bool, got {self.scan_layers!r}")
        groups = self.kv_slot_groups
        if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool) or groups < 1
                                   or groups > MAX_SLOT_GROUPS or self.max_slots % groups):
            raise ValueError(f"EngineConfig.kv_slot_groups: expected None or an int from 1 to {MAX_SLOT_GROUPS} "
                             f"dividing max_slots={self.max_slots}, got {groups!r}")
        budget = self.prefix_cache_max_blocks
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ValueError(f"EngineConfig.prefix_cache_max_blocks: expected None or an int >= 0, got {budget!r}")

    def resolved_buckets(self) -> tuple[int, ...]:
        """Prefill buckets clipped to the context, always ending with one that holds the longest prompt."""
        limit = self.max_seq_len
        kept = [b for b in self.prefill_buckets if b < limit]
        return tuple(kept + [limit])

    def prefill_batch_sizes(self, bucket: int, data: int = 1) -> tuple[int, ...]:
        """Row counts compiled for one bucket: 1, 4, 16, ... up to what the token budget and slots allow,
        per `data` shard (each shard prefills rows of its own slots' prompts: a call has data x these)."""
        cap = max(1, min(self.max_slots // data, self.prefill_token_budget // bucket))
        sizes, size = [], 1
        while size < cap:
            sizes.append(size)
            size *= 4
        return tuple(data * n for n in sizes + [cap])

    def prefill_prompts(self, bucket: int, rows: int, data: int = 1) -> int:
        """Prompts one prefill call of `rows` x `bucket` tokens may pack (it samples a first token for each):
        one per 2 x smallest-bucket tokens, at least one per row, at most the slots; per `data` shard."""
        granule, rows = 2 * self.prefill_buckets[0], rows // data
        return data * min(self.max_slots // data, max(rows, rows * bucket // granule))

    def extend_buckets(self, block: int) -> tuple[int, ...] | None:
        """Suffix buckets compiled for prefix-cache hits (empty when no prompt can fill a block before its
        last token); None with prefix caching off (then no fork or block copy either)."""
        if not self.enable_prefix_caching:
            return None
        if self.max_seq_len <= block + 1:
            return ()
        return tuple(b for b in self.prefix_extend_buckets if 1 <= b < self.max_seq_len)

    def decode_windows(self) -> tuple[int, ...]:
        """Attention windows compiled for decode: the whole context only. Inside it each slot group reads
        only the blocks its live slots reach (a per-call input choosing among block counts 0, 1, 2, 3, ...),
        so a shorter window reads no fewer blocks; windows of 128 x 2^i only multiplied the decode programs
        (W1 measured the same with them, 2026-12-03: 131-138 vs 131-136 tok/s, each twice, same run)."""
        return (self.max_seq_len,)

    def decode_widths(self, data: int = 1, group: int | None = None) -> tuple[int, ...]:
        """Slot counts compiled for decode (a call runs slots [0, n)): 1, 4, 16, ... below `group` (the KV
        cache's slots per group; default max_slots), then group, 4 x group, 16 x group, ... below max_slots,
        and max_slots. A width inside a group slices that group's rows out and back (bytes of the rows
        run, small), while whole groups are read in place; steps of 4 keep the program count at log4 of
        the slots while a call computes at most 4x its live rows. Rows are not free on a CPU: one row's
        weight products are matrix-vector kernels streaming the weights, more rows a GEMM library call
        that repacks them every call (one live request, 64 slots, 16 steps: 0.60 s a call at width 1,
        1.31 s at 4, 2.35 s at 16; 2026-12-07). With slots over `data` (one group) every call runs all
        slots: a narrower one would reslice the sharded cache."""
        group, widths = max(group or self.max_slots, data), []
        for size, end in ((1 if data == 1 else group, group), (group, self.max_slots)):
            while size < end:
                widths.append(size)
                size *= 4
        return tuple(widths + [self.max_slots])
