"""Compiled programs held as executables: compiled ahead of time in parallel, or on first use.

A `Program` wraps one jitted function. Each distinct call shape is a key chosen by the caller (the runner's
(bucket, rows, prompts), (window, width), ...); `compile_all` lowers every requested key in this thread
(tracing is Python) and hands each to a thread pool as soon as it is lowered (XLA compiles outside the GIL, so
the cores compile together while the next program traces), then calls dispatch straight to the stored
executable: no re-tracing, no jit-cache lookup. A key that was not compiled ahead of time is compiled at its
first call (logged). Compilation goes through JAX's persistent cache when it is on
(`engine.compile_cache.enable_compilation_cache`). With an `ExecutableStore` (the engine keeps one next to
that cache) each compiled program is also written to disk under a fingerprint of everything that shapes it (engine source, JAX
version, XLA flags, model and engine config, devices, argument shapes and shardings), and a later process with
the same fingerprint loads it back without tracing or lowering anything (JAX's cache needs the lowered program
as its key, and tracing alone takes ~20 s for the default engine's programs on a 2-core CPU); `compile_all` loads
in a thread pool too. A program JAX's cache answered is stored with that cache entry's machine code, so a new
engine version whose programs did not change fills its store on its first start, compiling nothing.
`Program.prefetch` starts loading a stored program in the background (`Prefetch`: half the cores) before it is
needed; whoever needs it first takes it over, or waits for it when its load is under way.

Invariant: a key names exactly one shape of the non-static arguments; the caller never passes two shapes
under one key.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import queue
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import jax
from jax.experimental.serialize_executable import deserialize_and_load

from engine.compile_cache import Built, compile_fresh, serialize_built

log = logging.getLogger(__name__)


class ExecutableStore:
    """Compiled programs on disk: `folder`/`fingerprint`/name-hash(key).bin, one file per (program, key),
    written atomically. A file that cannot be read or loaded is logged and its program compiled again
    (and stored again: `compile_fresh`).
    Loading runs the stored machine code: keep the folder as private as the Python environment."""

    KEEP = 32  # fingerprint folders kept (the most recently used); older ones are removed

    def __init__(self, folder: str | os.PathLike, fingerprint: str, devices: Sequence):
        self.root, self.folder, self.devices = str(folder), os.path.join(folder, fingerprint), list(devices)
        if os.path.isdir(self.folder):
            os.utime(self.folder)  # used now: pruning goes by the folders' times

    def _path(self, name: str, key: Hashable) -> str:
        return os.path.join(self.folder, f"{name}-{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.bin")

    def has(self, name: str, key: Hashable) -> bool:
        return os.path.exists(self._path(name, key))

    def load(self, name: str, key: Hashable) -> jax.stages.Compiled | None:
        path = self._path(name, key)
        if not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return deserialize_and_load(payload, in_tree, out_tree, backend=self.devices[0].client,
                                        execution_devices=self.devices)
        except Exception as e:  # a truncated or foreign file: compile instead
            log.warning("executable store: cannot load %s (%s: %s); compiling it", path, type(e).__name__, e)
            return None

    def save(self, name: str, key: Hashable, built: Built) -> None:
        path = self._path(name, key)
        try:
            payload, in_tree, out_tree = serialize_built(built)
            if not os.path.isdir(self.folder):
                os.makedirs(self.folder, exist_ok=True)
                self._prune()
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                pickle.dump((payload, in_tree, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except Exception as e:  # a full disk or a read-only folder costs the next start a compile, no more
            log.warning("executable store: cannot write %s (%s: %s)", path, type(e).__name__, e)

    def _prune(self) -> None:
        """Remove all but the KEEP most recently used fingerprint folders (every engine version, config and
        mesh gets its own, so they pile up); a process still loading from one then compiles instead."""
        entries = [e for e in os.scandir(self.root) if e.is_dir()]
        for old in sorted(entries, key=lambda e: e.stat().st_mtime, reverse=True)[self.KEEP:]:
            shutil.rmtree(old.path, ignore_errors=True)


def fingerprint(*parts) -> str:
    """A hash of `parts` (their repr) and of what else decides the compiled code: this package's source,
    the JAX and jaxlib versions, XLA_FLAGS and the process's place among the processes."""
    h = hashlib.sha256()
    package = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    extra = (jax.__version__, importlib.metadata.version("jaxlib"), os.environ.get("XLA_FLAGS", ""),
             jax.process_index(), jax.process_count())
    h.update(repr(extra + parts).encode())
    return h.hexdigest()[:32]


class Prefetch:
    """Loads stored programs in the background in the order asked, on `threads` daemon threads (the
    process's: half the cores, so the others keep working); a program needed meanwhile is loaded by
    whoever needs it (or waited for, when its load is under way). At exit the queued loads are dropped
    and those under way finish."""

    def __init__(self, threads: int = 1):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock, self._threads, self._stopped, self.threads = threading.Lock(), [], False, threads

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                future.cancel()
                return future
            if not self._threads:
                self._threads = [threading.Thread(target=self._run, name=f"program-prefetch-{i}", daemon=True)
                                 for i in range(self.threads)]
                for thread in self._threads:
                    thread.start()
                atexit.register(self.stop)  # before JAX's own exit handlers (last registered, first run)
            self._queue.put((future, fn))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to whoever waits for it
                    future.set_exception(e)

    def stop(self) -> None:
        with self._lock:
            self._stopped, threads = True, self._threads
            while True:
                try:
                    self._queue.get_nowait()[0].cancel()
                except queue.Empty:
                    break
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            thread.join(60)  # a load stuck on a dead disk must not hold the exit for ever


PREFETCH = Prefetch(max(1, (os.cpu_count() or 2) // 2))


class Program:
    def __init__(self, name: str, fn: Callable, *, static_argnums: tuple[int, ...] = (),
                 store: ExecutableStore | None = None, **jit_options):
        self.name, self.static, self.store = name, static_argnums, store
        self._jit = jax.jit(fn, static_argnums=static_argnums, **jit_options)
        self._compiled: dict[Hashable, jax.stages.Compiled] = {}
        self._pending: dict[Hashable, concurrent.futures.Future] = {}  # background loads (`prefetch`)
        self._lock = threading.Lock()  # guards the two dicts' hand-over between loading threads

    def __contains__(self, key: Hashable) -> bool:
        return key in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def lower(self, *args) -> jax.stages.Lowered:
        return self._jit.lower(*args)

    def needs_no_compile(self, key: Hashable) -> bool:
        """Whether `key` is held, loading or in the store (a stored file that then fails to load is
        compiled on first use, logged)."""
        return key in self._compiled or key in self._pending or (
            self.store is not None and self.store.has(self.name, key))

    def prefetch(self, key: Hashable) -> None:
        """Start loading `key` from the store in the background (`PREFETCH`), if the store has it."""
        with self._lock:  # registered before the load can finish (`_fetch` removes it under this lock)
            if key not in self._compiled and key not in self._pending and self.store is not None \
                    and self.store.has(self.name, key):
                self._pending[key] = PREFETCH.submit(functools.partial(self._fetch, key))

    def _fetch(self, key: Hashable) -> jax.stages.Compiled | None:
        exe = self.store.load(self.name, key)
        with self._lock:
            if exe is not None:
                self._compiled.setdefault(key, exe)
            self._pending.pop(key, None)
        return exe

    def load(self, key: Hashable) -> bool:
        """Take `key`'s executable from the store, if it has it: a background load of it not started yet
        is done here instead, one under way is waited for (it stays registered until it ends, so nobody
        starts another)."""
        with self._lock:
            if key in self._compiled:  # a background load finished
                return True
            pending = self._pending.get(key)
            if pending is not None and pending.cancel():
                del self._pending[key]
                pending = None
        if pending is not None:
            exe = pending.result()
        else:
            exe = self.store.load(self.name, key) if self.store is not None else None
        if exe is not None:
            with self._lock:
                self._compiled.setdefault(key, exe)
        return exe is not None

    def compile(self, key: Hashable, lowered: jax.stages.Lowered) -> None:
        """Compile `key` from its lowered program and store it when its machine code is known
        (`compile_fresh`)."""
        built = compile_fresh(lowered)
        self._compiled[key] = built.compiled
        if self.store is not None and built.storable:
            self.store.save(self.name, key, built)

    def __call__(self, key: Hashable, *args):
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            if self.load(key):
                log.info("loaded %s %s on first use in %.1fs", self.name, key, time.perf_counter() - t0)
            else:
                self.compile(key, self.lower(*args))
                log.info("compiled %s %s on first use in %.1fs", self.name, key, time.perf_counter() - t0)
            exe = self._compiled[key]
        return exe(*(a for i, a in enumerate(args) if i not in self.static))


def _load_all(wanted: list, workers: int | None) -> tuple[dict[str, float], list]:
    """Take what the stores hold of `wanted` (program, key, args), loading in a thread pool (loading links
    each program's machine code: ~1.4 s a program for gpt2, and it runs in parallel). Returns the loads'
    seconds per name (0) and what is left to compile, in order."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        hits = list(pool.map(lambda r: r[0].load(r[1]), wanted))  # False without a store
    seconds = defaultdict(float, {p.name: 0.0 for (p, _, _), hit in zip(wanted, hits) if hit})
    if any(hits):
        log.info("loaded %d programs from the executable store in %.1fs", sum(hits), time.perf_counter() - t0)
    return seconds, [r for r, hit in zip(wanted, hits) if not hit]


def compile_all(requests: Sequence[tuple[Program, Hashable, tuple]], workers: int | None = None) -> dict[str, float]:
    """Compile every (program, key, example args) not compiled yet: taken from the program's store when it
    has it, else lowered here and handed to a thread pool as soon as it is lowered (tracing the next one
    overlaps compiling the last), then stored. List the slowest programs first: the pool then ends on
    short ones. Returns the summed compile seconds per program name (loads count as 0; both logged)."""
    seen, wanted = set(), []
    for p, k, a in requests:
        if k not in p and (id(p), k) not in seen:
            seen.add((id(p), k))
            wanted.append((p, k, a))
    seconds, unique = _load_all(wanted, workers)

    def build(p: Program, k: Hashable, low: jax.stages.Lowered) -> float:
        start = time.perf_counter()
        p.compile(k, low)
        return time.perf_counter() - start

    t0, lower_s, futures = time.perf_counter(), 0.0, []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        try:
            for p, k, a in unique:
                start = time.perf_counter()
                low = p.lower(*a)
                lower_s += time.perf_counter() - start
                futures.append((p, pool.submit(build, p, k, low)))
        except BaseException:
            for _, f in futures:
                f.cancel()
            raise
        for p, f in futures:
            seconds[p.name] += f.result()
    counts = defaultdict(int)
    for p, _, _ in unique:
        counts[p.name] += 1
    if unique:
        log.info("compiled %d programs in %.1fs (tracing %.1fs, overlapped; compile seconds per class: %s)",
                 len(unique), time.perf_counter() - t0, lower_s,
                 ", ".join(f"{n} x{counts[n]} {s:.1f}s" for n, s in seconds.items() if counts[n]))
    return dict(seconds)
