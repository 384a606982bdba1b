"""JAX's persistent compilation cache: turning it on for a process, telling whether it answered a compile, and
the machine code of what it answered, for the executable store (`engine.programs.ExecutableStore`).

On XLA:CPU an executable that JAX's cache answered serializes incomplete (loaded again it fails at run time:
"Function ... not found"), but the cache's own entry holds its complete machine code. So the key of each entry
the cache answers is recorded for the thread that asked (JAX compiles a program in the thread that asked for
it), and the store writes that entry's bytes. That takes JAX internals, all of them in this module; without
them a cache hit is simply not stored (the next start lowers it again, and the cache answers again).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading

import jax
from jax.experimental.compilation_cache import (
    compilation_cache as jax_compilation_cache,
)
from jax.experimental.serialize_executable import serialize

log = logging.getLogger(__name__)

CACHE_ENV = "GPT2_ENGINE_COMPILE_CACHE"  # "0" turns the persistent cache off; a path moves it
_COMPILE = threading.local()  # what JAX reported in this thread during the current `compile_fresh`


def _on_jax_event(event: str, *_, **__) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILE.backend = True
    elif event == "/jax/compilation_cache/cache_hits":
        _COMPILE.cache_hit = True


jax.monitoring.register_event_listener(_on_jax_event)
jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


# JAX internals (version-sensitive): the cache's entry reader, wrapped to record the key it answered.
try:
    from jax._src import compilation_cache as _jax_cache
    from jax._src.lib import _jax, xla_client
    from jax.experimental.serialize_executable import _JaxPjrtPickler

    _read_entry = _jax_cache.get_executable_and_time

    def _recording_read(cache_key: str, *args, **kwargs):
        result = _read_entry(cache_key, *args, **kwargs)  # returned as it is, whatever its shape
        if isinstance(result, tuple) and result and result[0] is not None:
            _COMPILE.cache_key = cache_key
        return result

    _jax_cache.get_executable_and_time = _recording_read
except (ImportError, AttributeError) as e:  # pragma: no cover - another JAX version
    _jax_cache = None
    log.info("executable store: JAX's cache entries cannot be read (%s); its hits are not stored", e)


@dataclasses.dataclass(frozen=True)
class Built:
    """A compiled program and where its machine code came from: XLA just now (`fresh`), JAX's persistent
    cache (`code`: that entry's bytes), or neither (JAX reused an executable it held in memory, which may
    itself come from that cache: not storable)."""
    compiled: jax.stages.Compiled
    fresh: bool
    code: bytes | None

    @property
    def storable(self) -> bool:
        return self.fresh or self.code is not None


def _cached_code(cache_key: str, backend) -> bytes | None:
    """The serialized executable in JAX's persistent cache under `cache_key` (None: not readable)."""
    try:
        entry = _jax_cache._get_cache(backend).get(cache_key)
        return _jax_cache.extract_executable_and_time(_jax_cache.decompress_executable(entry))[0]
    except Exception as e:  # evicted meanwhile, or the internals moved: not stored, no more
        log.info("executable store: cannot read JAX's cache entry %s (%s: %s)", cache_key, type(e).__name__, e)
        return None


def serialize_built(built: Built) -> tuple[bytes, object, object]:
    """`serialize(built.compiled)`, with the cache entry's machine code in place of the executable's own
    when JAX's cache answered (`jax.experimental.serialize_executable.deserialize_and_load` loads both)."""
    compiled, code = built.compiled, built.code
    if code is None:
        return serialize(compiled)
    unloaded = compiled._executable._unloaded_executable  # `serialize`'s own refusals, checked the same way
    if compiled._params.const_args or (getattr(unloaded, "mut", None) and unloaded.mut.in_mut):
        raise ValueError("this executable closes over constants or mutable arrays: not serializable")

    class Pickler(_JaxPjrtPickler):
        def persistent_id(self, obj):
            if isinstance(obj, (xla_client.LoadedExecutable, _jax.Executable)):
                return ("exec", code)
            return super().persistent_id(obj)

    args_info, in_tree = jax.tree_util.tree_flatten(compiled.args_info)
    with io.BytesIO() as f:
        Pickler(f).dump((unloaded, args_info, compiled._no_kwargs))
        return f.getvalue(), in_tree, compiled.out_tree


def compile_fresh(lowered: jax.stages.Lowered) -> Built:
    """`lowered.compile()`, and whether XLA compiled it just now or JAX's persistent cache answered (with
    that entry's bytes, when readable)."""
    _COMPILE.backend, _COMPILE.cache_hit, _COMPILE.cache_key = False, False, None
    compiled = lowered.compile()
    key, hit = _COMPILE.cache_key, _COMPILE.cache_hit or _COMPILE.cache_key is not None
    code = _cached_code(key, compiled.runtime_executable().client) if key and _jax_cache else None
    return Built(compiled, _COMPILE.backend and not hit, code)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for this process (every program, however fast it
    compiled): in `path`, else $GPT2_ENGINE_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/gpt2-jax-engine/xla (~/.cache by default). $GPT2_ENGINE_COMPILE_CACHE=0 turns it
    off. Returns the folder in use (None: off). The setting is process-wide, as JAX's is: a later call
    with another folder moves every later compile there."""
    env = os.environ.get(CACHE_ENV)
    if path is None and env in ("0", "false", "off"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = str(path or env or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(base, "gpt2-jax-engine", "xla"))
    before = jax.config.jax_compilation_cache_dir
    if before != folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        if before is not None:  # JAX opens its folder once, at the first compile: reopen it here
            jax_compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
