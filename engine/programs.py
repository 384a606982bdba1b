"""Compiled programs held as executables: compiled ahead of time in parallel, or on first use.

A `Program` wraps one jitted function. Each distinct call shape is a key chosen by the caller (the
runner's (bucket, rows, prompts), (window, width), ...); `compile_all` lowers every requested key in this
thread (tracing is Python) and compiles them in a thread pool (XLA compiles outside the GIL, so the
cores are used together), then calls dispatch straight to the stored executable: no re-tracing, no
jit-cache lookup. A key that was not compiled ahead of time is compiled at its first call (logged).
Compilation goes through JAX's persistent cache when it is on (`enable_compilation_cache`), so a second
process with the same model and engine options loads the executables instead of compiling them.

Invariant: a key names exactly one shape of the non-static arguments; the caller never passes two shapes
under one key.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import jax

log = logging.getLogger(__name__)

CACHE_ENV = "GPT2_ENGINE_COMPILE_CACHE"  # "0" turns the persistent cache off; a path moves it


class Program:
    def __init__(self, name: str, fn: Callable, *, static_argnums: tuple[int, ...] = (), **jit_options):
        self.name, self.static = name, static_argnums
        self._jit = jax.jit(fn, static_argnums=static_argnums, **jit_options)
        self._compiled: dict[Hashable, jax.stages.Compiled] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def lower(self, *args) -> jax.stages.Lowered:
        return self._jit.lower(*args)

    def add(self, key: Hashable, compiled: jax.stages.Compiled) -> None:
        self._compiled[key] = compiled

    def __call__(self, key: Hashable, *args):
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = self._compiled[key] = self.lower(*args).compile()
            log.info("compiled %s %s on first use in %.1fs", self.name, key, time.perf_counter() - t0)
        return exe(*(a for i, a in enumerate(args) if i not in self.static))


def compile_all(requests: Sequence[tuple[Program, Hashable, tuple]], workers: int | None = None) -> dict[str, float]:
    """Compile every (program, key, example args) not compiled yet: lowered here, compiled in parallel.
    Returns the summed compile seconds per program name (also logged)."""
    seen, unique = set(), []
    for p, k, a in requests:
        if k not in p and (id(p), k) not in seen:
            seen.add((id(p), k))
            unique.append((p, k, a))
    t0 = time.perf_counter()
    lowered = [(p, k, p.lower(*a)) for p, k, a in unique]
    lower_s = time.perf_counter() - t0
    seconds: dict[str, float] = defaultdict(float)

    def build(item):
        p, k, low = item
        start = time.perf_counter()
        exe = low.compile()
        return p, k, exe, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for p, k, exe, took in pool.map(build, lowered):
            p.add(k, exe)
            seconds[p.name] += took
    counts = defaultdict(int)
    for p, _, _ in unique:
        counts[p.name] += 1
    log.info("compiled %d programs in %.1fs (tracing %.1fs; compile seconds per class: %s)", len(unique),
             time.perf_counter() - t0, lower_s,
             ", ".join(f"{n} x{counts[n]} {s:.1f}s" for n, s in seconds.items()))
    return dict(seconds)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for this process (every program, however fast it
    compiled): in `path`, else $GPT2_ENGINE_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/gpt2-jax-engine/xla (~/.cache by default). $GPT2_ENGINE_COMPILE_CACHE=0 turns it
    off. Returns the folder in use (None: off). The setting is process-wide, as JAX's is."""
    env = os.environ.get(CACHE_ENV)
    if path is None and env in ("0", "false", "off"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = str(path or env or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(base, "gpt2-jax-engine", "xla"))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
