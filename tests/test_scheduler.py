"""Scheduler behaviour with no model: fake token sources drive prefill/decode bookkeeping."""
from __future__ import annotations

import dataclasses
import random

import pytest

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from engine.scheduler import DecodeBatch, PrefillBatch, Request, Scheduler, SchedulerConfig

EOS = 0


def make_config(**overrides) -> SchedulerConfig:
    base = dict(max_slots=4, max_seq_len=32, decode_steps=2, prefill_buckets=(4, 8, 16),
                prefill_batch_sizes={4: (1, 2, 4), 8: (1, 4), 16: (1,)}, decode_windows=(8, 16, 32),
                eos_token_id=EOS)
    base.update(overrides)
    return SchedulerConfig(**base)


def make_request(rid: str, prompt_len: int = 3, stream=None, **params) -> Request:
    params.setdefault("max_new_tokens", 100)
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(**params), seed=0, text_stream=stream)


def prefill_all(sched: Scheduler, token: int = 7) -> list:
    updates = []
    for batch in sched.schedule_prefills():
        updates += sched.on_prefill_tokens(batch, [token] * len(batch.rows))
    return updates


def decode_same(sched: Scheduler, token: int = 7) -> list:
    """One decode call in which every slot samples `token` at every step."""
    dec = sched.schedule_decode()
    assert dec is not None
    steps = [[token] * sched.config.max_slots for _ in range(sched.config.decode_steps)]
    return sched.on_decode_tokens(steps)


class FakeStream:
    """Decodes token t to chr(ord('a') + t % 26) and reports when `stop` appears in the text so far."""

    def __init__(self, stop: str) -> None:
        self.stop, self.text, self.pushed = stop, "", []

    def push(self, token_id: int, check_stop: bool = True) -> bool:
        self.pushed.append(token_id)
        self.text += chr(ord("a") + token_id % 26)
        return check_stop and self.stop in self.text


# -- configuration and add() ---------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_slots", 0), ("max_seq_len", 1025), ("max_seq_len", 1), ("decode_steps", 0),
    ("prefill_buckets", (8, 4)), ("prefill_buckets", ()), ("prefill_buckets", (4, 64)),
    ("prefill_batch_sizes", {4: (1, 2), 8: (1,)}), ("prefill_batch_sizes", {4: (2, 1), 8: (1,), 16: (1,)}),
    ("decode_windows", (8, 16)), ("decode_windows", (16, 8, 32)), ("eos_token_id", -1),
])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{field}"):
        make_config(**{field: value})


def test_add_rejects_empty_and_long_prompts():
    sched = Scheduler(make_config())
    with pytest.raises(ValueError, match="'e': prompt is empty"):
        sched.add(make_request("e", prompt_len=0))
    with pytest.raises(ValueError, match="prompt has 17 tokens; the limit is 16 .largest prefill bucket 16"):
        sched.add(make_request("long", prompt_len=17))
    tight = Scheduler(make_config(max_seq_len=16, prefill_buckets=(4, 16), decode_windows=(16,),
                                  prefill_batch_sizes={4: (1,), 16: (1,)}))
    with pytest.raises(ValueError, match="prompt has 16 tokens; the limit is 15 .* max_seq_len 16"):
        tight.add(make_request("ctx", prompt_len=16))
    tight.add(make_request("ok", prompt_len=15))
    assert sched.num_waiting == 0 and tight.num_waiting == 1


def test_add_rejects_live_duplicate_but_allows_reuse_after_finish():
    sched = Scheduler(make_config())
    sched.add(make_request("a", max_new_tokens=1))
    with pytest.raises(ValueError, match="'a': a request with this id is already queued or running"):
        sched.add(make_request("a"))
    [update] = prefill_all(sched)
    assert update.finished and update.request.finish_reason == "length"
    sched.add(make_request("a"))
    assert sched.num_waiting == 1


def test_add_rejects_a_started_request():
    sched = Scheduler(make_config())
    req = make_request("a")
    req.output_token_ids.append(5)
    with pytest.raises(ValueError, match="already started"):
        sched.add(req)


# -- admission, buckets, windows -----------------------------------------------------------------

def test_fifo_admission_into_lowest_free_slots():
    sched = Scheduler(make_config(max_slots=3))
    reqs = [make_request(f"r{i}", prompt_len=2) for i in range(5)]
    for r in reqs:
        sched.add(r)
    [batch] = sched.schedule_prefills()
    assert [(s, r.request_id) for s, r in batch.rows] == [(0, "r0"), (1, "r1"), (2, "r2")]
    assert sched.num_waiting == 2 and sched.live_slots == (0, 1, 2)
    sched.on_prefill_tokens(batch, [7, 7, 7])
    assert sched.abort("r1") and sched.abort("r0")
    [batch] = sched.schedule_prefills()
    assert [(s, r.request_id) for s, r in batch.rows] == [(0, "r3"), (1, "r4")]
    assert [r.arrival for _, r in batch.rows] == [3, 4]


def test_requests_admitted_together_take_slots_longest_first():
    sched = Scheduler(make_config(max_slots=4))
    for rid, prompt, new in [("a", 3, 2), ("b", 8, 20), ("c", 3, 5), ("d", 2, 20)]:
        sched.add(make_request(rid, prompt_len=prompt, max_new_tokens=new))
    sched.schedule_prefills()
    assert [sched.request_at(i).request_id for i in range(4)] == ["b", "d", "c", "a"]  # 28, 22, 8, 5


def test_continuous_batching_refills_a_freed_slot_at_once():
    sched = Scheduler(make_config(max_slots=2, decode_steps=2))
    sched.add(make_request("short", max_new_tokens=3))
    sched.add(make_request("long", max_new_tokens=50))
    sched.add(make_request("next"))
    prefill_all(sched)
    updates = decode_same(sched)
    short = next(u for u in updates if u.request.request_id == "short")
    # Admitted together, the longer request took the lower slot.
    assert short.finished and short.new_token_ids == [7, 7] and sched.live_slots == (0,)
    [batch] = sched.schedule_prefills()
    assert [(s, r.request_id) for s, r in batch.rows] == [(1, "next")]
    sched.on_prefill_tokens(batch, [9])
    assert sched.schedule_decode().slots == (0, 1)


LENGTHS = [3, 9, 4, 1, 5, 12, 2, 8, 4, 3, 6, 16]  # slots 0..11; buckets 4,16,4,4,8,16,4,8,4,4,8,16


def scheduled(sched: Scheduler) -> list:
    for i, n in enumerate(LENGTHS):
        sched.add(make_request(f"r{i}", prompt_len=n))
    batches = sched.schedule_prefills()
    for b in batches:
        assert all(r.slot == s and r.prompt_len <= b.bucket for s, r in b.rows)
        assert len(b.rows) <= b.capacity and b.size in sched.config.prefill_batch_sizes[b.bucket]
    return batches


def test_prefill_calls_longest_first_one_prompt_per_row_by_default():
    """Without prefill_prompts a call holds as many prompts as rows: the longest prompt sets each call's
    bucket, rows fill up to the bucket's largest size, then the smallest size holding them is taken."""
    batches = scheduled(Scheduler(make_config(max_slots=16)))
    got = [(b.bucket, b.size, [s for s, _ in b.rows]) for b in batches]
    assert got == [(16, 1, [11]), (16, 1, [5]), (16, 1, [1]), (8, 4, [7, 10, 4, 2]), (4, 4, [8, 0, 9, 6]),
                   (4, 1, [3])]


def test_prefill_packs_short_prompts_into_the_gaps_of_rows():
    """With room for more prompts than rows, shorter prompts go first-fit into rows that still have space.
    Each call's row length is the longest prompt's bucket or the next one up, whichever computes fewer
    tokens per prompt token once attention (quadratic in the row length) is priced in."""
    caps = {4: (2, 4, 8), 8: (2, 8), 16: (4,)}
    batches = scheduled(Scheduler(make_config(max_slots=16, prefill_prompts=caps, prefill_attention_cost=0.1)))
    got = [(b.bucket, b.size, [s for s, _ in b.rows], list(b.places)) for b in batches]
    assert got == [
        (16, 1, [11], [(0, 0)]),
        (16, 1, [5, 2], [(0, 0), (0, 12)]),  # 12 + 4 tokens fill the row
        (16, 1, [1, 10, 3], [(0, 0), (0, 9), (0, 15)]),
        # 8 + 5 + 3 tokens would fill a 16-row, but four 8-rows cost less attention for 25 prompt tokens
        (8, 4, [7, 4, 8, 0, 9, 6], [(0, 0), (1, 0), (2, 0), (1, 5), (2, 4), (3, 0)]),
    ]
    assert [b.capacity for b in batches] == [4, 4, 4, 8]
    free_attention = scheduled(Scheduler(make_config(max_slots=16, prefill_prompts=caps)))
    assert [(b.bucket, b.size, [s for s, _ in b.rows]) for b in free_attention][3:] == [
        (16, 1, [7, 4, 0]), (4, 4, [8, 9, 6])]


def test_prefill_prompts_must_cover_the_batch_sizes():
    with pytest.raises(ValueError, match="prefill_prompts"):
        make_config(prefill_prompts={4: (1, 1, 4)})
    with pytest.raises(ValueError, match="prefill_prompts"):
        make_config(prefill_prompts={4: (2, 4)})


def test_sharded_prefill_packs_each_shards_prompts_into_its_own_rows_and_prompt_indices():
    """With the slots over 2 data shards (slots 0-3 | 4-7), a round's prompts spread round-robin over the
    shards, and each call's rows and prompt indices split in halves, half d holding only shard d's slots."""
    ecfg = EngineConfig(max_slots=8, prefill_buckets=(4, 8), prefill_token_budget=16)
    config = make_config(max_slots=8, prefill_buckets=(4, 8), prefill_shards=2,
                         prefill_batch_sizes={b: ecfg.prefill_batch_sizes(b, 2) for b in (4, 8)},
                         prefill_prompts={b: tuple(ecfg.prefill_prompts(b, n, 2) for n in ecfg.prefill_batch_sizes(b, 2))
                                          for b in (4, 8)})
    assert config.prefill_batch_sizes == {4: (2, 8), 8: (2, 4)}
    sched = Scheduler(config)
    for i, n in enumerate([8, 7, 3, 2, 2]):
        sched.add(make_request(f"r{i}", prompt_len=n))
    batches = sched.schedule_prefills()
    assert sorted(r.slot for _, r in (row for b in batches for row in b.rows)) == [0, 1, 2, 4, 5]
    for b in batches:
        half_rows, half_cap = b.size // 2, b.capacity // 2
        for (slot, req), (row, offset), index in zip(b.rows, b.placement(), b.prompt_indices()):
            shard = slot // 4
            assert row // half_rows == shard and index // half_cap == shard and offset + req.prompt_len <= b.bucket
    tokens = [[100 + i for i in range(b.capacity)] for b in batches]
    updates = [u for b, t in zip(batches, tokens) for u in sched.on_prefill_tokens(b, t)]
    expected = {r.request_id: [100 + i] for b in batches for (_, r), i in zip(b.rows, b.prompt_indices())}
    assert {u.request.request_id: u.new_token_ids for u in updates} == expected


def test_admission_takes_free_slots_round_robin_over_shards():
    from engine.prefill_packing import admission_order
    assert admission_order([0, 1, 2, 3, 4, 5, 6, 7], 8, 1) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert admission_order([0, 1, 2, 3, 4, 5, 6, 7], 8, 2) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert admission_order([3, 5, 6, 7], 8, 2) == [5, 3, 6, 7]  # the emptier shard first
    with pytest.raises(ValueError, match="prefill_shards"):
        make_config(prefill_shards=3)


def test_split_prefers_the_smallest_size_that_holds_the_rest():
    sched = Scheduler(make_config(max_slots=8, prefill_batch_sizes={4: (2, 3, 8), 8: (1,), 16: (1,)}))
    for i in range(7):
        sched.add(make_request(f"r{i}"))
    assert [(b.size, len(b.rows)) for b in sched.schedule_prefills()] == [(8, 7)]
    sched = Scheduler(make_config(max_slots=8, prefill_batch_sizes={4: (2, 3), 8: (1,), 16: (1,)}))
    for i in range(7):
        sched.add(make_request(f"r{i}"))
    assert [(b.size, len(b.rows)) for b in sched.schedule_prefills()] == [(3, 3), (3, 3), (2, 1)]


def test_decode_window_covers_longest_cache_plus_k():
    sched = Scheduler(make_config(max_slots=2, decode_steps=3, max_seq_len=32, decode_windows=(8, 16, 32)))
    sched.add(make_request("a", prompt_len=4))
    prefill_all(sched)
    dec = sched.schedule_decode()  # cache 4, needs 4 + 3 = 7
    assert dec == DecodeBatch(window=8, slots=(0,), num_slots=2)
    sched.on_decode_tokens([[7, 7]] * 3)
    assert sched.cache_len(sched.request_at(0)) == 7
    dec = sched.schedule_decode()  # cache 7, needs 10
    assert dec.window == 16
    sched.on_decode_tokens([[7, 7]] * 3)
    sched.add(make_request("b", prompt_len=16))
    prefill_all(sched)
    assert sched.schedule_decode() == DecodeBatch(window=32, slots=(0, 1), num_slots=2)  # cache 16 + 3 = 19


def test_decode_window_is_capped_at_the_largest():
    sched = Scheduler(make_config(max_slots=1, decode_steps=4, max_seq_len=16, prefill_buckets=(16,),
                                  prefill_batch_sizes={16: (1,)}, decode_windows=(8, 16)))
    sched.add(make_request("a", prompt_len=14))
    prefill_all(sched)
    assert sched.schedule_decode().window == 16  # cache 14 + 4 = 18 > 16


def test_prefilled_but_unreported_slots_are_not_decoded():
    sched = Scheduler(make_config())
    sched.add(make_request("a"))
    [batch] = sched.schedule_prefills()
    assert sched.schedule_decode() is None and sched.has_work()
    sched.on_prefill_tokens(batch, [5])
    assert sched.schedule_decode().slots == (0,)


def test_decode_protocol_errors():
    sched = Scheduler(make_config())
    with pytest.raises(RuntimeError, match="no decode call in flight"):
        sched.on_decode_tokens([[1] * 4] * 2)
    sched.add(make_request("a"))
    prefill_all(sched)
    sched.schedule_decode()
    with pytest.raises(RuntimeError, match="previous decode call was not reported"):
        sched.schedule_decode()
    with pytest.raises(ValueError, match="got 1 steps of tokens; expected decode_steps=2"):
        sched.on_decode_tokens([[1] * 4])
    batch = PrefillBatch(bucket=4, size=2, rows=((3, make_request("x")),))
    with pytest.raises(ValueError, match="got 3 tokens for a batch of 1 prompts .capacity 2"):
        sched.on_prefill_tokens(batch, [1, 2, 3])


# -- finishing ------------------------------------------------------------------------------------

def run_one(request: Request, tokens: list[int], **config) -> Request:
    """Prefill `request` with tokens[0], then decode (k=1) through the rest; return it."""
    sched = Scheduler(make_config(max_slots=1, decode_steps=1, **config))
    sched.add(request)
    [batch] = sched.schedule_prefills()
    sched.on_prefill_tokens(batch, tokens[:1])
    for token in tokens[1:]:
        if sched.schedule_decode() is None:
            break
        sched.on_decode_tokens([[token]])
    assert sched.has_work() == (not request.finished)
    return request


def test_eos_stops_and_is_kept_but_not_streamed():
    stream = FakeStream(stop="zzz")
    req = run_one(make_request("a", stream=stream), [3, 4, EOS, 5])
    assert req.finish_reason == "stop" and req.output_token_ids == [3, 4, EOS]
    assert stream.pushed == [3, 4]


def test_ignore_eos_continues_past_eos():
    req = run_one(make_request("a", ignore_eos=True, max_new_tokens=4), [3, EOS, EOS, 5, 6])
    assert req.finish_reason == "length" and req.output_token_ids == [3, EOS, EOS, 5]


def test_no_eos_configured_never_stops_on_token_zero():
    req = run_one(make_request("a", max_new_tokens=3), [EOS, EOS, EOS, EOS], eos_token_id=None)
    assert req.finish_reason == "length" and req.output_token_ids == [EOS] * 3


def test_stop_token_ids_stop_and_are_kept_but_not_streamed():
    stream = FakeStream(stop="zzz")
    req = run_one(make_request("a", stream=stream, stop_token_ids=(9, 11)), [3, 4, 11, 5])
    assert req.finish_reason == "stop" and req.output_token_ids == [3, 4, 11]
    assert stream.pushed == [3, 4]


def test_text_stream_stop_string():
    stream = FakeStream(stop="cd")  # 2 -> "c", 3 -> "d"
    req = run_one(make_request("a", stream=stream), [1, 2, 3, 4])
    assert req.finish_reason == "stop" and req.output_token_ids == [1, 2, 3]
    assert stream.text == "bcd"


def test_min_tokens_holds_back_eos_stop_ids_and_stop_strings_until_reached():
    """Tokens before the min_tokens-th stop nothing (the device bans eos / stop ids then; the host does not
    rely on it); from the min_tokens-th on, eos, stop ids and stop strings stop as usual."""
    stream = FakeStream(stop="cd")  # 2 -> "c", 3 -> "d"
    req = run_one(make_request("a", stream=stream, min_tokens=4, stop_token_ids=(11,)), [2, 3, EOS, 11, 4])
    assert req.finish_reason == "stop" and req.output_token_ids == [2, 3, EOS, 11]
    assert stream.pushed == [2, 3, EOS]  # held-back tokens keep their text; the stopping stop id does not
    req = run_one(make_request("b", stream=FakeStream(stop="cd"), min_tokens=2), [2, 3, 4])
    assert req.finish_reason == "stop" and req.output_token_ids == [2, 3]  # completed by token 2: counts
    req = run_one(make_request("c", min_tokens=3), [EOS, EOS, EOS, 5])
    assert req.finish_reason == "stop" and req.output_token_ids == [EOS, EOS, EOS]
    req = run_one(make_request("d", min_tokens=3, max_new_tokens=3), [EOS, EOS, 5, 6])
    assert req.finish_reason == "length" and req.output_token_ids == [EOS, EOS, 5]


def test_max_new_tokens_gives_length():
    req = run_one(make_request("a", max_new_tokens=3), [1, 2, 3, 4, 5])
    assert req.finish_reason == "length" and req.output_token_ids == [1, 2, 3]


def test_max_new_tokens_one_finishes_at_prefill_and_frees_the_slot():
    sched = Scheduler(make_config(max_slots=1))
    sched.add(make_request("a", max_new_tokens=1))
    [update] = prefill_all(sched)
    assert update.finished and update.new_token_ids == [7] and update.request.slot is None
    assert not sched.has_work() and sched.schedule_decode() is None


def test_context_limit_gives_length():
    req = run_one(make_request("a", prompt_len=13, max_new_tokens=100), list(range(1, 10)), max_seq_len=16,
                  decode_windows=(16,))
    assert req.finish_reason == "length" and req.output_token_ids == [1, 2, 3]


def test_prompt_one_short_of_context_gets_exactly_one_token():
    sched = Scheduler(make_config(max_seq_len=16, decode_windows=(16,)))
    sched.add(make_request("a", prompt_len=15))
    [update] = prefill_all(sched)
    assert update.finished and update.request.finish_reason == "length"


def test_tokens_after_a_finish_are_discarded_with_their_extras():
    sched = Scheduler(make_config(max_slots=2, decode_steps=4))
    a, b = make_request("a", stop_token_ids=(9,)), make_request("b")
    sched.add(a)
    sched.add(b)
    for batch in sched.schedule_prefills():
        sched.on_prefill_tokens(batch, [1, 2], extras=["pa", "pb"])
    sched.schedule_decode()
    tokens = [[3, 4], [9, 5], [6, 6], [7, 7]]
    extras = [[f"s{step}:{slot}" for slot in range(2)] for step in range(4)]
    ua, ub = sched.on_decode_tokens(tokens, extras)
    assert (ua.request, ua.new_token_ids, ua.finished, ua.new_extras) == (a, [3, 9], True, ["s0:0", "s1:0"])
    assert a.output_token_ids == [1, 3, 9] and a.output_extras == ["pa", "s0:0", "s1:0"]
    assert (ub.new_token_ids, ub.finished) == ([4, 5, 6, 7], False)
    assert b.output_extras == ["pb", "s0:1", "s1:1", "s2:1", "s3:1"]
    assert sched.live_slots == (1,)


# -- abort ----------------------------------------------------------------------------------------

def test_abort_waiting_request():
    sched = Scheduler(make_config(max_slots=1))
    a, b, c = make_request("a"), make_request("b"), make_request("c")
    for r in (a, b, c):
        sched.add(r)
    prefill_all(sched)
    assert sched.abort("b") and b.finish_reason == "abort" and sched.num_waiting == 1
    assert not sched.abort("b") and not sched.abort("nope")
    sched.abort("a")
    [batch] = sched.schedule_prefills()
    assert batch.rows == ((0, c),)


def test_abort_live_request_frees_slot_and_ignores_in_flight_tokens():
    sched = Scheduler(make_config(max_slots=2))
    a, b = make_request("a"), make_request("b")
    sched.add(a)
    sched.add(b)
    prefill_all(sched, token=5)
    sched.schedule_decode()
    assert sched.abort("a") and a.finish_reason == "abort" and a.slot is None
    assert sched.live_slots == (1,)
    c = make_request("c")
    sched.add(c)
    [batch] = sched.schedule_prefills()  # c takes slot 0 while a's decode tokens are in flight
    assert batch.rows == ((0, c),)
    updates = sched.on_decode_tokens([[8, 8], [8, 8]])
    assert [u.request for u in updates] == [b] and a.output_token_ids == [5] and c.output_token_ids == []


def test_abort_during_prefill_ignores_its_first_token():
    sched = Scheduler(make_config())
    a, b = make_request("a"), make_request("b")
    sched.add(a)
    sched.add(b)
    [batch] = sched.schedule_prefills()
    sched.abort("a")
    updates = sched.on_prefill_tokens(batch, [4, 5])
    assert [u.request for u in updates] == [b] and a.output_token_ids == []


# -- randomized simulation ------------------------------------------------------------------------

@dataclasses.dataclass
class FakeRunner:
    """Token source: request r's i-th sampled token is stream[r][i]; tracks device cache lengths."""
    config: SchedulerConfig
    streams: dict[str, list[int]]
    slot_req: dict[int, Request] = dataclasses.field(default_factory=dict)
    device_len: dict[int, int] = dataclasses.field(default_factory=dict)
    sampled: dict[int, int] = dataclasses.field(default_factory=dict)

    def prefill(self, batch: PrefillBatch) -> list[int]:
        assert len(batch.rows) <= batch.capacity and batch.size in self.config.prefill_batch_sizes[batch.bucket]
        out = []
        for slot, req in batch.rows:
            assert req.prompt_len <= batch.bucket
            self.slot_req[slot], self.device_len[slot], self.sampled[slot] = req, req.prompt_len, 1
            out.append(self.streams[req.request_id][0])
        return out

    def decode(self, sched: Scheduler, dec: DecodeBatch) -> list[list[int]]:
        k = self.config.decode_steps
        tokens = [[-1] * self.config.max_slots for _ in range(k)]
        for slot in dec.slots:
            req = self.slot_req[slot]
            assert self.device_len[slot] == sched.cache_len(req)
            assert dec.window >= min(self.device_len[slot] + k, self.config.max_seq_len)
            stream, i = self.streams[req.request_id], self.sampled[slot]
            for step in range(k):
                tokens[step][slot] = stream[i + step]
            self.device_len[slot] += k
            self.sampled[slot] += k
        return tokens


def expected_output(req: Request, stream: list[int], max_seq_len: int) -> tuple[list[int], str]:
    limit = min(req.params.max_new_tokens, max_seq_len - req.prompt_len)
    for i, token in enumerate(stream[:limit]):
        if (token == EOS and not req.params.ignore_eos) or token in req.params.stop_token_ids:
            return stream[:i + 1], "stop"
    return stream[:limit], "length"


def test_randomized_simulation_every_request_finishes_once():
    rng = random.Random(1234)
    config = make_config(max_slots=5, max_seq_len=64, decode_steps=3, prefill_buckets=(8, 16, 32, 48),
                         prefill_batch_sizes={8: (1, 2, 4), 16: (1, 3), 32: (2,), 48: (1,)},
                         decode_windows=(16, 32, 64))
    sched = Scheduler(config)
    pending, streams, admitted, finished_updates = [], {}, [], {}
    for i in range(120):
        params = dict(max_new_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.2,
                      stop_token_ids=(rng.randint(1, 60),) if rng.random() < 0.3 else ())
        pending.append(make_request(f"r{i}", prompt_len=rng.randint(1, 48), **params))
        streams[f"r{i}"] = [rng.randint(0, 60) for _ in range(200)]
    runner, requests, aborted = FakeRunner(config, streams), list(pending), set()
    streamed = {r.request_id: [] for r in requests}

    def record(updates):
        for u in updates:
            streamed[u.request.request_id] += u.new_token_ids
            assert u.request.request_id not in finished_updates
            if u.finished:
                finished_updates[u.request.request_id] = u.request.finish_reason

    while pending or sched.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.03 and sched.live_slots:
            victim = sched.request_at(rng.choice(sched.live_slots))
            assert sched.abort(victim.request_id)
            aborted.add(victim.request_id)
        batches = sched.schedule_prefills()
        admitted += sorted(r.arrival for b in batches for _, r in b.rows)  # FIFO across calls
        for batch in batches:
            record(sched.on_prefill_tokens(batch, runner.prefill(batch)))
        assert sched.num_live <= config.max_slots
        dec = sched.schedule_decode()
        if dec:
            record(sched.on_decode_tokens(runner.decode(sched, dec)))

    assert admitted == sorted(admitted) and len(admitted) == len(requests)
    assert sched.num_live == 0 and sched.live_slots == () and sched.num_waiting == 0
    assert len(aborted) > 0 and {r.finish_reason for r in requests} == {"stop", "length", "abort"}
    for req in requests:
        want, reason = expected_output(req, streams[req.request_id], config.max_seq_len)
        assert streamed[req.request_id] == req.output_token_ids and req.slot is None
        if req.request_id in aborted:
            assert req.finish_reason == "abort" and req.request_id not in finished_updates
            assert req.output_token_ids == want[:len(req.output_token_ids)]
        else:
            assert (req.output_token_ids, req.finish_reason) == (want, reason)
            assert finished_updates[req.request_id] == reason
    for req in requests:  # every id is free again: nothing leaked
        sched.add(make_request(req.request_id))


def _imports(module) -> set[str]:
    import ast
    tree = ast.parse(open(module.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_scheduler_imports_only_the_standard_library_and_sampling():
    """The scheduler, its config, prefill packing and prefix reuse planning stay plain Python (no JAX, no
    NumPy, no model)."""
    import engine.prefill_packing
    import engine.prefix_cache
    import engine.prefix_plan
    import engine.scheduler
    import engine.scheduler_config
    import engine.scheduler_types
    assert _imports(engine.scheduler) <= {"__future__", "bisect", "collections", "collections.abc",
                                          "engine.prefill_packing", "engine.prefix_cache", "engine.prefix_plan",
                                          "engine.scheduler_config", "engine.scheduler_types"}
    assert _imports(engine.scheduler_types) <= {"__future__", "dataclasses", "engine.sampling"}
    assert _imports(engine.prefill_packing) <= {"__future__", "bisect", "dataclasses", "typing", "engine.scheduler"}
    assert _imports(engine.scheduler_config) <= {"__future__", "dataclasses"}
    assert _imports(engine.prefix_cache) <= {"__future__", "collections", "collections.abc"}
    assert _imports(engine.prefix_plan) <= {"__future__", "dataclasses", "typing", "engine.prefix_cache",
                                            "engine.scheduler"}


def test_decode_width_is_the_smallest_slot_count_above_the_highest_live_slot():
    sched = Scheduler(make_config(max_slots=8, decode_slot_counts=(1, 4)))
    assert sched.config.decode_slot_counts == (1, 4, 8)
    sched.add(make_request("a"))
    prefill_all(sched)
    assert sched.schedule_decode().num_slots == 1
    sched.on_decode_tokens([[7] * 8] * sched.config.decode_steps)
    for i in range(4):
        sched.add(make_request(f"b{i}"))
    prefill_all(sched)
    assert sched.schedule_decode().num_slots == 8  # slots 0..4 live
    sched.on_decode_tokens([[7] * 8] * sched.config.decode_steps)
    sched.abort("b3")
    assert sched.schedule_decode().num_slots == 4  # slots 0..3 live


def test_decode_slot_counts_are_validated():
    with pytest.raises(ValueError, match="decode_slot_counts"):
        make_config(max_slots=4, decode_slot_counts=(0, 2))


def test_compact_moves_high_live_slots_into_free_low_ones():
    sched = Scheduler(make_config(max_slots=8, decode_slot_counts=(1, 4)))
    for i in range(5):
        sched.add(make_request(f"r{i}"))
    prefill_all(sched)
    assert sched.compact() == []  # 5 live need width 8 anyway
    for rid in ("r0", "r1", "r2"):
        sched.abort(rid)
    assert sched.live_slots == (3, 4)
    assert sched.compact() == [(4, 0)]
    assert sched.live_slots == (0, 3) and sched.request_at(0).request_id == "r4"
    assert sched.request_at(0).slot == 0
    assert sched.compact() == []
    assert sched.schedule_decode().num_slots == 4


def test_compact_waits_while_requests_wait_for_a_slot():
    sched = Scheduler(make_config(max_slots=2, decode_slot_counts=(1,)))
    for i in range(3):
        sched.add(make_request(f"r{i}"))
    prefill_all(sched)
    sched.abort("r0")
    assert sched.live_slots == (1,) and sched.num_waiting == 1
    assert sched.compact() == []


def test_decode_widths_step_by_four_from_one_row_then_by_whole_groups():
    """Powers of four below the slot group (a part of a group is sliced), then whole groups times powers
    of four, then max_slots; one window, the whole context."""
    assert EngineConfig(max_slots=64).decode_widths(1, 16) == (1, 4, 16, 64)
    assert EngineConfig(max_slots=256).decode_widths(1, 4) == (1, 4, 16, 64, 256)
    assert EngineConfig(max_slots=48).decode_widths(1, 12) == (1, 4, 12, 48)
    assert EngineConfig(max_slots=8).decode_widths(1, 2) == (1, 2, 8)
    assert EngineConfig(max_slots=1).decode_widths(1, 1) == (1,)
    assert EngineConfig(max_slots=16).decode_widths(2) == (16,)  # slots over data=2: one group, no reslicing
    assert EngineConfig(max_slots=16, max_seq_len=1000).decode_windows() == (1000,)  # groups pick their blocks


def test_scoring_only_request_finishes_at_prefill_with_no_token():
    sched = Scheduler(make_config())
    score = make_request("score", max_new_tokens=0, prompt_logprobs=1)
    other = make_request("gen", max_new_tokens=2)
    sched.add(score)
    sched.add(other)
    updates = prefill_all(sched)
    done = {u.request.request_id: u for u in updates}
    assert done["score"].finished and done["score"].new_token_ids == [] and score.output_token_ids == []
    assert score.finish_reason == "length" and score.slot is None and sched.num_live == 1
    assert not done["gen"].finished and other.output_token_ids == [7]
    batch = sched.schedule_decode()
    assert batch.slots == (other.slot,)
