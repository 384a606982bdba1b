"""GPT2Config (presets, HF config.json parsing) and full logits vs Hugging Face through our loader.

Reference checkpoints are random `transformers.GPT2LMHeadModel`s (fixed seed) written by `save_pretrained`
and read back by `Engine.from_pretrained`; HF's torch forward is the oracle. Two sizes: the real `gpt2`
(124M: 12 layers, 12 heads, head_dim 64) and a tiny one with another head count (2 layers, 4 heads,
head_dim 16). HF initialises every bias to 0 and every LayerNorm to (1, 0), which would hide a mis-mapped
bias or a swapped ln_1/ln_2, so both draw those at random too; the tiny one also uses a larger init std
(0.1) so that attention is far from uniform and GELU far from linear.

Tolerances (logits are compared over the real 50257 entries, every position of prompts of 1/17/1024 tokens):
- fp32: max |ours - HF| <= 1e-4. Measured 2e-6 to 3e-6 (tiny) and 3e-6 to 5e-6 (124M); the logits' std is
  0.78 / 0.56. The bound is meaningful: measured on the same models (tiny / 124M), LayerNorm eps 1e-6
  instead of 1e-5 gives 1e-3 / 7e-3, exact-erf GELU 9e-4 / 5e-4, one zeroed MLP bias 0.3 / 0.7, and a
  permuted c_attn bias 0.5 / 0.2.
- bf16: max |ours - HF fp32| <= 2 x HF's own bf16 error on the same inputs (HF model cast to bf16) plus
  one bf16 ulp at the logits' scale (2^-8 x max |logit|). Measured: HF bf16 0.026-0.046, ours 1.0-1.2x
  that (we keep LayerNorm, softmax and logits in fp32). The error must also exceed 10 x the fp32 bound,
  which proves the engine really ran in bf16.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from engine.config import PRESETS, GPT2Config, preset
from engine.engine import Engine

FP32_TOL = 1e-4
LENGTHS = (1, 17, 1024)
ENGINE_OPTS = dict(max_slots=1, max_seq_len=1024, decode_steps=1, prefill_buckets=(32,))



@pytest.mark.parametrize("name,layers,heads,embd,padded", [
    ("gpt2", 12, 12, 768, 50304), ("gpt2-medium", 24, 16, 1024, 50304), ("gpt2-large", 36, 20, 1280, 50560),
    ("gpt2-xl", 48, 25, 1600, 51200)])
def test_preset_sizes(name, layers, heads, embd, padded):
    cfg = preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (layers, heads, embd)
    # Padded to a multiple of 128 and of n_head, so every head split also splits the vocab.
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.n_positions, cfg.head_dim) == (50257, padded, 1024, 64)
    assert cfg.n_inner == 4 * embd and cfg.layer_norm_epsilon == 1e-5 and cfg.eos_token_id == 50256
    assert preset(f"openai-community/{name}") == cfg


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown GPT-2 preset 'gpt3'.*gpt2-medium"):
        preset("gpt3")
    assert set(PRESETS) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_from_hf_dict_reads_a_transformers_config():
    d = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=1000, n_positions=64,
                                layer_norm_epsilon=1e-4).to_dict()
    cfg = GPT2Config.from_hf_dict(d)
    assert cfg == GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=1000, n_positions=64,
                             layer_norm_epsilon=1e-4, eos_token_id=50256)
    assert cfg.padded_vocab_size == 1024
    assert GPT2Config.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"model_type": None}, "model_type is None"),
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"n_inner": 100}, "n_inner=100"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"n_embd": 100, "n_head": 12}, "n_embd=100 is not divisible by n_head=12"),
    ({"n_layer": 0}, "n_layer"),
])
def test_from_hf_dict_rejects_what_is_not_gpt2(change, match):
    d = {**transformers.GPT2Config().to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        GPT2Config.from_hf_dict(d)



@dataclasses.dataclass
class Reference:
    """A saved random checkpoint and HF's logits on fixed prompts (float32 [len, 50257] per length)."""

    folder: Path
    prompts: dict[int, list[int]]
    fp32: dict[int, np.ndarray]
    bf16: dict[int, np.ndarray]


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _hf_logits(model: torch.nn.Module, prompts: dict[int, list[int]], lengths) -> dict[int, np.ndarray]:
    with torch.no_grad():
        return {n: model(torch.tensor([prompts[n]])).logits[0].float().numpy() for n in lengths}


def _reference(folder: Path, hf_cfg: transformers.GPT2Config, bf16_lengths: tuple[int, ...]) -> Reference:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    _randomise_norms_and_biases(model, seed=1)
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(0, hf_cfg.vocab_size, n).tolist() for n in LENGTHS}
    fp32 = _hf_logits(model, prompts, LENGTHS)
    bf16 = _hf_logits(copy.deepcopy(model).to(torch.bfloat16), prompts, bf16_lengths)
    return Reference(folder, prompts, fp32, bf16)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory) -> Reference:
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, initializer_range=0.1)
    return _reference(tmp_path_factory.mktemp("tiny"), cfg, bf16_lengths=LENGTHS)


@pytest.fixture(scope="module")
def gpt2_ref(tmp_path_factory) -> Reference:
    # bf16 only on the 17-token prompt: a 1024-token bf16 forward of 124M costs ~15 s per side on CPU.
    return _reference(tmp_path_factory.mktemp("gpt2"), transformers.GPT2Config(), bf16_lengths=(17,))


@pytest.fixture(scope="module")
def engines():
    """One engine per (checkpoint, dtype), built on first use and shared by the module's tests."""
    made: dict[tuple[Path, str], Engine] = {}

    def get(ref: Reference, dtype: str) -> Engine:
        if (ref.folder, dtype) not in made:
            made[ref.folder, dtype] = Engine.from_pretrained(ref.folder, dtype=dtype, **ENGINE_OPTS)
        return made[ref.folder, dtype]

    yield get
    made.clear()


@pytest.mark.parametrize("size", ["tiny", "gpt2"])
@pytest.mark.parametrize("length", LENGTHS)
def test_fp32_logits_match_hf(size, length, request, engines):
    ref: Reference = request.getfixturevalue(f"{size}_ref")
    expected = ref.fp32[length]
    assert expected.shape == (length, 50257) and expected.std() > 1000 * FP32_TOL  # a signal to compare
    ours = engines(ref, "float32").logits(ref.prompts[length])
    assert ours.shape == expected.shape and ours.dtype == np.float32
    err = float(np.abs(ours - expected).max())
    assert err <= FP32_TOL, f"{size}, {length} tokens: max |ours - HF| = {err:.3g} > {FP32_TOL}"


@pytest.mark.parametrize("size,length", [("tiny", 1), ("tiny", 17), ("tiny", 1024), ("gpt2", 17)])
def test_bf16_logits_as_close_as_hf_bf16(size, length, request, engines):
    ref: Reference = request.getfixturevalue(f"{size}_ref")
    exact = ref.fp32[length]
    hf_err = float(np.abs(ref.bf16[length] - exact).max())
    ours = engines(ref, "bfloat16").logits(ref.prompts[length])
    err = float(np.abs(ours - exact).max())
    bound = 2 * hf_err + 2.0**-8 * float(np.abs(exact).max())
    assert err <= bound, f"{size}, {length} tokens: bf16 error {err:.3g} > {bound:.3g} (HF bf16: {hf_err:.3g})"
    assert err > 10 * FP32_TOL, f"bf16 error {err:.3g} is fp32-sized: was the model really run in bf16?"
