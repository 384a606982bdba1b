"""Sharding: the rules table, mesh parsing/validation, and sharded engines == the unsharded engine.

Runs on 8 fake CPU devices (tests/conftest.py). The model is tiny (n_head=4) so that every mesh shape
below is valid; each mesh compiles its own programs, so generation is kept to one short batch.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from engine import Engine, SamplingParams
from engine.config import EngineConfig, GPT2Config, preset
from engine.device_state import first_rows, first_width
from engine.model import param_axes
from engine.programs import compile_all
from engine.sampling import MAX_LOGPROBS
from engine.sharding import RULES, check_mesh, make_mesh, parse_mesh, partition_spec
from tests.checkpoints import make_tiny_checkpoint, run_aborting

ENGINE_OPTS = dict(max_slots=8, max_seq_len=32, decode_steps=2, prefill_buckets=(16,))
PROMPTS = ["Hello world", "The quick brown fox", "a b c d e f g", "JAX is"]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, repetition_penalty=1.3)
SAMPLED = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, seed=7)
# Logprobs for the last prompt only: with slots split over `data`, one shard computes them, the other not.
LOGPROBS = [SamplingParams(max_new_tokens=3, temperature=0.0)] * 3 + [
    SamplingParams(max_new_tokens=3, temperature=0.0, logprobs=3)]
MESHES = [(2, 1), (1, 2), (2, 2), (2, 4), (8, 1)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"), seed=0)


def run(engine: Engine) -> dict:
    return {"logits": engine.logits(engine.tokenizer.encode("Hello there, how are you today?")),
            "greedy": [c.token_ids for c in engine.generate(PROMPTS, GREEDY)],
            "sampled": [c.token_ids for c in engine.generate(PROMPTS, SAMPLED)],
            "logprobs": engine.generate(PROMPTS, LOGPROBS)[-1].logprobs}


def assert_same_logprobs(got, want) -> None:
    assert [(e.token_id, [i for i, _ in e.top]) for e in got] == [(e.token_id, [i for i, _ in e.top]) for e in want]
    np.testing.assert_allclose([[e.logprob] + [v for _, v in e.top] for e in got],
                               [[e.logprob] + [v for _, v in e.top] for e in want], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def reference(tiny_model) -> tuple[Engine, dict]:
    engine = Engine.from_pretrained(tiny_model, **ENGINE_OPTS)
    return engine, run(engine)


def mesh_of(data: int, model: int):
    return make_mesh(f"data={data},model={model}", jax.devices()[: data * model])


def assert_rules_applied(engine: Engine) -> None:
    """Every array's actual spec is what the rules table says (and a few spelled out by hand)."""
    for path, var in nnx.to_flat_state(engine.runner.params):
        name = ".".join(map(str, path))
        assert var[...].sharding.spec == partition_spec(param_axes(name)), name
    params, state = engine.runner.params, engine.runner.state
    assert params["wte"]["weight"].sharding.spec == P("model", None)
    h, lead = (params["h"], (None,)) if engine.runner.stacked else (params["h"][1], ())  # stacked: [L, ...]
    assert h["attn"]["c_attn"]["weight"].sharding.spec == P(*lead, None, None, "model", None)
    assert h["attn"]["c_proj"]["weight"].sharding.spec == P(*lead, "model", None, None)
    assert h["mlp"]["c_fc"]["weight"].sharding.spec == P(*lead, None, "model")
    assert h["mlp"]["c_proj"]["weight"].sharding.spec == P(*lead, "model", None)
    assert params["ln_f"]["weight"].sharding.spec == P(None)
    blocks = jax.tree.leaves((state.cache.k, state.cache.v))
    assert all(b.sharding.spec == P(None, "data", "model", None, None) for b in blocks)  # [layers, slots, ...]
    assert state.cache.lengths.sharding.spec == P("data")
    assert state.tokens.sharding.spec == P("data") and state.params.temperature.sharding.spec == P("data")
    assert state.keys.sharding.spec == P("data", None)
    assert state.seen.sharding.spec == P("data", None) and state.counts.sharding.spec == P("data", None)


def test_rules_table_maps_tensor_parallel_axes_to_model_and_slots_to_data():
    assert {k for k, v in RULES.items() if v == "model"} == {"vocab", "heads", "mlp"}
    assert {k for k, v in RULES.items() if v == "data"} == {"slots"}
    assert partition_spec(("embed", None, "heads", "head_dim")) == P(None, None, "model", None)


def test_two_dims_on_one_mesh_axis_is_rejected():
    with pytest.raises(ValueError, match=r"two dimensions onto one mesh axis.*'model', 'model'"):
        partition_spec(("heads", "mlp"))
    with pytest.raises(ValueError, match="logical axis 'experts' is not in engine.sharding.RULES"):
        partition_spec(("experts",))


def test_parse_mesh_strings():
    assert parse_mesh("data=2,model=4", 8) == (2, 4)
    assert parse_mesh("model=4", 8) == (2, 4)  # the left-out axis takes the remaining devices
    assert parse_mesh("data=-1, model=2", 8) == (4, 2)
    for bad in ("data=2;model=4", "tensor=2", "data=2,data=4", "data=0,model=8", "", "data=-1"):
        with pytest.raises(ValueError, match="mesh"):
            parse_mesh(bad, 8)


def test_device_count_mismatch_says_how_many_devices_there_are():
    with pytest.raises(ValueError, match=r"'data=2,model=2' needs 4 devices .* there are 8 cpu devices"):
        make_mesh("data=2,model=2")
    with pytest.raises(ValueError, match=r"'model=3': there are 8 devices, which do not split into model=3"):
        make_mesh("model=3")
    mesh = make_mesh("data=2,model=4")
    assert dict(mesh.shape) == {"data": 2, "model": 4} and mesh.devices.size == 8
    assert make_mesh(None).devices.size == 1 and make_mesh(mesh) is mesh


@pytest.mark.parametrize("cfg,bad,works,good", [
    (preset("gpt2"), 8, "1, 2, 3, 4, 6, 12", 6), (preset("gpt2-xl"), 2, "1, 5, 25", 5),
    (GPT2Config(n_layer=2, n_head=4, n_embd=64), 8, "1, 2, 4", 4)])
def test_model_axis_must_divide_the_heads(cfg, bad, works, good):
    message = rf"mesh model={bad} cannot split .*n_head={cfg.n_head}.*sizes that work: {works}$"
    with pytest.raises(ValueError, match=message):
        check_mesh(mesh_of(1, bad), cfg, max_slots=8)
    check_mesh(mesh_of(1, good), cfg, max_slots=8)  # the padded vocab splits too (xl: 51200 = 5 x 10240)


def test_data_axis_must_divide_max_slots():
    message = r"mesh data=8 must divide max_slots=12: use max_slots=16 .*\[1, 2, 3, 4, 6, 12\]"
    with pytest.raises(ValueError, match=message):
        check_mesh(mesh_of(8, 1), preset("gpt2"), max_slots=12)


def test_engine_rejects_a_bad_mesh_before_loading(tiny_model):
    with pytest.raises(ValueError, match=r"model=8 cannot split.*sizes that work: 1, 2, 4"):
        Engine.from_pretrained(tiny_model, mesh="data=1,model=8", **ENGINE_OPTS)
    with pytest.raises(ValueError, match=r"data=8 must divide max_slots=4"):
        Engine.from_pretrained(tiny_model, mesh="data=8,model=1", **{**ENGINE_OPTS, "max_slots": 4})
    with pytest.raises(ValueError, match="there are 8"):
        Engine.from_pretrained(tiny_model, mesh="data=3,model=2", **ENGINE_OPTS)
    with pytest.raises(ValueError, match=r"model=8 cannot split.*1, 2, 3, 4, 6, 12"):  # gpt2 size: fails fast
        Engine.from_pretrained("gpt2", load_format="dummy", mesh="data=1,model=8")


def test_default_engine_is_one_device_with_the_same_layout(reference):
    engine, _ = reference
    assert dict(engine.mesh.shape) == {"data": 1, "model": 1} and engine.mesh.devices.size == 1
    assert engine.engine_config.mesh is None
    assert_rules_applied(engine)


def test_first_token_rows_pad_each_data_shards_prompts_to_a_power_of_four():
    assert [first_width(p, 16) for p in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    assert first_width(3, 2) == 2  # never more rows than the shard's slots
    assert first_rows(3, 1, 16).tolist() == [0, 1, 2]
    assert first_rows(4, 2, 8).tolist() == [0, 1, 4, 5]  # 2 prompts a shard, each shard's part 4 rows
    assert first_rows(8, 8, 8).tolist() == list(range(8))


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_engine_matches_unsharded(tiny_model, reference, data, model):
    _, expected = reference
    engine = Engine.from_pretrained(tiny_model, mesh=mesh_of(data, model), **ENGINE_OPTS)
    assert engine.engine_config.mesh == f"data={data},model={model}"
    assert_rules_applied(engine)
    k = engine.runner.state.cache.k[0][0][0]  # layer 0's slab, slot group 0, block 0
    groups = 4 if data == 1 else 1  # slot groups only when the slots are not split over devices
    assert len(engine.runner.state.cache.k[0]) == groups
    assert k.addressable_shards[0].data.shape == (1, 8 // data // groups, 4 // model, 32, 16)
    got = run(engine)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=0, atol=1e-4)
    assert got["greedy"] == expected["greedy"]
    assert got["sampled"] == expected["sampled"]
    assert len(expected["logprobs"]) == 3
    assert_same_logprobs(got["logprobs"], expected["logprobs"])
    traces = engine.runner.trace_count
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == expected["greedy"]
    assert engine.runner.trace_count == traces  # the donated state came back in the same shardings
    assert_rules_applied(engine)


@pytest.mark.parametrize("data,model", [(1, 1)])
def test_scan_layers_engine_matches_the_per_layer_engine(tiny_model, reference, data, model):
    """`scan_layers`: stacked parameters and one cache slab of every layer (4 slot groups here), the same
    results (sharded meshes: tests/test_prefix_reuse.py runs it on data=2,model=2 with prefix caching)."""
    _, expected = reference
    engine = Engine.from_pretrained(tiny_model, mesh=mesh_of(data, model), scan_layers=True, **ENGINE_OPTS)
    assert engine.runner.stacked and engine.engine_config.scan_layers
    cache = engine.runner.state.cache
    assert len(cache.k) == 1 and cache.k[0][0][0].shape[0] == 2  # one slab holding both layers
    assert_rules_applied(engine)
    got = run(engine)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=0, atol=1e-4)
    assert got["greedy"] == expected["greedy"] and got["sampled"] == expected["sampled"]
    assert_same_logprobs(got["logprobs"], expected["logprobs"])


def test_one_slot_group_engine_matches_the_default(tiny_model, reference, caplog):
    """`kv_slot_groups=1`: the cache holds every slot in one group (the default here: 4), which every decode
    reads as far as its longest slot; the results are the same."""
    _, expected = reference
    assert len(reference[0].runner.state.cache.k[0]) == 4
    with caplog.at_level(logging.INFO, logger="engine.engine"):
        engine = Engine.from_pretrained(tiny_model, kv_slot_groups=1, **ENGINE_OPTS)
    assert "KV cache: 8 slots x 32 positions x 2 layers in 1 slot group(s), float32" in caplog.text
    assert engine.runner.groups == 1 and len(engine.runner.state.cache.k[0]) == 1
    assert (engine.engine_config.kv_slot_groups, reference[0].engine_config.kv_slot_groups) == (1, 4)
    got = run(engine)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=0, atol=1e-4)
    assert got["greedy"] == expected["greedy"] and got["sampled"] == expected["sampled"]
    assert_same_logprobs(got["logprobs"], expected["logprobs"])


def test_one_slot_group_reads_as_far_as_its_longest_slot(tiny_model):
    """Two cache blocks per slot: a 140-token prompt beside short ones. With 4 groups only its group reads
    the second block; with one group every slot does, masked: the same tokens and logprobs."""
    options = dict(ENGINE_OPTS, max_seq_len=160, enable_prefix_caching=False)
    prompts = [list(range(100, 240)), [5, 6, 7], [9] * 10, [300, 301], [7] * 20]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=2)
    out = {g: Engine.from_pretrained(tiny_model, kv_slot_groups=g, **options).generate(prompts, params)
           for g in (1, 4)}
    assert [c.token_ids for c in out[1]] == [c.token_ids for c in out[4]]
    for one, four in zip(out[1], out[4]):
        assert_same_logprobs(one.logprobs, four.logprobs)


@pytest.mark.parametrize("groups, mesh, match", [
    (3, None, "kv_slot_groups: expected None or an int from 1 to 8 dividing max_slots=8, got 3"),
    (0, None, "kv_slot_groups: expected None or an int from 1 to 8 dividing max_slots=8, got 0"),
    (2, "data=2,model=4", "kv_slot_groups=2: with the slots split over data=2 the KV cache has one slot group")])
def test_a_bad_slot_group_count_is_refused_before_any_weight_is_read(tiny_model, monkeypatch, groups, mesh, match):
    monkeypatch.setattr("engine.engine.load_safetensors", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=re.escape(match)):
        Engine.from_pretrained(tiny_model, mesh=mesh, kv_slot_groups=groups, **ENGINE_OPTS)
    with pytest.raises(ValueError, match="kv_slot_groups: expected None or an int from 1 to 8 dividing max_slots=16"):
        EngineConfig(max_slots=16, kv_slot_groups=16)


def test_data_sharded_decode_runs_every_slot_and_moves_rows_across_shards(tiny_model, reference, monkeypatch):
    """With slots split over `data`, every decode call runs all slots (a narrower one would reslice the
    sharded cache), so aborting six of the eight requests moves nothing and the two others give the
    unsharded engine's tokens. The row move itself still copies a slot across shards exactly."""
    prompts = [[11 * i + 3] * (i + 2) for i in range(8)]
    aborted = SamplingParams(max_new_tokens=40, temperature=0.0)
    tail = [SamplingParams(max_new_tokens=12, temperature=0.0),
            SamplingParams(max_new_tokens=12, temperature=0.9, seed=5)]
    expected = [c.token_ids for c in reference[0].generate(prompts[6:], tail)]
    engine = Engine.from_pretrained(tiny_model, mesh=mesh_of(2, 4), **ENGINE_OPTS)
    assert engine.scheduler.config.decode_slot_counts == (ENGINE_OPTS["max_slots"],)
    moves, real_move = [], engine.runner.move
    monkeypatch.setattr(engine.runner, "move", lambda m: (moves.append(list(m)), real_move(m)))
    reqs = run_aborting(engine, prompts, [aborted] * 6 + tail, aborted=range(6))
    assert [r.output_token_ids for r in reqs[6:]] == expected
    assert moves == []
    real_move([(7, 1)])  # slot 7 (data shard 1) -> slot 1 (data shard 0)
    cache = engine.runner.state.cache
    assert int(cache.lengths[1]) == int(cache.lengths[7]) > 0
    for blocks in (cache.k[0][0], cache.v[1][0]):
        np.testing.assert_array_equal(np.asarray(blocks[0][:, 1]), np.asarray(blocks[0][:, 7]))


def _collective_shapes(compiled) -> list[tuple[int, ...]]:
    """Result shapes of every cross-device op in a compiled program's HLO."""
    ops = re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                     r"(?:-start)?\(", compiled.as_text())
    return [tuple(int(d) for d in dims.split(",") if d) for dims in ops]


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_data_axis_splits_prefill_and_decode_work_with_no_kv_across_devices(tiny_model):
    """On data=8 each device prefills only its own slots' rows: a call of 8 rows costs each device about
    1/8 of what it costs one device (cost_analysis FLOPs are per device), and neither prefill nor decode
    moves K/V, logits or activations between devices: prefill has no collective at all (its logits stay on
    their shard for the first-token program), and the only collectives gather the sampled ids and
    logprobs [W], [W, N] (the first-token program after prefill) and [k, S], [k, S, N] (decode)."""
    opts = dict(ENGINE_OPTS, prefill_token_budget=8 * 16)
    one = Engine.from_pretrained(tiny_model, **opts)
    eight = Engine.from_pretrained(tiny_model, mesh=mesh_of(8, 1), **opts)
    key = (8, 16, 8)  # 8 rows of 16 tokens, 8 prompts
    for engine, names in ((one, {"prefill"}), (eight, {"prefill", "decode", "first-token"})):  # the compared
        sc = engine.scheduler.config
        compile_all([(p, k, a) for p, k, a in engine.runner.programs(sc.prefill_buckets, sc.decode_windows,
                                                                      sc.decode_slot_counts)
                     if p.name in names and (p.name != "prefill" or k == key)])
    assert key in one.runner._prefill and key in eight.runner._prefill
    ratio = _flops(one.runner._prefill._compiled[key]) / _flops(eight.runner._prefill._compiled[key])
    assert 7 <= ratio <= 8.5, ratio
    slots, steps, top = opts["max_slots"], opts["decode_steps"], MAX_LOGPROBS
    assert _collective_shapes(eight.runner._prefill._compiled[key]) == []
    (first,) = eight.runner._first._compiled.values()  # width 8: one row per shard
    assert _collective_shapes(first) and set(_collective_shapes(first)) <= {(8,), (8, top)}, _collective_shapes(first)
    (decode,) = eight.runner._decode._compiled.values()
    assert set(_collective_shapes(decode)) <= {(steps, slots), (steps, slots, top)}, _collective_shapes(decode)
