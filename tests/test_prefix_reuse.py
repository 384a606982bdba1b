"""Prefix reuse never changes results: n > 1 forks and prefix-cache hits against the same engine with
`enable_prefix_caching=False`, on one device and on a sharded mesh, and nothing compiles after warm-up."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from engine import Engine, SamplingParams
from engine.config import GPT2Config
from engine.kv_cache import KVCache, Runs
from engine.kv_copy import copy_blocks
from engine.requests import derive_seed
from engine.program_set import copy_targets
from engine.sharding import make_mesh
from tests.checkpoints import make_tiny_checkpoint
from tests.test_sharding import assert_same_logprobs

# Blocks of 128 positions: a 256-position context leaves room for prompts with one cached block.
OPTS = dict(max_slots=4, max_seq_len=256, decode_steps=4, prefill_buckets=(32,), prefill_token_budget=256)
RNG = np.random.default_rng(0)
PREFIX = RNG.integers(0, 1000, 150).tolist()
# Suffixes of 1..90 tokens (both extend buckets), two identical prompts (a fork), one unrelated prompt.
PROMPTS = [PREFIX + RNG.integers(0, 1000, k).tolist() for k in (5, 17, 40, 90, 1)] + [PREFIX[:140]] * 2 + [
    RNG.integers(0, 1000, 60).tolist()]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("prefix_gpt2"), seed=0, with_tokenizer=False)


@pytest.fixture(scope="module")
def engines(tiny_model):
    on = Engine.from_pretrained(tiny_model, **OPTS)
    off = Engine.from_pretrained(tiny_model, enable_prefix_caching=False, **OPTS)
    on.warmup(score=True)
    return on, off


def greedy_run(engine: Engine, prompts=PROMPTS):
    return engine.generate(prompts, GREEDY)


def assert_same(got, want) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for g, w in zip(got, want):
        assert_same_logprobs(g.logprobs, w.logprobs)


def test_greedy_tokens_and_logprobs_match_caching_off_and_nothing_compiles(engines):
    on, off = engines
    traces = on.runner.trace_count
    want = greedy_run(off)
    first = greedy_run(on)  # prefix blocks reused from live slots (a round later) and forked
    again = greedy_run(on)  # from the free slots the first run left (in place or copied)
    assert_same(first, want)
    assert_same(again, want)
    queried, hit, blocks = on.scheduler.prefix_stats
    assert hit >= 128 * 9 and blocks >= 1 and queried >= 2 * sum(len(p) for p in PROMPTS)
    assert on.runner.trace_count == traces
    assert on.num_programs == off.num_programs + 2  # extend 32 and 128


def test_prompt_logprobs_requests_match_caching_off(engines):
    on, off = engines
    greedy_run(on)  # the prefix is cached
    params = [SamplingParams(max_new_tokens=3, temperature=0.0, prompt_logprobs=2)] * 2 + [GREEDY]
    prompts = PROMPTS[:2] + PROMPTS[2:3]
    got, want = on.generate(prompts, params), off.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for g, w in zip(got[:2], want[:2]):
        assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(w.prompt_logprobs)
        assert_same_logprobs(g.prompt_logprobs[1:], w.prompt_logprobs[1:])


def test_min_tokens_bans_through_extend_and_fork(engines):
    """Each prompt bans its own first two greedy tokens (stop ids) for 5 tokens: extended, forked and
    cached prompts carry their ban rows as a plain prefill does."""
    on, off = engines
    free = greedy_run(off)
    params = [dataclasses.replace(GREEDY, min_tokens=5, stop_token_ids=tuple(c.token_ids[:2])) for c in free]
    traces = on.runner.trace_count
    on.generate(PROMPTS, GREEDY)  # the prefix is cached
    got, want = on.generate(PROMPTS, params), off.generate(PROMPTS, params)
    assert_same(got, want)
    assert all(c.token_ids[0] != f.token_ids[0] for c, f in zip(want, free))  # the ban changed every request
    assert on.runner.trace_count == traces


@pytest.mark.parametrize("prompt,penalty", [(PREFIX[:40], 1.3), (PREFIX[:40], 1.0), (PREFIX + PREFIX[:20], 1.3),
                                            (PREFIX + PREFIX[:20], 1.0)])
def test_n_samples_fork_one_prefill_and_match_separate_requests(engines, prompt, penalty):
    """Forked (or, with a cached block and no penalty, extended) samples == the same seeds one by one."""
    on, off = engines
    greedy_run(on)  # PREFIX's first block is cached
    params = SamplingParams(n=4, max_new_tokens=8, temperature=1.0, seed=11, repetition_penalty=penalty, logprobs=1)
    reused = on.scheduler.prefix_stats[1]
    forked = on.generate([prompt], params)
    assert on.scheduler.prefix_stats[1] - reused >= 3 * min(len(prompt), 128)  # forked or cached
    plain = off.generate([prompt], params)
    separate = [off.generate([prompt], dataclasses.replace(params, n=1, seed=derive_seed(11, i)))[0] for i in range(4)]
    assert [c.token_ids for c in forked] == [c.token_ids for c in plain] == [c.token_ids for c in separate]
    assert len({tuple(c.token_ids) for c in forked}) > 1  # the samples diverge
    for g, w in zip(forked, separate):
        assert_same_logprobs(g.logprobs, w.logprobs)


def test_budget_zero_keeps_no_free_blocks_and_changes_nothing(tiny_model, engines):
    _, off = engines
    engine = Engine.from_pretrained(tiny_model, prefix_cache_max_blocks=0, **OPTS)
    assert_same(greedy_run(engine), greedy_run(off))
    assert engine.scheduler.prefix_stats[2] == 0  # every request finished: nothing cached in free slots


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_engine_with_caching_matches_unsharded_without(tiny_model, engines, scan):
    """Also with `scan_layers` (one cache slab of every layer): extend, block copies and forks read and
    write every layer of it."""
    _, off = engines
    mesh = make_mesh("data=2,model=2", jax.devices()[:4])
    engine = Engine.from_pretrained(tiny_model, mesh=mesh, scan_layers=scan, **OPTS)
    want = greedy_run(off)
    assert_same(greedy_run(engine), want)
    assert_same(greedy_run(engine), want)
    assert engine.scheduler.prefix_stats[1] > 0


def random_cache(groups: int, stacked: bool) -> KVCache:
    """4 slots of 384 positions (3 blocks of 128), 2 layers, random K/V."""
    cache = KVCache.create(GPT2Config(n_layer=2, n_head=2, n_embd=8), 4, 384, groups=groups, stacked=stacked)
    leaves, tree = jax.tree.flatten(cache)
    return jax.tree.unflatten(tree, [jax.random.normal(jax.random.key(i), a.shape).astype(a.dtype)
                                     for i, a in enumerate(leaves)])


def slots(c: KVCache) -> np.ndarray:
    """[kv, layer, slot, head, position, dim], whatever the slabs."""
    return np.stack([np.concatenate([np.concatenate([np.concatenate(g, axis=3) for g in slab], axis=1)
                                     for slab in side]) for side in (c.k, c.v)])


@pytest.mark.parametrize("groups,stacked", [(1, False), (2, False), (2, True)])
def test_runs_write_their_slots_from_their_start_and_nothing_else(groups, stacked):
    """Runs across blocks, two in one row, one from a later block (extend), a dropped slot and a run past
    `count`: each written run fills its slot from its start with its tokens (what follows in its last
    block is stale by contract)."""
    cache = random_cache(groups, stacked)
    k, v = (jax.random.normal(jax.random.key(9 + i), (2, 2, 300, 4)) for i in range(2))  # [B, H, T, K]
    # (row, column, slot, length, start): 200 tokens over 2 blocks; 30 after them in row 0, written from
    # position 128; slot 4 is out of range; the last run is past count.
    runs = np.array([(0, 0, 2, 200, 0), (0, 200, 1, 30, 128), (1, 0, 4, 50, 0), (1, 5, 3, 290, 0)], np.int32).T
    before = slots(cache)
    want = before.copy()
    write = jax.jit(KVCache.write_runs, static_argnums=(1, 5))
    for layer in range(2):
        cache = write(cache, layer, Runs(*runs, count=np.int32(3)), k, v, 384)
        for row, column, slot, length, start in runs.T[:2]:
            for side, x in enumerate((k, v)):
                want[side, layer, slot, :, start: start + length] = np.asarray(x)[row, :, column: column + length]
    got = slots(cache)
    for slot, end in ((2, 200), (1, 158)):  # stale past the run: the rest of its last block
        got[:, :, slot, :, end: -(-end // 128) * 128] = want[:, :, slot, :, end: -(-end // 128) * 128]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("groups,stacked", [(1, False), (2, False), (2, True)])
def test_write_puts_each_rows_tokens_in_its_slot_and_drops_positions_past_the_limit(groups, stacked, tokens):
    """Decode (one token a row: update slices) and extend over `data` (several: scatters): row b's
    tokens go to slot b at their positions, in any block; one past the window or the cache is dropped."""
    cache = random_cache(groups, stacked)
    k, v = (jax.random.normal(jax.random.key(20 + i), (4, 2, tokens, 4)) for i in range(2))  # [B, H, T, K]
    first = np.array([127, 0, 382, 256], np.int32)  # across a block edge, the first, the last, a block's first
    positions = first[:, None] + np.arange(tokens, dtype=np.int32)
    limit = 256 if tokens == 1 else 384  # decode: a window of 2 blocks; extend: the whole cache
    want = slots(cache)
    write = jax.jit(KVCache.write, static_argnums=(1, 5))
    for layer in range(2):
        cache = write(cache, layer, positions, k, v, limit)
        for b, t in np.ndindex(positions.shape):
            if positions[b, t] < limit:
                for side, x in enumerate((k, v)):
                    want[side, layer, b, :, positions[b, t]] = np.asarray(x)[b, :, t]
    np.testing.assert_array_equal(slots(cache), want)


@pytest.mark.parametrize("groups,stacked", [(1, False), (2, False), (2, True)])
def test_one_copy_call_fills_every_destination_of_a_source_and_nothing_else(groups, stacked):
    cache = random_cache(groups, stacked)
    before = slots(cache)
    out = jax.jit(copy_blocks)(cache, np.int32(1), *copy_targets([(3, 2), (0, 3)], 4))
    want = before.copy()
    want[:, :, 3, :, :256], want[:, :, 0] = before[:, :, 1, :, :256], before[:, :, 1]
    np.testing.assert_array_equal(slots(out), want)
    np.testing.assert_array_equal(out.lengths, cache.lengths)
