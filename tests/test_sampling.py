"""Sampling: parameter validation, HF-identical processors, seeded on-device draws, no recompilation."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine import processors
from engine.processors import argmax_rows, process_logits, sample, top_logprobs
from engine.sampling import MinTokensBan, SamplingParams, SlotParams, broadcast_params, seed_key_data, slot_params

PAD = 4  # trailing padded vocab entries, -inf like the engine's padded logits
process = jax.jit(process_logits)
draw = jax.jit(sample)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, scale, (rows, vocab)).astype(np.float32)
    logits[:, vocab - PAD:] = -np.inf
    return logits


def history(rows: int, vocab: int, seed: int = 1) -> np.ndarray:
    """Token ids i64[rows, 12]: 8 'prompt' then 4 'generated' tokens per row (real vocab only)."""
    return np.random.default_rng(seed).integers(0, vocab - PAD, (rows, 12))


def seen_counts(ids: np.ndarray, vocab: int, generated_from: int = 8) -> tuple[np.ndarray, np.ndarray]:
    seen = np.zeros((len(ids), vocab), bool)
    counts = np.zeros((len(ids), vocab), np.int32)
    for r, row in enumerate(ids):
        seen[r, row] = True
        np.add.at(counts[r], row[generated_from:], 1)
    return seen, counts


def run(logits: np.ndarray, params: list[SamplingParams], ids: np.ndarray | None = None) -> np.ndarray:
    seen, counts = seen_counts(ids, logits.shape[1]) if ids is not None else seen_counts(
        np.zeros((len(logits), 0), int), logits.shape[1])
    return np.asarray(process(logits, slot_params(params), seen, counts))


def hf_rows(logits: np.ndarray, make, values, ids: np.ndarray | None = None) -> np.ndarray:
    """HF processor `make(value)` applied row by row (value None -> row unchanged)."""
    out = []
    for r, value in enumerate(values):
        row = torch.from_numpy(logits[r:r + 1].copy())
        row_ids = torch.from_numpy(ids[r:r + 1]) if ids is not None else torch.zeros((1, 0), dtype=torch.long)
        out.append(row if value is None else make(value)(row_ids, row))
    return torch.cat(out).numpy()


def assert_same_scores(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("n", 0), ("logprobs", 21),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    ("max_new_tokens", 0), ("seed", -1), ("seed", 2**64), ("stop", ("",)), ("stop_token_ids", (-1,)),
    ("ignore_eos", 1), ("top_k", 2.0), ("temperature", float("nan")), ("min_tokens", -1), ("min_tokens", 17),
    ("min_tokens", 2.0), ("min_tokens", True), ("min_tokens", "3"), ("min_tokens", 2**70),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}:"):
        SamplingParams(**{field: value})


def test_min_tokens_is_bounded_by_max_new_tokens():
    assert SamplingParams(max_new_tokens=5, min_tokens=5).min_tokens == 5
    with pytest.raises(ValueError, match=r"SamplingParams.min_tokens: expected an int in \[0, 4\].* got 5"):
        SamplingParams(max_new_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="SamplingParams.min_tokens: .* got an int of 16610 bits"):
        SamplingParams(max_new_tokens=2**63 - 1, min_tokens=10**5000)
    with pytest.raises(ValueError, match="SamplingParams.min_tokens"):  # scoring only generates nothing
        SamplingParams(max_new_tokens=0, prompt_logprobs=0, min_tokens=1)
    big = slot_params([SamplingParams(max_new_tokens=2**62, min_tokens=2**61)])
    assert big.min_tokens.dtype == np.int32 and big.min_tokens[0] == 2**31 - 1


def test_min_tokens_ban_rows_set_eos_and_stop_ids():
    ban = MinTokensBan(vocab=96, eos=95)
    rows = ban.rows([SamplingParams(min_tokens=2, stop_token_ids=(0, 33, 33, 96, 2**31 - 1)),
                     SamplingParams(stop_token_ids=(5,)), None, SamplingParams(min_tokens=1, ignore_eos=True)])
    assert rows.shape == (4, 3) and rows.dtype == np.uint32
    bits = np.unpackbits(rows.view(np.uint8), bitorder="little").reshape(4, 96)
    assert [np.flatnonzero(b).tolist() for b in bits] == [[0, 33, 95], [], [], [95]]  # eos even with ignore_eos
    assert MinTokensBan(vocab=100, eos=None).words == 4


def test_min_tokens_matches_hf_min_new_tokens():
    """Rows that generated fewer than min_tokens tokens get -inf at eos and their stop ids (HF's
    MinNewTokensLengthLogitsProcessor with eos_token_id = that set); the others pass through; the ban
    comes before the warpers (a banned top-1 leaves top_k=2 the next two)."""
    vocab, eos = 64, 60
    logits = random_logits(4, vocab, seed=3)
    logits[:, eos] = 50.0
    params = [SamplingParams(min_tokens=3, stop_token_ids=(7,)), SamplingParams(min_tokens=3),
              SamplingParams(min_tokens=2, temperature=0.5, top_k=2), SamplingParams()]
    steps = np.array([2, 3, 0, 0], np.int32)
    banned = MinTokensBan(vocab, eos).rows(params)
    seen, counts = seen_counts(np.zeros((4, 0), int), vocab)
    ours = np.asarray(jax.jit(process_logits)(logits, slot_params(params), seen, counts, steps, banned))
    expected = []
    for r, (p, done) in enumerate(zip(params, steps)):
        row = torch.from_numpy(logits[r:r + 1].copy())
        ids = torch.zeros((1, 5 + int(done)), dtype=torch.long)
        row = MinNewTokensLengthLogitsProcessor(5, p.min_tokens, [eos, *p.stop_token_ids])(ids, row)
        if p.top_k:
            row = TopKLogitsWarper(p.top_k)(ids, TemperatureLogitsWarper(p.temperature)(ids, row))
        expected.append(row.numpy()[0])
    assert_same_scores(ours, np.stack(expected))
    assert np.isneginf(ours[0, [7, eos]]).all() and np.isfinite(ours[1, eos]) and np.isneginf(ours[2, eos])
    assert np.isfinite(ours[2]).sum() == 2


def test_valid_params_and_broadcast():
    p = SamplingParams(temperature=0.0, stop="x", top_p=1.0, logprobs=20, seed=2**64 - 1)
    assert p.greedy and p.stop == ("x",)
    assert broadcast_params(p, 3) == [p] * 3
    with pytest.raises(ValueError, match="params"):
        broadcast_params([p, p], 3)


def test_slot_params_arrays():
    sp = slot_params([SamplingParams(top_k=2**40, temperature=0.5), SamplingParams()])
    assert all(a.shape == (2,) for a in sp)
    assert sp.top_k.dtype == np.int32 and sp.top_k[0] == 2**31 - 1
    assert sp.temperature.dtype == np.float32 and sp.temperature[0] == 0.5
    assert slot_params([]).top_p.shape == (0,)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1])
def test_seed_key_data_small_seeds(seed):
    np.testing.assert_array_equal(seed_key_data(seed), jax.random.key_data(jax.random.PRNGKey(seed)))


def test_seed_key_data_64_bit_seeds():
    for seed in [2**32 + 5, 2**40 + 3, 2**63 - 1]:
        with jax.enable_x64(True):
            expected = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))
        np.testing.assert_array_equal(seed_key_data(seed), expected)
    assert seed_key_data(2**64 - 1).tolist() == [2**32 - 1] * 2
    with pytest.raises(ValueError, match="seed"):
        seed_key_data(2**64)


def test_repetition_penalty_matches_hf():
    logits, ids = random_logits(4, 64), history(4, 64)
    penalties = [1.0, 1.3, 0.7, 2.0]
    ours = run(logits, [SamplingParams(repetition_penalty=x) for x in penalties], ids)
    assert_same_scores(ours, hf_rows(logits, RepetitionPenaltyLogitsProcessor, penalties, ids))
    prompt_only = sorted(set(ids[3, :8]) - set(ids[3, 8:]))  # prompt tokens are penalised too
    assert prompt_only and (ours[3, prompt_only] != logits[3, prompt_only]).all()


def test_presence_and_frequency_penalties():
    logits, ids = random_logits(3, 64), history(3, 64)
    seen, counts = seen_counts(ids, 64)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(),
              SamplingParams(presence_penalty=-1.0, temperature=0.0)]
    expected = logits.copy()
    expected[0] -= 0.5 * (counts[0] > 0) + 0.25 * counts[0]
    expected[2] += 1.0 * (counts[2] > 0)
    assert_same_scores(run(logits, params, ids), expected)


def test_temperature_matches_hf_and_greedy_rows_pass_through():
    logits = random_logits(4, 64)
    temps = [0.5, 1.0, 2.0, 0.0]
    ours = run(logits, [SamplingParams(temperature=t, top_k=3) if t == 0 else SamplingParams(temperature=t)
                        for t in temps])
    ref = hf_rows(logits, TemperatureLogitsWarper, [t or None for t in temps])
    assert_same_scores(ours, ref)


def test_top_k_matches_hf():
    logits = random_logits(5, 64)
    ks = [1, 3, 10, 0, 500]
    ours = run(logits, [SamplingParams(top_k=k) for k in ks])
    assert_same_scores(ours, hf_rows(logits, TopKLogitsWarper, [k if 0 < k < 64 else None for k in ks]))
    assert (np.isfinite(ours).sum(1) == [1, 3, 10, 60, 60]).all()


def test_top_k_keeps_ties_at_kth_value():
    logits = np.array([[5.0, 4.0, 4.0, 1.0, 4.0, 0.0, -np.inf, -np.inf]], np.float32)
    ours = run(logits, [SamplingParams(top_k=2)])
    assert_same_scores(ours, hf_rows(logits, TopKLogitsWarper, [2]))
    assert np.isfinite(ours[0]).tolist() == [True, True, True, False, True, False, False, False]


def test_top_p_matches_hf():
    logits = random_logits(5, 64, scale=1.5)
    ps = [0.1, 0.5, 0.9, 0.999, 1.0]
    ours = run(logits, [SamplingParams(top_p=p) for p in ps])
    assert_same_scores(ours, hf_rows(logits, TopPLogitsWarper, ps[:-1] + [None]))
    assert len(set(np.isfinite(ours).sum(1))) > 3


def test_min_p_matches_hf():
    logits = random_logits(5, 64, scale=1.5)
    ms = [0.0, 0.05, 0.2, 0.7, 1.0]
    ours = run(logits, [SamplingParams(min_p=m) for m in ms])
    assert_same_scores(ours, hf_rows(logits, MinPLogitsWarper, [None] + ms[1:]))
    assert np.isfinite(ours[4]).sum() == 1


def hf_chain(logits: np.ndarray, ids: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    """HF generate's order per row; presence/frequency (no HF class) right after the repetition penalty."""
    _, counts = seen_counts(ids, logits.shape[1])
    rows = []
    for r, p in enumerate(params):
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.from_numpy(ids[r:r + 1]),
                                                                   torch.from_numpy(logits[r:r + 1].copy()))
        penalty = p.presence_penalty * (counts[r:r + 1] > 0) + p.frequency_penalty * counts[r:r + 1]
        x = x - torch.from_numpy(penalty).float()
        if not p.greedy:
            warpers = [TemperatureLogitsWarper(p.temperature)]
            warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
            warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
            warpers += [MinPLogitsWarper(p.min_p)] if p.min_p > 0 else []
            for w in warpers:
                x = w(None, x)
        rows.append(x.float())
    return torch.cat(rows).numpy()


def test_composed_chain_matches_hf_order():
    vocab = 1000
    logits, ids = random_logits(8, vocab, seed=3), history(8, vocab, seed=4)
    params = [
        SamplingParams(repetition_penalty=1.2, temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, top_k=5, frequency_penalty=0.5),
        SamplingParams(temperature=0.5, top_k=20, min_p=0.1, presence_penalty=1.0),
        SamplingParams(),
        SamplingParams(temperature=2.0, top_k=200, top_p=0.95, repetition_penalty=0.8),
        SamplingParams(temperature=0.7, min_p=0.02, frequency_penalty=-0.5),
        SamplingParams(top_k=1, top_p=0.5),
    ]
    assert_same_scores(run(logits, params, ids), hf_chain(logits, ids, params))


CAP = processors._CANDIDATES  # the fast path looks for cutoffs among this many largest scores per row


def test_fast_path_on_peaked_rows_matches_hf():
    vocab = 4096
    logits, ids = random_logits(6, vocab, seed=10, scale=6.0), history(6, vocab)
    params = [SamplingParams(top_k=k, top_p=p, min_p=m)
              for k, p, m in [(1, 1.0, 0), (5, 1.0, 0), (40, 0.9, 0), (0, 0.5, 0), (0, 0.9, 0.01), (CAP, 0.95, 0)]]
    ours = run(logits, params, ids)
    assert_same_scores(ours, hf_chain(logits, ids, params))
    kept = np.isfinite(ours).sum(1)
    assert kept.max() < CAP and kept[:2].tolist() == [1, 5] and len(set(kept)) > 3  # cutoffs within the cap


def test_cutoffs_beyond_the_candidates_match_hf():
    vocab = 2000
    logits, ids = random_logits(8, vocab, seed=11, scale=0.3), history(8, vocab)  # flat: no cutoff within CAP
    params = [SamplingParams(top_k=1000), SamplingParams(top_k=vocab - PAD - 1), SamplingParams(top_p=0.999),
              SamplingParams(top_p=0.5, temperature=0.7), SamplingParams(top_k=1500, top_p=0.9, min_p=0.5),
              SamplingParams(top_k=3), SamplingParams(temperature=0.0, top_k=1000), SamplingParams()]
    ours = run(logits, params, ids)
    assert_same_scores(ours, hf_chain(logits, ids, params))
    kept = np.isfinite(ours).sum(1)
    assert kept[:4].min() > CAP and kept[[0, 1, 5]].tolist() == [1000, vocab - PAD - 1, 3]  # (row 4: min-p)
    np.testing.assert_array_equal(ours[6:], logits[6:])  # greedy and default rows are untouched


def test_top_k_ties_beyond_the_candidates_match_hf():
    vocab = 2000
    logits = np.random.default_rng(12).integers(0, 5, (4, vocab)).astype(np.float32)  # ~400 copies per value
    logits[:, vocab - PAD:] = -np.inf
    ks = [10, CAP, CAP + 1, 500]
    ours = run(logits, [SamplingParams(top_k=k) for k in ks])
    assert_same_scores(ours, hf_rows(logits, TopKLogitsWarper, ks))
    top_ties = (logits == 4).sum(1)
    assert top_ties.min() > CAP  # the k-th value's ties run past the candidates
    np.testing.assert_array_equal(np.isfinite(ours).sum(1), [*top_ties[:3], (logits[3] >= 3).sum()])


def test_top_p_keeps_or_drops_whole_tie_groups():
    """HF's choice inside a tie group depends on its sort; ours keeps a group iff the mass above it < top_p."""
    vocab = 2000
    logits = np.random.default_rng(13).integers(0, 5, (3, vocab)).astype(np.float32)
    logits[:, vocab - PAD:] = -np.inf
    top_ps = [0.3, 0.5, 0.7]  # fast path (the top CAP hold ~0.4), then the bisection twice
    ours = run(logits, [SamplingParams(top_p=p) for p in top_ps])
    for row, kept, top_p in zip(logits, np.isfinite(ours), top_ps):
        probs = np.exp(row.astype(np.float64) - 4)
        probs /= probs.sum()
        above = np.array([probs[row > v].sum() for v in range(5)])
        assert np.abs(above - top_p).min() > 0.01  # far from the boundary: rounding cannot decide
        expected = np.isin(row, [v for v in range(5) if above[v] < top_p])
        np.testing.assert_array_equal(kept, expected)


def test_bisection_agrees_with_the_fast_path(monkeypatch):
    vocab = 1000
    logits, ids = random_logits(6, vocab, seed=14, scale=4.0), history(6, vocab)
    params = [SamplingParams(top_k=30), SamplingParams(top_p=0.8), SamplingParams(top_k=200, top_p=0.95),
              SamplingParams(top_p=0.6, min_p=0.02, temperature=1.5), SamplingParams(top_k=1), SamplingParams()]
    fast = run(logits, params, ids)
    monkeypatch.setattr(processors, "_CANDIDATES", 1)  # every cutoff but top_k=1 now lies beyond the cap
    seen, counts = seen_counts(ids, vocab)
    deep = np.asarray(jax.jit(lambda *a: process_logits(*a))(logits, slot_params(params), seen, counts))
    np.testing.assert_array_equal(deep, fast)
    assert_same_scores(fast, hf_chain(logits, ids, params))


def test_order_keys_and_kth_largest_match_numpy():
    big = np.finfo(np.float32).max
    values = np.array([-np.inf, -big, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, big, np.inf], np.float32)
    keys = np.asarray(processors._order_key(values)).astype(np.int64)
    assert (np.diff(keys) >= 0).all() and (np.diff(keys)[np.diff(values) > 0] > 0).all()
    assert keys[4] == keys[5]  # -0.0 == 0.0
    np.testing.assert_array_equal(processors._from_key(keys.astype(np.uint32)), values)
    rows = np.random.default_rng(15).normal(0, 2, (4, 300)).round(1).astype(np.float32)  # many ties
    rows[1, :50] = -np.inf
    rows[2] = -rows[2]
    ks = np.array([1, 7, 280, 300], np.int32)
    expected = -np.sort(-rows, axis=1)[np.arange(4), ks - 1]
    np.testing.assert_array_equal(jax.jit(processors._kth_largest)(rows, ks), expected)


def test_defaults_leave_logits_unchanged():
    logits = random_logits(3, 64)
    np.testing.assert_array_equal(run(logits, [SamplingParams()] * 3), logits)


def keys(seeds: list[int]) -> np.ndarray:
    return np.stack([seed_key_data(s) for s in seeds])


def test_draws_follow_the_processed_distribution():
    vocab, n = 16 + PAD, 20_000
    logits = random_logits(1, vocab, seed=5, scale=1.0)
    scores = np.asarray(run(logits, [SamplingParams(top_k=5, temperature=0.7)]))[0]
    expected = np.asarray(jax.nn.softmax(scores))
    tokens = np.asarray(draw(np.tile(scores, (n, 1)), keys([42] * n), np.arange(n, dtype=np.int32),
                             np.zeros(n, bool)))
    freq = np.bincount(tokens, minlength=vocab) / n
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert (np.abs(freq - expected) <= 4 * sigma + 1e-9).all(), (freq, expected)
    assert (freq[~np.isfinite(scores)] == 0).all() and np.isfinite(scores).sum() == 5


def test_same_key_and_step_same_token_whatever_the_batch():
    scores = random_logits(6, 64, seed=6, scale=0.5)
    key_data, steps, greedy = keys([7, 8, 9, 7, 10, 11]), np.array([3, 5, 11, 4, 0, 2], np.int32), np.zeros(6, bool)
    batch = np.asarray(draw(scores, key_data, steps, greedy))
    order = np.array([5, 2, 0, 4, 1, 3])
    permuted = np.asarray(draw(scores[order], key_data[order], steps[order], greedy[order]))
    np.testing.assert_array_equal(permuted, batch[order])
    for r in range(6):
        alone = draw(scores[r:r + 1], key_data[r:r + 1], steps[r:r + 1], greedy[r:r + 1])
        assert int(alone[0]) == batch[r]
    mates = random_logits(6, 64, seed=99)
    mates[2] = scores[2]
    assert int(draw(mates, keys([1, 2, 9, 4, 5, 6]), steps, greedy)[2]) == batch[2]


def test_seed_and_step_drive_the_draws():
    scores = np.zeros((64, 32), np.float32)
    greedy = np.zeros(64, bool)
    a = np.asarray(draw(scores, keys([1] * 64), np.arange(64, dtype=np.int32), greedy))
    b = np.asarray(draw(scores, keys([2] * 64), np.arange(64, dtype=np.int32), greedy))
    assert len(set(a.tolist())) > 10 and (a != b).any()


def test_top_k_one_equals_greedy_and_ties_take_lowest_id():
    logits, ids = random_logits(4, 64, seed=7), history(4, 64)
    topk1 = run(logits, [SamplingParams(top_k=1, repetition_penalty=1.3)] * 4, ids)
    greedy = run(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.3)] * 4, ids)
    sampled = draw(topk1, keys([1, 2, 3, 4]), np.zeros(4, np.int32), np.zeros(4, bool))
    argmax = draw(greedy, keys([1, 2, 3, 4]), np.zeros(4, np.int32), np.ones(4, bool))
    np.testing.assert_array_equal(sampled, argmax)
    np.testing.assert_array_equal(argmax, greedy.argmax(1))
    tied = np.array([[1.0, 3.0, 3.0, 2.0]], np.float32)
    assert int(draw(tied, keys([0]), np.zeros(1, np.int32), np.ones(1, bool))[0]) == 1


def test_top_logprobs_are_of_the_raw_model_distribution():
    logits = random_logits(3, 64, seed=8)
    tokens = np.array([0, 5, 17], np.int32)
    out = jax.jit(top_logprobs, static_argnums=2)(logits, tokens, 4)
    ref = torch.log_softmax(torch.from_numpy(logits), -1)
    values, ids = torch.topk(ref, 4)
    np.testing.assert_allclose(out.token_logprob, ref[np.arange(3), tokens], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, ids.numpy())
    np.testing.assert_allclose(out.top_logprobs, values.numpy(), rtol=1e-5, atol=1e-5)
    assert top_logprobs(logits, tokens, 0).top_ids.shape == (3, 0)


def test_new_parameter_values_never_recompile():
    traces = []

    @jax.jit
    def step(logits, p: SlotParams, seen, counts, key_data, steps, banned):
        traces.append(1)
        return sample(process_logits(logits, p, seen, counts, steps, banned), key_data, steps, p.temperature == 0)

    logits, ids = random_logits(4, 64), history(4, 64)
    seen, counts = seen_counts(ids, 64)
    variants = [
        [SamplingParams()] * 4,
        [SamplingParams(temperature=0.0)] * 4,
        [SamplingParams(top_k=3, temperature=0.5), SamplingParams(top_p=0.8), SamplingParams(min_p=0.1),
         SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0)],
        [dataclasses.replace(SamplingParams(), top_k=2**40, frequency_penalty=2.0)] * 4,
        [SamplingParams(min_tokens=5, stop_token_ids=(1, 2)), SamplingParams(temperature=0.0, min_tokens=16)] * 2,
    ]
    ban = MinTokensBan(64, 3)
    for i, params in enumerate(variants):
        tokens = step(logits, slot_params(params), seen, counts, keys([i] * 4), np.full(4, i, np.int32),
                      ban.rows(params))
        assert tokens.shape == (4,) and tokens.dtype == jnp.int32
    assert len(traces) == 1


def test_argmax_rows_equals_argmax_with_ties_and_padding():
    """The chunked argmax returns jnp.argmax's index (the first maximum) also for ties across and within
    chunks, -inf padding, and a vocab that is not a multiple of the chunk."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 512)).astype(np.float32)
    x[1, [7, 300]] = 9.0  # tie across chunks
    x[2, [130, 131]] = 9.0  # tie inside one chunk
    x[3, 400:] = -np.inf
    x[4] = 0.0  # all equal
    x[5, 511] = 50.0  # last entry
    for arr in (x, x[:, :500]):
        np.testing.assert_array_equal(np.asarray(argmax_rows(jnp.asarray(arr))), np.argmax(arr, axis=-1))
