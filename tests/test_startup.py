"""Start-up: the default configuration's program count is pinned, warm-up compiles exactly that many
executables (in parallel), a second engine loads them from the executable store without tracing, and
dummy weights are drawn without compiling; stored programs also load in the background (`Prefetch`)."""
import collections
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import pytest

from engine import engine as engine_module
from engine import programs as programs_module
from engine.compile_cache import enable_compilation_cache
from engine.config import DEFAULT_PROGRAMS, EngineConfig, preset
from engine.engine import Engine
from engine.programs import Prefetch, compile_all
from engine.sampling import SamplingParams
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("startup"), with_tokenizer=False)
    return Engine.from_pretrained(folder)  # default EngineConfig, 1024 positions


def test_default_configuration_compiles_the_documented_number_of_programs(default_engine):
    assert default_engine.engine_config == EngineConfig(kv_slot_groups=4)  # the default count, resolved
    assert default_engine.num_programs == DEFAULT_PROGRAMS == 27
    off = EngineConfig(enable_prefix_caching=False)
    assert default_engine.engine_config.extend_buckets(128) == (32, 128) and off.extend_buckets(128) is None


def test_warmup_compiles_every_program_once_and_reports_classes(tiny_engine):
    seconds = tiny_engine.warmup()  # the shared engine may be warm already: then nothing is left to compile
    assert set(seconds) <= {"prefill", "first-token", "decode", "move", "extend", "copy"}
    assert tiny_engine.runner.num_compiled == tiny_engine.num_programs
    assert tiny_engine.warmup() == {}  # a second warm-up finds every program compiled


def _decode_hlo_chars(layers: int, scan: bool) -> int:
    """Size of the default decode program's HLO for a tiny dummy model of `layers` layers (lowered only)."""
    cfg = preset("gpt2").__class__(n_layer=layers, n_head=2, n_embd=32)
    from weights.loader import init_dummy

    graphdef, params = init_dummy(cfg, np.float32, scan_layers=scan)
    engine = Engine(cfg, graphdef, params, EngineConfig(max_slots=8, max_seq_len=256, scan_layers=scan), None)
    decode = [(p, a) for p, _, a in engine.runner.programs((16,), (256,), (8,)) if p.name == "decode"]
    program, args = decode[0]
    return len(program.lower(*args).as_text())


def test_scanned_layers_keep_programs_the_same_size_whatever_the_depth():
    """With scan_layers a program holds one layer's code: 8 layers lower to the same HLO as 2 (the loop
    over layers grows with them: 2.5x for 4x the layers), so compile time does not grow with depth."""
    assert _decode_hlo_chars(8, True) < 1.05 * _decode_hlo_chars(2, True)
    assert _decode_hlo_chars(8, False) > 2 * _decode_hlo_chars(2, False)


def test_the_attention_conds_and_cache_write_loops_trace_once_whatever_the_layers_groups_and_blocks(monkeypatch):
    """Lowering traces each per-block attention cond and each K/V write loop body once per shape, not once
    per layer, slot group and block (re-tracing them made lowering the default engine's programs ~3x slower)."""
    from engine import kv_cache, model
    from weights.loader import init_dummy

    traced = collections.Counter()

    def counted(name: str, fn: Callable) -> Callable:
        def run(*args):
            traced[name] += 1
            return fn(*args)
        return run

    for module, name in ((model, "_scores"), (model, "_values"), (kv_cache, "_put_token"), (kv_cache, "_write_run"),
                         (kv_cache, "_put_run")):
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    cfg = preset("gpt2").__class__(n_layer=3, n_head=2, n_embd=32)
    graphdef, params = init_dummy(cfg, np.float32)
    ecfg = EngineConfig(max_slots=8, max_seq_len=512, kv_slot_groups=2)  # 3 layers x 2 groups x 4 blocks
    engine = Engine(cfg, graphdef, params, ecfg, None)
    programs = {p.name: (p, a) for p, _, a in engine.runner.programs((16,), (512,), (8,))}
    for name in ("prefill", "decode"):
        program, args = programs[name]
        program.lower(*args)
    assert traced == {"_scores": 1, "_values": 1, "_put_token": 1, "_write_run": 1, "_put_run": 1}


def test_dummy_weights_compile_nothing():
    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    from weights.loader import init_dummy

    cfg = preset("gpt2").__class__(n_layer=2, n_head=4, n_embd=64)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        _, params = init_dummy(cfg, np.float32)
        again = init_dummy(cfg, np.float32)[1]
        jax.block_until_ready(params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    a, b = jax.tree.leaves(params), jax.tree.leaves(again)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # one stream per name and seed: reproducible
    assert any(float(np.std(np.asarray(x))) > 0.01 for x in a)


def _small_engine(folder, cache, **options) -> Engine:
    """A tiny engine with few programs (one bucket, 2 slots, no prefix caching) keeping them in `cache`."""
    options = {"max_slots": 2, "max_seq_len": 16, "decode_steps": 2, "prefill_buckets": (16,),
               "enable_prefix_caching": False, **options}
    return Engine.from_pretrained(folder, compile_cache=str(cache), **options)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A tiny checkpoint and one compile-cache folder shared by the store tests (the second test's first
    engine loads what the first test stored)."""
    root, before = tmp_path_factory.mktemp("store"), jax.config.jax_compilation_cache_dir
    yield make_tiny_checkpoint(root / "model", with_tokenizer=False), root / "cache"
    enable_compilation_cache(before)  # compile_cache=path moved it process-wide (None: the default folder)


@pytest.fixture
def warm_jax_cache(monkeypatch):
    """Engines made with `compile_cache=PATH` keep their executables under PATH (empty at first) but compile
    through the default JAX cache, warm from earlier runs: for the tests that need only the store to start
    empty (with xdist a module's tests may run in two processes, each with its own empty PATH); a fresh
    compile's storing is tested on its own, with an empty JAX cache."""
    real = engine_module.enable_compilation_cache

    def default_jax_cache(path=None):
        real()  # JAX's cache in its default folder
        return str(path)  # the folder the engine keeps its executables under

    monkeypatch.setattr(engine_module, "enable_compilation_cache", default_jax_cache)


def test_each_compile_cache_folder_gets_the_compiles_made_while_it_is_set(tmp_path):
    """JAX opens its cache folder once per process: a later engine with another folder must move it."""
    before = jax.config.jax_compilation_cache_dir
    try:
        for i, folder in enumerate((tmp_path / "a", tmp_path / "b")):
            enable_compilation_cache(folder)
            jax.jit(lambda x, i=i: x * (i + 2) + 1)(np.arange(3.0)).block_until_ready()
            assert any(folder.iterdir()), f"nothing compiled into {folder.name}"
    finally:
        enable_compilation_cache(before)


def test_a_program_xla_compiles_now_is_stored_and_runs_when_loaded(small_model, tmp_path):
    """JAX's cache empty (a fresh machine): the store keeps the executable's own serialization, and a
    second engine loads and runs it (the block copy and row move: a slot's move runs both)."""
    folder, _ = small_model
    jax.clear_caches()  # nor JAX's executables in memory (a program that JAX hands back is not stored)
    first = _small_engine(folder, tmp_path)  # its own JAX cache too: nothing answers there
    runner = first.runner
    moves = [(p, k, a) for p, k, a in runner.programs((16,), (16,)) if p.name in ("copy", "move")]
    assert set(compile_all(moves)) == {"copy", "move"} and any(f.is_file() for f in tmp_path.iterdir())
    assert all(p.store.has(p.name, k) for p, k, _ in moves)
    jax.clear_caches()  # the later store tests' engines compile these two, and must store them
    second = _small_engine(folder, tmp_path)
    assert all(p.load(()) for p in (second.runner._copy, second.runner._move))  # from the store
    second.runner.move([(1, 0)])  # runs the loaded machine code


@pytest.mark.parametrize("mesh", [None, "data=2,model=4"])
@pytest.mark.usefixtures("warm_jax_cache")
def test_a_second_engine_loads_every_program_from_the_executable_store(small_model, mesh):
    folder, cache = small_model
    prompts, params = [[5, 6, 7], [8, 9, 10, 11, 12]], SamplingParams(max_new_tokens=5, temperature=0.9, seed=1)
    first = _small_engine(folder, cache, mesh=mesh)
    first.warmup()
    expected = [c.token_ids for c in first.generate(prompts, params)]
    stored = first.runner._decode.store.folder
    assert len([f for f in os.listdir(stored) if f.endswith(".bin")]) == first.num_programs
    second = _small_engine(folder, cache, mesh=mesh)
    assert set(second.warmup().values()) == {0.0}  # every class loaded, none compiled
    assert (second.runner.num_compiled, second.runner.trace_count) == (second.num_programs, 0)
    assert [c.token_ids for c in second.generate(prompts, params)] == expected
    assert second.runner.trace_count == 0


def _stored_run(folder, cache, seed: int) -> tuple[Engine, Callable[[Engine], list]]:
    """A warmed-up engine (every program compiled or loaded, so stored) and a sampled run on an engine."""
    prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, temperature=0.9, seed=seed)
    first = _small_engine(folder, cache)
    first.warmup()
    return first, lambda engine: [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.usefixtures("warm_jax_cache")
def test_an_engine_starts_loading_its_stored_decode_programs_in_the_background(small_model, monkeypatch):
    first, run = _stored_run(*small_model, seed=2)
    expected = run(first)
    prefetch, gate = Prefetch(threads=1), threading.Event()
    monkeypatch.setattr(programs_module, "PREFETCH", prefetch)
    prefetch.submit(gate.wait)  # the loader waits first: what the engine queues stays pending until the gate
    queued, read = [], engine_module.load_safetensors
    monkeypatch.setattr(engine_module, "load_safetensors", lambda *a, **k: (queued.append(prefetch._queue.qsize()),
                                                                              read(*a, **k))[1])
    second = _small_engine(*small_model)
    runner = second.runner
    programs = {p.name: p for p in (runner._decode, runner._prefill, runner._copy, runner._move, runner._first)}
    pending = {(p.name, k): f for p in programs.values() for k, f in p._pending.items()}
    assert {name for name, _ in pending} == {"first-token", "decode", "copy", "move"}  # prefill: on first use
    assert queued == [len(pending)]  # every load was queued before the weights were read
    gate.set()
    assert all(f.result(timeout=60) is not None for f in pending.values())
    assert all(k in programs[name] for name, k in pending)  # each took its place among the executables
    assert not any(p._pending for p in programs.values())
    assert run(second) == expected and runner.trace_count == 0
    prefetch.stop()


def test_a_runner_takes_only_the_parameters_it_was_built_on(small_model):
    engine = _small_engine(*small_model)
    params = engine.runner.params
    with pytest.raises(ValueError, match="differ from the shapes"):
        engine.runner.bind(jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params))
    engine.runner.bind(params)


@pytest.mark.parametrize("mesh", [None, "data=2,model=2"])
def test_a_runner_built_on_shapes_keys_its_store_and_lays_out_its_state_as_one_built_on_arrays(mesh, tmp_path):
    """`from_pretrained` builds the runner before the weights: its programs' store (whose fingerprint hashes
    every parameter's and state array's sharding) must be the one a runner of the same arrays uses."""
    from engine.config import GPT2Config
    from engine.program_set import leaves
    from engine.runner import Runner
    from engine.sharding import make_mesh, param_sharding_fn
    from weights.loader import abstract_params, init_dummy
    cfg, ecfg = GPT2Config(n_layer=2, n_head=4, n_embd=64), EngineConfig(max_slots=8, max_seq_len=256)
    jmesh = make_mesh(mesh, jax.devices()[:4])
    shard = param_sharding_fn(jmesh)
    graphdef, shapes = abstract_params(cfg, np.float32, shard)
    _, params = init_dummy(cfg, np.float32, sharding_fn=shard)
    early, built = (Runner(graphdef, p, cfg, ecfg, np.float32, mesh=jmesh, executables=str(tmp_path))
                    for p in (shapes, params))
    assert early._decode.store.folder == built._decode.store.folder
    early.bind(params)
    assert leaves(early.state) == leaves(built.state) and not early.state.tokens.any()


@pytest.mark.usefixtures("warm_jax_cache")
def test_a_background_warmup_compiles_what_the_store_lacks_and_loads_the_rest_behind(small_model):
    first, run = _stored_run(*small_model, seed=4)
    expected = run(first)
    os.remove(first.runner._move.store._path("move", ()))
    jax.clear_caches()  # as in a new process: move compiles (or JAX's cache answers) and is stored again
    second = _small_engine(*small_model)
    seconds = second.warmup(background=True)
    assert seconds["move"] > 0 and {s for name, s in seconds.items() if name != "move"} == {0.0}
    assert second.runner.trace_count == 0 and os.path.exists(first.runner._move.store._path("move", ()))
    runner = second.runner
    for program in (runner._decode, runner._prefill, runner._copy, runner._move):
        for future in list(program._pending.values()):
            future.result(timeout=60)
    assert runner.num_compiled == second.num_programs
    assert run(second) == expected and runner.trace_count == 0


@pytest.mark.usefixtures("warm_jax_cache")
def test_a_lazy_engine_compiles_a_decode_program_with_its_narrower_widths_copy_and_move(small_model):
    engine = _small_engine(*small_model, decode_steps=5)  # a configuration nothing stored yet
    runner = engine.runner
    assert not runner._decode._pending and len(runner._decode) == 0
    out = engine.generate([[5, 6, 7], [8, 9, 10]], SamplingParams(max_new_tokens=3))
    assert [len(c.token_ids) for c in out] == [3, 3]  # both slots to the end: only width 2 ever ran
    assert set(runner._decode._compiled) == {(16, 2), (16, 1)} and () in runner._copy and () in runner._move


def test_prefetch_runs_loads_in_order_and_drops_the_queued_ones_when_stopped():
    prefetch, started, gate = Prefetch(), [], threading.Event()

    def load(i):
        started.append(i)
        gate.wait(10)
        return i

    futures = [prefetch.submit(functools.partial(load, i)) for i in range(3)]
    while not started:
        time.sleep(0.01)
    assert futures[2].cancel() and not futures[0].cancel()  # queued: cancellable; under way: not
    stopper = threading.Thread(target=prefetch.stop)
    stopper.start()
    while not futures[1].cancelled():  # stop drops the queued load before the running one ends
        time.sleep(0.01)
    gate.set()
    stopper.join(10)
    assert futures[0].result() == 0 and futures[1].cancelled() and started == [0]
    assert prefetch.submit(lambda: 1).cancelled()  # stopped: nothing more runs


@pytest.mark.usefixtures("warm_jax_cache")
def test_a_damaged_stored_program_is_compiled_again_and_other_configs_get_their_own(small_model, caplog):
    folder, cache = small_model
    first = _small_engine(folder, cache)
    first.warmup()
    store = first.runner._move.store
    damaged = store._path("move", ())
    with open(damaged, "wb") as f:
        f.write(b"not an executable")
    with caplog.at_level(logging.WARNING, logger="engine.programs"):
        second = _small_engine(folder, cache)
        seconds = second.warmup()
    assert seconds["prefill"] == seconds["decode"] == 0.0 and "move" in seconds  # loaded; move compiled
    assert "cannot load" in caplog.text and damaged in caplog.text
    assert second.runner.num_compiled == second.num_programs
    assert [c.finish_reason for c in second.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))] == ["length"]
    other = _small_engine(folder, cache, decode_steps=3)
    assert other.runner._decode.store.folder != store.folder
    host_only = _small_engine(folder, cache, seed=7, prefix_cache_max_blocks=2)  # the same programs
    assert host_only.runner._decode.store.folder == store.folder
    assert _small_engine(folder, cache, mesh="data=2,model=4").runner._decode.store.folder != store.folder
    plain = Engine.from_pretrained(folder, compile_cache=False, max_slots=2, max_seq_len=32)
    assert plain.runner._decode.store is None


@pytest.mark.usefixtures("warm_jax_cache")
def test_programs_answered_by_jax_persistent_cache_are_stored_whole(small_model):
    """A new engine version whose programs did not change: the store misses, JAX's cache answers every
    program, and the store is filled from that cache's entries (an executable loaded from JAX's cache
    serializes incomplete on XLA:CPU and fails at run time, in this process too: storing its own
    serialization instead fails this test's generate), so the next engine traces nothing."""
    first, run = _stored_run(*small_model, seed=3)  # stored by the tests above, or now
    expected = run(first)
    stored = first.runner._decode.store.folder
    shutil.rmtree(stored)
    jax.clear_caches()  # as in a new process: JAX holds none of these executables in memory
    again = _small_engine(*small_model)
    assert set(again.warmup().values()) != {0.0}  # lowered, answered by JAX's cache
    assert again.runner.trace_count > 0
    assert len([f for f in os.listdir(stored) if f.endswith(".bin")]) == again.num_programs
    third = _small_engine(*small_model)
    assert set(third.warmup().values()) == {0.0} and third.runner.trace_count == 0
    assert run(third) == expected
