"""The runner's program set: every program a configuration can run, and getting each into memory.

`ProgramSet` is a mixin of `engine.runner.Runner` (it reads the runner's programs, state and configs):
`programs` lists (program, key, example args) for every shape the engine can meet, slowest to compile
first; `warmup` compiles or loads all of them ahead of time (in parallel), or with `background` compiles
only what the executable store lacks and loads the rest behind; `prefetch` starts loading the stored
first-token, decode, extend, copy and move programs in the background; and a lazy engine's first call of
a decode program compiles it with its family (`_compile_decode_family`). `_store` is the executable store
keyed by everything the programs are traced from (`leaves`: every parameter's and state array's path,
shape, dtype and sharding, the same for arrays and their `jax.ShapeDtypeStruct`s). `copy_targets` pads
the block copy's destinations to the slot count, so one copy program serves any number of them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine.device_state import dummy_rows, first_rows, first_width, prefill_key
from engine.extend import dummy_extend_rows
from engine.programs import ExecutableStore, compile_all, fingerprint


class ProgramSet:
    def programs(self, buckets: tuple[int, ...], windows: tuple[int, ...], widths: tuple[int, ...] = (),
                 score: bool = False, extend: tuple[int, ...] | None = None) -> list:
        """(program, key, example args) of every program the engine can run: each (window, width) decode,
        with `extend` (prefix reuse on: its suffix buckets) each extend, the block copy and the row move
        (a slot's move is both), each first-token width, and each
        (bucket, rows) prefill (with `score`, its scoring variant too). Slowest to compile first (decode,
        extend, then the larger shapes), so a parallel `compile_all` ends on short programs."""
        out = []
        for window in sorted(windows, reverse=True):
            for width in sorted(widths or (self.ecfg.max_slots,), reverse=True):
                blocks = np.asarray(self.state.cache.group_blocks(width, window), np.int32)
                args = (self.params, self.state, window, width, blocks, np.ones(width, bool))
                out.append((self._decode, (window, width), args))
        for bucket in sorted(extend or (), reverse=True):
            rows = dummy_extend_rows(self.ecfg.max_slots, bucket, self.max_len, self.ban)
            blocks = np.zeros(len(self.state.cache.group_sizes), np.int32)
            out.append((self._extend, bucket, (self.params, self.state, rows, blocks)))
        out.append((self._copy, (), (self.state.cache, np.int32(0), *copy_targets([], self.ecfg.max_slots))))
        out.append((self._move, (), (self.state, np.int32(0), np.int32(0))))
        for width in sorted(self.first_widths, reverse=True):
            logits = jax.ShapeDtypeStruct((width, self.cfg.padded_vocab_size), jnp.float32,
                                          sharding=self.logits_sharding)
            out.append((self._first, width, (self.state, logits, np.full(width, self.ecfg.max_slots, np.int32))))
        data = self.mesh.shape["data"]
        for bucket in sorted(buckets, reverse=True):
            for size in sorted(self.ecfg.prefill_batch_sizes(bucket, data), reverse=True):
                rows = dummy_rows(size, bucket, self.ecfg.prefill_prompts(bucket, size, data), self.ecfg.max_slots,
                                  self.ban.words)
                out.append((self._prefill, prefill_key(rows), (self.params, self.state, rows)))
                if score:
                    out.append((self._score_prefill, prefill_key(rows), (self.params, self.state, rows, np.int32(0))))
        return out

    def prefetch(self, windows: tuple[int, ...], widths: tuple[int, ...], extend: tuple[int, ...] | None) -> None:
        """Start loading the stored first-token, decode, extend, copy and move programs in the background, in
        that order (`Program.prefetch`): every job needs some of them with or right after its first prefill,
        and a lazy start would load each one then; prefill programs (one per bucket x rows, a job meets a
        few) load on first use."""
        programs = self.programs((), windows, widths, extend=extend)
        for program, key, _ in sorted(programs, key=lambda r: r[0] is not self._first):  # stable: rest in order
            program.prefetch(key)

    def warmup(self, buckets: tuple[int, ...], windows: tuple[int, ...], widths: tuple[int, ...] = (),
               score: bool = False, extend: tuple[int, ...] | None = None, background: bool = False) -> dict:
        """Compile every program (in parallel; none runs): afterwards no prompt length, slot count or
        parameter mix compiles again. With `background`, the stored ones only start loading (in the
        programs' order, `Program.prefetch`) and the rest compile now. Returns the compile seconds per
        program class (loads count as 0)."""
        programs = self.programs(buckets, windows, widths, score, extend)
        if not background:
            return compile_all(programs)
        ready = [r[0].needs_no_compile(r[1]) for r in programs]
        seconds = compile_all([r for r, stored in zip(programs, ready) if not stored])
        for (program, key, _), stored in zip(programs, ready):
            if stored:
                program.prefetch(key)
                seconds.setdefault(program.name, 0.0)
        return seconds

    def _compile_decode_family(self, window: int, width: int) -> None:
        """A decode program met before it is compiled or loaded (a lazy start, e.g. a batch job): compile
        it together with the narrower decode widths and, past width 1, the copy and move programs, in
        parallel (`compile_all`; stored ones load): a job that decodes `width` slots needs those soon (its
        width falls as requests end, compaction moves rows), and one by one they would compile in turn."""
        widths = [w for w in self.decode_widths if w <= width]
        family = self.programs((), (window,), tuple(widths) or (width,))
        compile_all([r for r in family if r[0] is self._decode or (width > 1 and r[0] is not self._first)])

    def _store(self, folder: str | None) -> ExecutableStore | None:
        """The store for this runner's programs: keyed by the configs, the mesh's devices and every
        parameter's and state array's path, shape, dtype and sharding (what the programs are traced from)."""
        if folder is None:
            return None
        devices = list(self.mesh.devices.flat)
        # unset groups and their value: one program set; the engine seed and the prefix-cache budget only
        # steer the host (request seeds, scheduling), so engines that differ in them share their programs
        ecfg = dataclasses.replace(self.ecfg, kv_slot_groups=self.groups, seed=None, prefix_cache_max_blocks=None)
        key = fingerprint(self.cfg, ecfg, dict(self.mesh.shape), [(d.platform, d.id) for d in devices],
                          leaves(self.params), leaves(self.state))
        return ExecutableStore(folder, key, devices)

    def prompt_rows(self, prompts: int) -> np.ndarray:
        """Row of each of a prefill call's `prompts` entries in what `prefill` returns."""
        return first_rows(prompts, self.mesh.shape["data"], self.ecfg.max_slots)

    @property
    def first_widths(self) -> tuple[int, ...]:
        """Every width of the first-token program a prefill or extend call can need."""
        data = self.mesh.shape["data"]
        return tuple(sorted({data * first_width(p, self.ecfg.max_slots // data)
                             for p in range(1, self.ecfg.max_slots // data + 1)}))

    @property
    def decode_widths(self) -> tuple[int, ...]:
        """The decode widths this runner compiles (`EngineConfig.decode_widths` for its slot groups)."""
        return self.ecfg.decode_widths(self.mesh.shape["data"], self.ecfg.max_slots // self.groups)

    @property
    def num_compiled(self) -> int:
        programs = (self._prefill, self._score_prefill, self._first, self._decode, self._move, self._extend,
                    self._copy)
        return sum(len(p) for p in programs)


def copy_targets(targets: list[tuple[int, int]], num_slots: int) -> tuple[np.ndarray, np.ndarray, np.int32]:
    """The copy program's (dsts i32[S], counts i32[S], n) for (dst slot, blocks) pairs: padded to the
    slot count (a source has at most S - 1 destinations), so one program serves any number of them."""
    dsts, counts = np.full(num_slots, num_slots, np.int32), np.zeros(num_slots, np.int32)
    for i, (dst, count) in enumerate(targets):
        dsts[i], counts[i] = dst, count
    return dsts, counts, np.int32(len(targets))


def leaves(tree) -> list:
    """(path, shape, dtype, sharding) of every array (or `jax.ShapeDtypeStruct`) in `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(k), a.shape, str(a.dtype), str(a.sharding)) for k, a in flat]
