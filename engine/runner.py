"""The compiled programs and the on-device decode state they carry.

Programs (a fixed set, all compiled by `warmup`; `engine.program_set` lists them and gets them into memory):
  prefill(bucket T, rows B): the forward of up to P prompts packed end to end into B rows of T tokens
      (attention stays inside each prompt), their K/V written into their slots and the per-slot sampling
      state set, in one call; it returns each prompt's last logits (padded to the first-token width W);
  first-token(width W): right after each prefill or extend call, samples up to W slots' first tokens
      from those logits and stores them; sampling is much of a small program's compile, so the prefill
      and extend programs leave it to these few (W: a power of 4 up to the slots, `first_width`);
  decode(window W, width N): k steps (`lax.scan`) of slots [0, N), sampling on device, attending to cache
      positions [0, W) (whole KV blocks; each slot group only to the blocks its live slots reach, a
      per-call input); slot groups past N are left out and put back untouched, and a group N covers
      only in part (N below a group's size: `EngineConfig.decode_widths`) has its first rows sliced out and back;
  move: copies every per-slot row but the K/V from one slot to another (`Runner.move` runs the copy below
      for the K/V first), for the scheduler's compaction of live requests into low slots (so N follows the
      number of live requests); one program for every pair of slots (the slot indices are inputs).
  extend(bucket T) (prefix caching only): prompts resumed after their cached blocks. Row i is slot i (as in
      decode), holding up to T of its prompt's remaining tokens, which attend to the slot's cache blocks in
      place (the model's windowed path with T tokens per row; `engine.extend`); per-slot state set as in
      prefill, first tokens then sampled by the first-token program of width S. One program per extend
      bucket, all slots, the whole context;
  copy: up to S - 1 destination slots each take their first blocks from one source slot (traced source,
      destinations and block counts: one program), cache only, for prefix-cache hits and n > 1 forks (all
      forks of a prompt in one call) and for a move's K/V (every configuration has it);
  score-prefill(bucket T, rows B): the same prefill, also scoring every packed prompt token (the LM head of
      all B*T tokens, chunk by chunk, log-softmaxed, gathered at each token's next token in its prompt, plus
      the top-N: `engine.scoring`). A separate program, used only for calls holding a `prompt_logprobs`
      request (the B*T tokens' LM head costs far more than the P sampled rows') and compiled on its first
      such call: `warmup` compiles it only when asked (`score=True`), so the no-recompile guarantee covers
      scoring only then.
With the slots split over `data` (D > 1), prefill and decode run per data shard (`per_shard` over `data`
only; `model` stays automatic): a prefill call's rows and prompts are D equal parts, part d holding only
prompts of shard d's slots, so each device group prefills only what it caches and writes its K/V locally;
decode always runs every slot, each shard its own. Only the sampled ids (and logprobs) cross `data`.
Insert is fused into prefill: a separate insert program would materialise every prompt's K/V once more.
`DecodeState` (`engine.device_state`, with the host rows and the programs' shared pure functions) is
donated to every program, so the cache is updated in place and never copied. Sampling parameters are
per-slot arrays inside it: new values never recompile. The host gets back one small int array per call
(plus logprob arrays, fetched only when a request asked for them).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from engine.config import EngineConfig, GPT2Config
from engine.device_state import (DecodeState, PrefillRows, Sampled, dummy_rows, first_width, mark_seen, move_row,
                                 neutral_params, prefill_key, sample_first, sample_step, state_axes, store_prompt)
from engine.extend import ExtendRows
from engine.kv_cache import KVCache, Runs, slot_groups
from engine.kv_copy import copy_blocks
from engine.processors import uses_penalties
from engine.program_set import ProgramSet, copy_targets, leaves
from engine.programs import Program
from engine.sampling import MAX_LOGPROBS, MinTokensBan, SlotParams
from engine.scoring import Scored, score_packed
from engine.sharding import make_mesh, manual_specs, named_sharding, per_shard, replicated, tree_shardings

__all__ = ["DecodeState", "PrefillRows", "Runner", "Sampled", "dummy_rows", "neutral_params"]


def _shapes(tree) -> bool:
    """Whether `tree` holds `jax.ShapeDtypeStruct`s (a runner built before its weights) rather than arrays."""
    return any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(tree))


def _local_slots(slots, s: int):
    """Inside a per-`data`-shard program: this shard's slots are [d * s, (d + 1) * s): local indices, any
    other slot s (dropped)."""
    slots = slots - jax.lax.axis_index("data") * s
    return jnp.where((slots >= 0) & (slots < s), slots, s)


# shard_map specs of the per-`data`-shard programs: dim 0 split over `data` (slots, rows, prompts), or whole.
_DATA, _WHOLE, _DATA_DIM1 = PartitionSpec("data"), PartitionSpec(), PartitionSpec(None, "data")
_DATA_AXIS = frozenset({"data"})


class Runner(ProgramSet):
    """Owns the model state and the decode state; runs the compiled programs."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, cfg: GPT2Config, ecfg: EngineConfig,
                 cache_dtype, mesh: jax.sharding.Mesh | None = None, executables: str | None = None):
        """`params` must already be placed on `mesh` (default None: 1x1 on the first device), or be their
        `jax.ShapeDtypeStruct`s (with shardings) until `bind` hands them over: the decode state (the KV
        cache) is then only shapes too until `bind` allocates it, after the weights, as before.
        `executables`: a folder where compiled programs are stored and loaded from
        (`engine.programs.ExecutableStore`)."""
        self.graphdef, self.params, self.cfg, self.ecfg = graphdef, params, cfg, ecfg
        self.mesh = make_mesh(mesh)
        self.max_len = min(ecfg.max_seq_len, cfg.n_positions)
        self.ban = MinTokensBan(cfg.padded_vocab_size, cfg.eos_token_id)  # the packers' min_tokens bit sets
        self.trace_count = 0  # incremented whenever a program is traced: the no-recompile check reads it
        # Fixed output shardings: the donated state comes back laid out as it went in (never resharded per
        # call); sampled ids come back replicated, so every process can read them.
        self.groups = slot_groups(ecfg.max_slots, self.mesh.shape["data"], ecfg.kv_slot_groups)
        self.stacked = self._model(params).scan_layers  # the cache follows the model: one slab, or per layer
        axes = state_axes(cfg, self.max_len, self.groups, self.stacked)
        self.state_shardings = tree_shardings(self.mesh, axes)
        self._state_spec = manual_specs(axes, _DATA_AXIS)  # per-`data`-shard programs: slots split
        outs = (self.state_shardings, replicated(self.mesh))
        # Prefill and extend hand their last logits to the first-token program: rows stay on their shard.
        self.logits_sharding = named_sharding(self.mesh, ("slots", "sampled_vocab"))
        self._cache_dtype = cache_dtype
        initial = functools.partial(self._initial_state, cache_dtype)
        self.state = initial() if not _shapes(params) else jax.tree.map(
            lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
            jax.eval_shape(initial), self.state_shardings)
        store = self._store(executables)
        program = functools.partial(Program, store=store)
        self._prefill = program("prefill", self._prefill_impl, donate_argnums=(1,),
                                out_shardings=(self.state_shardings, self.logits_sharding))
        self._score_prefill = program("score-prefill", self._prefill_impl, donate_argnums=(1,),
                                      out_shardings=(self.state_shardings, (self.logits_sharding, outs[1])))
        self._first = program("first-token", self._first_impl, donate_argnums=(0,), out_shardings=outs)
        self._decode = program("decode", self._decode_impl, donate_argnums=(1,), static_argnums=(2, 3),
                               out_shardings=outs)
        self._move = program("move", move_row, donate_argnums=(0,), out_shardings=self.state_shardings)
        self._extend = program("extend", self._extend_impl, donate_argnums=(1,),
                               out_shardings=(self.state_shardings, self.logits_sharding))
        self._copy = program("copy", copy_blocks, donate_argnums=(0,),
                             out_shardings=self.state_shardings.cache)

    def bind(self, params: nnx.State) -> None:
        """Take the parameters of a runner built on their `jax.ShapeDtypeStruct`s (the same paths, shapes,
        dtypes and shardings: the programs and their store were made for those), and allocate its state."""
        if leaves(params) != leaves(self.params):
            raise ValueError("Runner.bind: the parameters differ from the shapes the runner was built on")
        self.params = params
        if _shapes(self.state):
            self.state = self._initial_state(self._cache_dtype)

    def _initial_state(self, cache_dtype) -> DecodeState:
        s, v = self.ecfg.max_slots, self.cfg.padded_vocab_size
        shardings = self.state_shardings
        cache = KVCache.create(self.cfg, s, self.max_len, cache_dtype, (shardings.cache.k[0][0][0],
                                                                         shardings.cache.lengths), self.groups,
                               self.stacked)

        def rest() -> DecodeState:
            params = SlotParams(*(jnp.asarray(a) for a in neutral_params(s)))
            return DecodeState(None, jnp.zeros(s, jnp.int32), jnp.zeros(s, jnp.int32), jnp.zeros((s, 2), jnp.uint32),
                               params, jnp.zeros(s, bool), jnp.zeros((s, v), bool), jnp.zeros((s, v), jnp.int32),
                               jnp.zeros((s, self.ban.words), jnp.uint32))

        state = jax.jit(rest, out_shardings=dataclasses.replace(shardings, cache=None))()
        return dataclasses.replace(state, cache=cache)

    def _full_vocab(self, logits: jax.Array, rows_axis: str, manual: bool = False) -> jax.Array:
        """Sampling sorts, top-k's and argmaxes whole rows: gather the vocab-sharded logits (exact).
        `manual`: inside a per-`data`-shard function, where a spec names only the automatic axes."""
        if manual:
            return jax.lax.with_sharding_constraint(logits, PartitionSpec(None, None))
        return jax.lax.with_sharding_constraint(logits, named_sharding(self.mesh, (rows_axis, "sampled_vocab")))

    def _model(self, params: nnx.State):
        return nnx.merge(self.graphdef, params)

    def _prefill_impl(self, params, state: DecodeState, rows: PrefillRows, top=None):
        """The prefill program; with `top` (i32 [], the largest prompt_logprobs N in the call) it also scores
        every token (the score-prefill program). With slots over `data`, it runs per data shard on its own
        rows, prompts and slots (`engine.prefill_packing` packs each shard's part with its own slots'
        prompts), so each device prefills only what it caches and writes its K/V locally."""
        self.trace_count += 1
        if self.mesh.shape["data"] == 1:
            return self._prefill_rows(params, state, rows, top)
        args, specs = (params, state, rows), (_WHOLE, self._state_spec, _DATA)
        if top is not None:
            args, specs = args + (top,), specs + (_WHOLE,)
        shard = functools.partial(self._prefill_rows, manual=True)
        return per_shard(shard, self.mesh, specs, (self._state_spec, _DATA), _DATA_AXIS)(*args)

    def _prefill_rows(self, params, state: DecodeState, rows: PrefillRows, top=None, manual: bool = False):
        p, v, s = rows.slots.shape[0], self.cfg.padded_vocab_size, state.tokens.shape[0]
        slots = _local_slots(rows.slots, s) if manual else rows.slots
        model = self._model(params)
        # Each prompt's K/V goes to its slot, the prompts that write first; a fork's entry (its tokens are
        # its leader's) and padding prompts (slot S) write nothing.
        width = rows.tokens.shape[1]
        runs = Runs.first((rows.source == jnp.arange(p)) & (slots < s), rows.last // width,
                          rows.last % width - rows.lengths + 1, slots, rows.lengths, jnp.zeros_like(slots))
        hidden, cache = model.hidden(rows.tokens, rows.positions, state.cache, runs=runs,
                                     segments=rows.segments, select=None if top is not None else rows.last)

        def head(h):
            return self._full_vocab(model.logits(h), "rows", manual)

        scored = None
        if top is not None:  # scoring: every token's hidden state [B*T, D]; its logits only chunk by chunk
            hidden = hidden.reshape(-1, hidden.shape[-1])
            scored = score_packed(hidden, head, rows.tokens, rows.segments, p, top)
            hidden = hidden[rows.last]
        logits = jnp.pad(head(hidden), ((0, first_width(p, s) - p), (0, 0)))  # the first-token program's rows
        # The prompt's tokens count as seen (repetition penalty); padding tokens are segment P: dropped.
        seen = jnp.zeros((p, v), bool).at[rows.segments, rows.tokens].set(True, mode="drop")[rows.source]
        state = store_prompt(state, cache, rows, seen, slots)
        return state, (logits if scored is None else (logits, scored))

    def _first_impl(self, state: DecodeState, logits, slots):
        """The first-token program (`sample_first`); with slots over `data`, per data shard, as prefill."""
        self.trace_count += 1
        if self.mesh.shape["data"] == 1:
            return sample_first(state, self._full_vocab(logits, "slots"), slots)

        def shard(state, logits, slots):
            local = _local_slots(slots, state.tokens.shape[0])
            return sample_first(state, self._full_vocab(logits, "slots", True), local)

        return per_shard(shard, self.mesh, (self._state_spec, _DATA, _DATA), (self._state_spec, _DATA),
                         _DATA_AXIS)(state, logits, slots)

    def _extend_impl(self, params, state: DecodeState, rows: ExtendRows, blocks):
        self.trace_count += 1
        s, v = rows.slots.shape[0], self.cfg.padded_vocab_size
        # Row i is slot i: an extending row's tokens go to its slot from its first position (a block
        # boundary); padding positions are max_len. With slots over `data` each token is scattered to its
        # slot instead (update slices at a traced slot would gather every row's K/V to every device).
        runs = None
        if self.mesh.shape["data"] == 1:
            rows_i = jnp.arange(s, dtype=jnp.int32)
            runs = Runs.first(rows.slots < s, rows_i, jnp.zeros_like(rows_i), rows.slots,
                              (rows.positions < self.max_len).sum(1, dtype=jnp.int32), rows.positions[:, 0])
        logits, cache = self._model(params)(rows.tokens, rows.positions, state.cache, runs=runs,
                                            window=self.max_len, blocks=blocks, select=rows.last)
        logits = self._full_vocab(logits, "slots")
        # Only this call's tokens count as seen: requests with a repetition penalty never extend.
        marked = jnp.where(rows.positions < self.max_len, rows.tokens, v)  # padding: dropped
        seen = jnp.zeros((s, v), bool).at[jnp.arange(s)[:, None], marked].set(True, mode="drop")
        return store_prompt(state, cache, rows, seen, rows.slots), logits

    def _decode_impl(self, params, state: DecodeState, window: int, width: int, blocks, live):
        """k steps of slots [0, width): the others are sliced off first and put back untouched after.
        With slots over `data` (every call runs every slot), each data shard decodes its own slots on its
        own part of the cache: no K/V, logits or sampling rows cross devices (only the sampled ids)."""
        self.trace_count += 1
        if self.mesh.shape["data"] > 1:
            rows = functools.partial(self._decode_rows, window=window, manual=True)
            return per_shard(rows, self.mesh, (_WHOLE, self._state_spec, _WHOLE, _DATA),
                             (self._state_spec, _DATA_DIM1), _DATA_AXIS)(params, state, blocks, live)
        if width == self.ecfg.max_slots:
            return self._decode_rows(params, state, blocks, live, window)
        rest = dataclasses.replace(state, cache=None)
        head = dataclasses.replace(jax.tree.map(lambda a: a[:width], rest), cache=state.cache.head(width))
        head, out = self._decode_rows(params, head, blocks, live, window)
        merged = jax.tree.map(lambda a, h: a.at[:width].set(h), rest, dataclasses.replace(head, cache=None))
        return dataclasses.replace(merged, cache=state.cache.with_head(head.cache)), out

    def _decode_rows(self, params, state: DecodeState, blocks, live, window: int, manual: bool = False):
        model = self._model(params)
        last = self.max_len - 1
        # Free slots (live False) get neutral parameters, so an all-greedy call takes the fast paths
        # (no warpers, penalties or log-softmax) whatever the slots' previous requests asked for.
        neutral = neutral_params(live.shape[0])
        state = dataclasses.replace(
            state, params=SlotParams(*(jnp.where(live, a, n) for a, n in zip(state.params, neutral))),
            wants_logprobs=state.wants_logprobs & live)

        def step(st: DecodeState, _):
            positions = jnp.minimum(st.cache.lengths, last)[:, None]
            logits, cache = model(st.tokens[:, None], positions, st.cache, window=window, blocks=blocks,
                                  select=jnp.arange(st.tokens.shape[0]))
            logits = self._full_vocab(logits, "slots", manual)
            out = sample_step(logits, st.params, st.seen, st.counts, st.keys, st.steps, st.wants_logprobs,
                              st.banned)
            # Only penalised rows ever read seen/counts, and a live penalised row keeps this true every
            # step, so skipping the two [S, V] passes otherwise loses nothing.
            seen, counts = jax.lax.cond(jnp.any(uses_penalties(st.params)), mark_seen, lambda s, c, _: (s, c),
                                        st.seen, st.counts, out.tokens)
            cache = dataclasses.replace(cache, lengths=jnp.minimum(cache.lengths + 1, self.max_len))
            st = dataclasses.replace(st, cache=cache, tokens=out.tokens, steps=st.steps + 1, seen=seen,
                                     counts=counts)
            return st, out

        return jax.lax.scan(step, state, None, length=self.ecfg.decode_steps)

    def prefill(self, rows: PrefillRows) -> Sampled:
        """Run one prefill call and its first-token call; returns device arrays [W] (and [W, N] for the
        logprobs), prompt i's at row `prompt_rows(P)[i]`."""
        self.state, logits = self._prefill(prefill_key(rows), self.params, self.state, rows)
        return self._sample_first(logits, rows.slots)

    def score_prefill(self, rows: PrefillRows, top: int = MAX_LOGPROBS) -> tuple[Sampled, Scored]:
        """`prefill`, also scoring every prompt token (`engine.scoring.Scored`, device arrays [B*T, ...]);
        `top`: the largest prompt_logprobs N of the call (top entries beyond it are not computed)."""
        self.state, (logits, scored) = self._score_prefill(prefill_key(rows), self.params, self.state, rows,
                                                           np.int32(top))
        return self._sample_first(logits, rows.slots), scored

    def extend(self, rows: ExtendRows) -> Sampled:
        """Run one extend call and its first-token call; returns device arrays [S] (and [S, N]) indexed by slot."""
        blocks = np.asarray(self.state.cache.group_blocks(self.ecfg.max_slots, self.max_len, rows.reach), np.int32)
        self.state, logits = self._extend(rows.tokens.shape[1], self.params, self.state, rows, blocks)
        return self._sample_first(logits, rows.slots)

    def _sample_first(self, logits: jax.Array, slots: np.ndarray) -> Sampled:
        """The first-token call after a prefill or extend: `slots` [P] (P prompts, data shard by data
        shard) placed at their `prompt_rows` of the `logits` rows [W], the rest slot S (dropped)."""
        padded = np.full(logits.shape[0], self.ecfg.max_slots, np.int32)
        padded[self.prompt_rows(len(slots))] = slots
        self.state, out = self._first(logits.shape[0], self.state, logits, padded)
        return out

    def copy(self, copies) -> None:
        """For each (src, dst, blocks): slot dst's first `blocks` cache blocks take slot src's. One call per
        source slot (all forks of one prompt are one call); no slot may be both a source and a destination
        (the copies then commute)."""
        by_src: dict[int, list[tuple[int, int]]] = {}
        for src, dst, count in copies:
            by_src.setdefault(src, []).append((dst, count))
        if set(by_src) & {dst for _, dst, _ in copies}:
            raise ValueError(f"copy: a slot is both a source and a destination in {copies}")
        for src, targets in by_src.items():
            cache = self._copy((), self.state.cache, np.int32(src), *copy_targets(targets, self.ecfg.max_slots))
            self.state = dataclasses.replace(self.state, cache=cache)

    def decode(self, window: int, width: int | None = None, reach=None) -> Sampled:
        """Run k decode steps over slots [0, width) (default all); returns device arrays [k, width] (and
        [k, width, N]). `reach` [S] (host ints, optional): the cache positions each slot reads up to in
        this call (0 for a free slot); each slot group then reads only the blocks its slots reach."""
        width = width or self.ecfg.max_slots
        if (window, width) not in self._decode:
            self._compile_decode_family(window, width)
        blocks = self.state.cache.group_blocks(width, window, reach)
        live = np.ones(width, bool) if reach is None else np.asarray(reach[:width]) > 0
        self.state, out = self._decode((window, width), self.params, self.state, window, width,
                                       np.asarray(blocks, np.int32), live)
        return out

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Copy every per-slot row (KV cache included) from src to dst slot, for each (src, dst) in order:
        the K/V blocks by the block copy, the other rows by the move program; one program each for every
        pair of slots."""
        for src, dst in moves:
            if src != dst:
                self.copy([(src, dst, self.state.cache.blocks)])
                self.state = self._move((), self.state, np.int32(src), np.int32(dst))
