"""Prefix reuse bookkeeping with no model: the block index, and the scheduler's rounds with forks, hits,
deferrals and slot accounting (blocks of 4 positions so that prompts stay short)."""
from __future__ import annotations

import pytest

from engine.prefill_packing import PrefillBatch
from engine.prefix_cache import BlockIndex
from engine.prefix_plan import ExtendBatch
from engine.scheduler import Scheduler
from tests.test_scheduler import make_config, make_request

BLOCK = 4


def reuse_config(**overrides):
    base = dict(prefix_caching=True, block=BLOCK, extend_buckets=(4,), max_slots=4, max_seq_len=32,
                prefill_buckets=(4, 8, 16), prefill_batch_sizes={4: (1, 2, 4), 8: (1, 4), 16: (1, 2)})
    base.update(overrides)
    return make_config(**base)


def req(rid: str, tokens: list[int], **params):
    r = make_request(rid, 1, **params)
    r.prompt_token_ids = list(tokens)
    return r


def run_round(sched: Scheduler, token: int = 7) -> list:
    batches = sched.schedule_prefills()
    for batch in batches:
        sched.on_prefill_tokens(batch, [token] * len(batch.rows))
    return batches


# -- the block index -------------------------------------------------------------------------------

def test_blocks_are_keyed_by_their_whole_prefix():
    index = BlockIndex(BLOCK)
    index.hold(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # two full blocks, the 9 is not indexed
    assert index.cached_blocks == 2
    assert len(index.match([1, 2, 3, 4, 5, 6, 7, 8, 0], 5)) == 2
    assert len(index.match([1, 2, 3, 4, 5, 6, 7, 0], 5)) == 1
    assert index.match([0, 2, 3, 4, 5, 6, 7, 8], 5) == []  # same second block, other parent: no match
    assert len(index.match([1, 2, 3, 4, 5, 6, 7, 8], 1)) == 1  # at most `limit`


def test_truncate_copy_and_last_holder_frees_the_block():
    index = BlockIndex(BLOCK)
    index.hold(0, list(range(12)))
    index.copy(0, 3)
    assert index.holders(index.match(list(range(12)), 3)[-1]) == {0, 3}
    index.truncate(0, 1)
    index.truncate(3, 2)
    assert len(index.match(list(range(12)), 3)) == 2 and index.cached_blocks == 2
    index.claim(3)
    assert len(index.match(list(range(12)), 3)) == 1
    index.claim(0)
    assert index.cached_blocks == 0 and index.match(list(range(12)), 3) == []


def test_budget_forgets_least_recently_released_free_slots():
    index = BlockIndex(BLOCK, max_blocks=4)
    for slot in range(3):
        index.hold(slot, [slot] * 8)  # two blocks each
    index.release(1)
    index.release(0)
    assert index.cached_blocks == 6  # live slot 2's blocks never count
    index.release(2)  # 6 blocks free > 4: slot 1, released first, is forgotten
    assert index.match([1] * 8, 2) == [] and len(index.match([0] * 8, 2)) == 2 and index.cached_blocks == 4


# -- rounds ----------------------------------------------------------------------------------------

PREFIX = list(range(100, 108))  # two blocks


def test_a_prompt_sharing_blocks_with_one_prefilled_this_round_waits_then_hits():
    sched = Scheduler(reuse_config())
    for i in range(3):
        sched.add(req(f"r{i}", PREFIX + [i, i + 1]))
    (batch,) = run_round(sched)
    assert isinstance(batch, PrefillBatch) and [r.request_id for _, r in batch.rows] == ["r0"]
    assert sched.num_waiting == 2 and sched.prefix_stats == (10, 0, 2)
    (ext,) = run_round(sched)
    assert isinstance(ext, ExtendBatch) and ext.bucket == 4 and ext.starts == (8, 8)
    assert ext.copies == ((0, 1, 2), (0, 2, 2))  # from the live request's slot
    assert [s for s, _ in ext.rows] == [1, 2] and sched.prefix_stats == (30, 16, 2)


def test_a_hit_reuses_a_free_holder_in_place():
    sched = Scheduler(reuse_config())
    sched.add(req("a", PREFIX + [1], max_new_tokens=1))
    run_round(sched)  # finishes at its prefill: slot 0 is free and holds the two blocks
    sched.add(req("b", [5, 6, 7]))
    sched.add(req("c", PREFIX + [2, 3]))
    sched.add(req("d", PREFIX + [4, 5]))
    batches = run_round(sched)
    ext = batches[0]  # first: its copies read slots that the round's prefill calls may overwrite
    assert isinstance(ext, ExtendBatch) and all(isinstance(b, PrefillBatch) for b in batches[1:])
    assert [(s, r.request_id) for s, r in ext.rows] == [(0, "c"), (2, "d")] and ext.starts == (8, 8)
    assert ext.copies == ((0, 2, 2),)  # d copies c's blocks before c's extend overwrites anything
    assert sched.request_at(1).request_id == "b"


def test_identical_prompts_fork_one_prefill():
    sched = Scheduler(reuse_config())
    for i in range(3):
        sched.add(req(f"s{i}", [9, 8, 7, 6, 5]))
    (batch,) = sched.schedule_prefills()
    assert len(batch.rows) == 3 and len(set(batch.placement())) == 1
    assert batch.forks == ((0, 1, 2), (0, 2, 2))
    assert sched.prefix_stats[:2] == (15, 10)


def test_prompt_logprobs_and_repetition_penalty_opt_out():
    sched = Scheduler(reuse_config())
    sched.add(req("a", PREFIX + [1]))
    run_round(sched)
    sched.add(req("score", PREFIX + [1], prompt_logprobs=0))
    sched.add(req("score2", PREFIX + [1], prompt_logprobs=0))
    sched.add(req("pen", PREFIX + [2], repetition_penalty=1.5))
    batches = run_round(sched)
    assert all(isinstance(b, PrefillBatch) and b.forks == () for b in batches)
    assert sum(len(b.rows) for b in batches) == 3 and sched.prefix_stats[1] == 0


def test_extend_only_when_it_computes_less_than_the_prompts():
    sched = Scheduler(reuse_config(max_slots=8, extend_buckets=(4,)))
    sched.add(req("a", PREFIX + [1]))
    run_round(sched)
    sched.add(req("b", PREFIX + [2]))  # 9 tokens from scratch < 8 slots x 4: prefilled, no hit
    assert all(isinstance(b, PrefillBatch) for b in run_round(sched))


def test_a_failed_request_forgets_its_blocks():
    sched = Scheduler(reuse_config())
    sched.add(req("a", PREFIX + [1]))
    run_round(sched)
    assert sched.prefix_stats[2] == 2
    sched.fail(sched.request_at(0), "boom")
    assert sched.prefix_stats[2] == 0


def test_compaction_moves_blocks_with_the_request_and_the_free_source_keeps_them():
    sched = Scheduler(reuse_config(max_slots=4, decode_slot_counts=(1, 4)))
    sched.add(req("z", list(range(50, 59)), max_new_tokens=20))  # longer: slot 0
    sched.add(req("y", PREFIX + [3], max_new_tokens=10))
    run_round(sched)
    assert sched.request_at(1).request_id == "y"
    sched.abort("z")
    assert sched.compact() == [(1, 0)]
    index = sched._prefix
    assert index.holders(index.match(PREFIX + [3], 2)[-1]) == {0, 1}
    sched.fail(sched.request_at(0), "boom")
    assert index.holders(index.match(PREFIX + [3], 2)[-1]) == {1}


@pytest.mark.parametrize("n", [2, 5])
def test_fork_group_larger_than_the_call_capacity_is_split(n):
    sched = Scheduler(reuse_config(prefill_batch_sizes={4: (1,), 8: (1,), 16: (1,)}, max_slots=8))
    for i in range(n):
        sched.add(req(f"s{i}", [1, 2, 3]))
    batches = sched.schedule_prefills()
    assert sum(len(b.rows) for b in batches) == n
    assert {s for b in batches for s, _ in b.rows} == set(range(n))


def test_prompts_sharing_nothing_get_the_same_device_calls_with_caching_on_and_off():
    """W1-W3 style traffic (no shared prefix) costs the same with caching on: every prefill, move and
    decode call is the one the engine makes with it off (the only extra work is host bookkeeping)."""
    import random

    rng = random.Random(1)  # a seed whose tail of requests makes compaction move one
    lengths = [(rng.randint(1, 16), rng.randint(1, 10)) for _ in range(12)]
    prompts = [[rng.randrange(1000, 50000) for _ in range(n)] for n, _ in lengths]

    def calls(on: bool) -> list:
        sched = Scheduler(reuse_config(prefix_caching=on, max_slots=4, decode_slot_counts=(2, 4)))
        for i, (prompt, (_, out)) in enumerate(zip(prompts, lengths)):
            sched.add(req(str(i), prompt, max_new_tokens=out))
        made = []
        while sched.has_work():
            made += [(type(b).__name__, b.bucket, b.size, b.capacity, b.forks) for b in run_round(sched)]
            made.append(("moves", tuple(sched.compact())))
            decode = sched.schedule_decode()
            if decode is not None:
                made.append(("decode", decode, decode.reach))
                sched.on_decode_tokens([[7] * 4 for _ in range(sched.config.decode_steps)])
        return made

    on, off = calls(True), calls(False)
    assert on == off and any(c[0] == "moves" and c[1] for c in on)  # compaction moves included
