"""Start-up: the default configuration's program count is pinned, warm-up compiles exactly that many
executables (in parallel), and dummy weights are drawn without compiling."""
import jax
import numpy as np
import pytest

from engine.config import DEFAULT_PROGRAMS, EngineConfig, preset
from engine.engine import Engine
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("startup"), with_tokenizer=False)
    return Engine.from_pretrained(folder)  # default EngineConfig, 1024 positions


def test_default_configuration_compiles_the_documented_number_of_programs(default_engine):
    assert default_engine.engine_config == EngineConfig()
    assert default_engine.num_programs == DEFAULT_PROGRAMS == 23
    off = EngineConfig(enable_prefix_caching=False)
    assert default_engine.engine_config.extend_buckets(128) == (32, 128) and off.extend_buckets(128) is None


def test_warmup_compiles_every_program_once_and_reports_classes(tiny_engine):
    seconds = tiny_engine.warmup()  # the shared engine may be warm already: then nothing is left to compile
    assert set(seconds) <= {"prefill", "decode", "move", "extend", "copy"}
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
    over layers holds 4x the code), so compile time does not grow with depth."""
    assert _decode_hlo_chars(8, True) < 1.05 * _decode_hlo_chars(2, True)
    assert _decode_hlo_chars(8, False) > 3 * _decode_hlo_chars(2, False)


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
