"""`SchedulerConfig`: the scheduler's static shape knobs and their validation (plain Python, no JAX).

Invariant: a constructed config is valid (`__post_init__` raises ValueError naming the field otherwise), so
the scheduler never re-checks buckets, windows or widths.
"""
from __future__ import annotations

import dataclasses

MAX_POSITIONS = 1024


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_slots: int
    max_seq_len: int
    decode_steps: int
    prefill_buckets: tuple[int, ...]
    prefill_batch_sizes: dict[int, tuple[int, ...]]
    decode_windows: tuple[int, ...]
    eos_token_id: int | None = None
    # Compiled decode widths: a call runs slots [0, n) for the smallest n here above the highest live
    # slot (empty: always max_slots). Admission fills the lowest free slot, so live slots stay low.
    decode_slot_counts: tuple[int, ...] = ()
    # Prompts one prefill call may hold, per bucket, one entry per batch size (the program samples that
    # many first tokens); prompts are packed several to a row when they fit. Empty: as many as rows.
    prefill_prompts: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # Cost of one attention pair relative to one token's weight matmuls (GPT-2: 4 d / (24 d^2) = 1/(6 d)):
    # weighs a longer packed row (more prompts, quadratic attention) against a shorter one.
    prefill_attention_cost: float = 0.0
    # Shards of the slot table (the mesh's `data` axis): slot s belongs to shard s // (max_slots / shards),
    # and each shard prefills only its own slots' prompts, in its own 1/shards of a call's rows and prompts.
    prefill_shards: int = 1
    # Prefix reuse (`engine.prefix_cache`): n > 1 forks and cached full cache blocks of `block` positions,
    # resumed by an extend call of one of `extend_buckets` suffix tokens per slot (empty: forks only).
    prefix_caching: bool = False
    block: int = 128
    extend_buckets: tuple[int, ...] = ()
    prefix_cache_max_blocks: int | None = None  # cached blocks kept in free slots (None: every one)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill_buckets", tuple(self.prefill_buckets))
        object.__setattr__(self, "decode_windows", tuple(self.decode_windows))
        object.__setattr__(self, "extend_buckets", tuple(self.extend_buckets))
        counts = tuple(sorted(set(self.decode_slot_counts) | {self.max_slots}))
        object.__setattr__(self, "decode_slot_counts", counts)
        sizes = {b: tuple(s) for b, s in dict(self.prefill_batch_sizes).items()}
        object.__setattr__(self, "prefill_batch_sizes", sizes)
        prompts = {b: tuple(dict(self.prefill_prompts).get(b, s)) for b, s in sizes.items()}
        object.__setattr__(self, "prefill_prompts", prompts)
        for field, problem in _config_problems(self):
            raise ValueError(f"SchedulerConfig.{field}: {problem}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ascending(values: tuple, low: int, high: int) -> bool:
    """Non-empty, ints in [low, high], strictly increasing."""
    ints = bool(values) and all(_is_int(v) and low <= v <= high for v in values)
    return ints and all(a < b for a, b in zip(values, values[1:]))


def _config_problems(c: SchedulerConfig) -> list[tuple[str, str]]:
    """Every (field, what is wrong) pair; empty when the configuration is valid."""
    out = []

    def check(field: str, ok: bool, expected: str) -> None:
        if not ok:
            out.append((field, f"expected {expected}, got {getattr(c, field)!r}"))

    check("max_slots", _is_int(c.max_slots) and c.max_slots >= 1, "an int >= 1")
    seq_ok = _is_int(c.max_seq_len) and 2 <= c.max_seq_len <= MAX_POSITIONS
    check("max_seq_len", seq_ok, f"an int in [2, {MAX_POSITIONS}]")
    check("decode_steps", _is_int(c.decode_steps) and c.decode_steps >= 1, "an int >= 1")
    shards_ok = _is_int(c.prefill_shards) and c.prefill_shards >= 1 and c.max_slots % c.prefill_shards == 0
    check("prefill_shards", shards_ok, f"an int >= 1 dividing max_slots={c.max_slots}")
    if out:
        return out
    check("prefill_buckets", _ascending(c.prefill_buckets, 1, c.max_seq_len),
          f"strictly increasing ints in [1, max_seq_len={c.max_seq_len}]")
    missing = [b for b in c.prefill_buckets if b not in c.prefill_batch_sizes]
    check("prefill_batch_sizes", not missing and all(_ascending(s, 1, 2**31) for s in c.prefill_batch_sizes.values()),
          f"a strictly increasing tuple of ints >= 1 for every bucket (missing buckets: {missing})")
    caps_ok = all(len(c.prefill_prompts[b]) == len(s) and all(_is_int(p) and p >= n for p, n in zip(c.prefill_prompts[b], s))
                  for b, s in c.prefill_batch_sizes.items() if b in c.prefill_prompts)
    whole = all(_is_int(n) and n % c.prefill_shards == 0 for b in c.prefill_batch_sizes for n in c.prefill_batch_sizes[b] + c.prefill_prompts[b])
    check("prefill_batch_sizes", whole, f"row and prompt counts that are multiples of prefill_shards={c.prefill_shards}")
    check("prefill_prompts", caps_ok, "for each bucket, one int >= its batch size per entry of prefill_batch_sizes")
    windows_ok = _ascending(c.decode_windows, 1, c.max_seq_len) and c.decode_windows[-1] == c.max_seq_len
    check("decode_windows", windows_ok, f"strictly increasing ints ending with max_seq_len={c.max_seq_len}")
    check("decode_slot_counts", _ascending(c.decode_slot_counts, 1, c.max_slots),
          f"ints in [1, max_slots={c.max_slots}]")
    check("extend_buckets", not c.extend_buckets or _ascending(tuple(c.extend_buckets), 1, c.max_seq_len),
          f"strictly increasing ints in [1, max_seq_len={c.max_seq_len}]")
    check("block", _is_int(c.block) and c.block >= 1, "an int >= 1")
    budget = c.prefix_cache_max_blocks
    check("prefix_cache_max_blocks", budget is None or (_is_int(budget) and budget >= 0), "None or an int >= 0")
    check("eos_token_id", c.eos_token_id is None or (_is_int(c.eos_token_id) and c.eos_token_id >= 0),
          "None or an int >= 0")
    return out
