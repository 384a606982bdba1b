"""`Engine`: the facade users call (from_pretrained, generate, stream, score, logits).

One request, end to end: `generate` validates and tokenizes every prompt first (a bad one raises before
anything runs), expands `n` into n requests with derived seeds, and queues them in the `Scheduler`. Each
`step` then (1) asks the scheduler which waiting requests enter which free slots, grouped per prefill
bucket, and runs one prefill program per group (prompt forward, K/V insert) and a first-token program
after it (first tokens sampled on device); (2) runs one decode program that advances every live slot k
tokens; (3) hands the returned int arrays to the scheduler, which appends tokens, detects eos / stop
tokens / stop strings / length, and frees slots at once so the next step refills them. Text is
detokenised incrementally per request.
With prefix caching (default), step (1) also forks identical prompts from one prefill and resumes prompts
that start with cached K/V blocks after them (`engine.prefix_plan`); results are the same either way.
Scoring (`score`, or `SamplingParams.prompt_logprobs` on any request) takes the same path: its prompts are
packed into the same batched prefill calls, which then also score every prompt token (`engine.scoring`).

A request that fails while it runs (its detokenising or stop checks raise, or a device call running it
fails) finishes alone with finish_reason "error" and `Completion.error` set; the others go on. Only a
device that fails every call (`EngineFailedError`) stops `step`.

This is the one engine module that imports `weights`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.compile_cache import enable_compilation_cache
from engine.config import EngineConfig, GPT2Config, preset
from engine.kv_cache import block_size, slot_groups
from engine.requests import (Completion, RequestError, RequestFactory, TokenLogprob, as_prompt_list, attach_rows,
                             completion_of)
from engine.runner import Runner
from engine.sampling import SamplingParams, broadcast_params
from engine.scheduler import Request, Scheduler, SchedulerConfig, Update
from engine.sharding import check_mesh, describe, make_mesh, param_sharding_fn
from engine.steps import StepRunner
from engine.tokenizer import GPT2_VOCAB_SIZE, Tokenizer
from weights import checkpoint, hf
from weights.loader import abstract_params, init_dummy, load_safetensors

LOAD_FORMATS = ("auto", "safetensors", "orbax", "dummy")
log = logging.getLogger(__name__)


def _gigabytes(tree) -> float:
    """Bytes of every array in `tree` (whole arrays, over all their shards; or their shapes), in GB."""
    return sum(np.prod(a.shape, dtype=np.int64) * a.dtype.itemsize for a in jax.tree.leaves(tree)) / 1e9


class Engine:
    def __init__(self, cfg: GPT2Config, graphdef, params, ecfg: EngineConfig, tokenizer: Tokenizer | None,
                 mesh: jax.sharding.Mesh | None = None, executables: str | None = None):
        """`params` must already be placed on `mesh` (default: `ecfg.mesh`, else the first device), or be
        their `jax.ShapeDtypeStruct`s until `runner.bind` gets them (`from_pretrained`: the stored programs
        load while the weights are read). `executables`: a folder to store compiled programs in and load
        them from (`Runner`)."""
        # The checkpoint's positions bound the context: buckets and decode windows must fit inside it.
        ecfg = dataclasses.replace(ecfg, max_seq_len=min(ecfg.max_seq_len, cfg.n_positions))
        self.config, self.engine_config, self.tokenizer = cfg, ecfg, tokenizer
        self.mesh = make_mesh(mesh if mesh is not None else ecfg.mesh)
        check_mesh(self.mesh, cfg, ecfg.max_slots)
        dtype = jnp.dtype(ecfg.dtype)
        self.runner = Runner(graphdef, params, cfg, ecfg, dtype, mesh=self.mesh, executables=executables)
        # The parameters' layout decides (a caller may pass either): the config says what runs, and how many
        # slot groups the cache has.
        self.engine_config = ecfg = dataclasses.replace(ecfg, scan_layers=self.runner.stacked,
                                                        kv_slot_groups=self.runner.groups)
        self.max_seq_len = self.runner.max_len
        log.info("KV cache: %d slots x %d positions x %d layers in %d slot group(s), %s: %.2f GB; weights %.2f GB",
                 ecfg.max_slots, self.max_seq_len, cfg.n_layer, self.runner.groups, ecfg.dtype,
                 _gigabytes(self.runner.state.cache), _gigabytes(params))
        self.scheduler = Scheduler(self._scheduler_config())
        self.requests = RequestFactory(cfg, tokenizer, self.max_seq_len, ecfg.seed)
        self._steps = StepRunner(self.runner, self.scheduler)
        sc = self.scheduler.config  # the stored programs a job needs first start loading now, in the background
        self.runner.prefetch(sc.decode_windows, sc.decode_slot_counts, self._extend_buckets())
        self._logits_fn = jax.jit(lambda p, tokens: self.runner._model(p)(tokens, jnp.arange(tokens.shape[1])[None])[0])

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, tokenizer=None, dtype: str = "float32",
                        load_format: str = "auto", mesh: str | jax.sharding.Mesh | None = None,
                        compile_cache: bool | str | os.PathLike = True, **engine_options) -> Engine:
        """Load a GPT-2 checkpoint (HF folder or hub id, or a `weights.convert` orbax folder), or random
        weights with load_format="dummy". `mesh` ("data=D,model=M" or a Mesh over ("data", "model"); default
        the first device) is checked against the model before any weight is read; each parameter is then
        read straight into its shard. `compile_cache` (default on): keep compiled programs in JAX's
        persistent cache (see `engine.compile_cache.enable_compilation_cache`; a path picks the folder) and this
        engine's executables in its `executables/` subfolder, loaded back by the next engine with the same
        fingerprint without tracing (`engine.programs.ExecutableStore`); the engine is built on the
        parameters' shapes first, so those start loading in the background while the weights are read."""
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format: expected one of {LOAD_FORMATS}, got {load_format!r}")
        cache = enable_compilation_cache(None if compile_cache is True else compile_cache) if compile_cache else None
        executables = os.path.join(cache, "executables") if cache else None
        jmesh = make_mesh(mesh)
        ecfg = EngineConfig(dtype=dtype, mesh=None if mesh is None else describe(jmesh), **engine_options)
        folder, cfg, load_format = _locate(model, load_format)
        check_mesh(jmesh, cfg, ecfg.max_slots)
        slot_groups(ecfg.max_slots, jmesh.shape["data"], ecfg.kv_slot_groups)  # fails before a weight is read
        jdtype, sharding_fn = jnp.dtype(ecfg.dtype), param_sharding_fn(jmesh)
        scan = ecfg.scan_layers
        files = hf.weight_files(folder) if load_format not in ("dummy", "orbax") else None  # a missing file fails here
        tok = _load_tokenizer(tokenizer, folder, cfg)
        # The engine is built on the parameters' shapes first: its stored programs start loading in the
        # background (`Runner.prefetch`) while the weights are read, then it takes the weights (`bind`).
        graphdef, abstract = abstract_params(cfg, jdtype, sharding_fn, scan_layers=scan)
        engine = cls(cfg, graphdef, abstract, ecfg, tok, mesh=jmesh, executables=executables)
        if load_format == "dummy":
            _, params = init_dummy(cfg, jdtype, sharding_fn=sharding_fn, scan_layers=scan)
        elif load_format == "orbax":
            _, params = checkpoint.restore(folder, cfg, jdtype, sharding_fn, scan_layers=scan)
        else:
            _, params = load_safetensors(files, cfg, jdtype, sharding_fn, scan_layers=scan)
        engine.runner.bind(params)
        return engine

    def _scheduler_config(self) -> SchedulerConfig:
        ecfg, data = self.engine_config, self.mesh.shape["data"]
        buckets = ecfg.resolved_buckets()  # ecfg.max_seq_len is already clipped to the checkpoint's positions
        return SchedulerConfig(
            max_slots=ecfg.max_slots, max_seq_len=self.max_seq_len, decode_steps=ecfg.decode_steps,
            prefill_buckets=buckets, prefill_batch_sizes={b: ecfg.prefill_batch_sizes(b, data) for b in buckets},
            prefill_prompts={b: tuple(ecfg.prefill_prompts(b, n, data) for n in ecfg.prefill_batch_sizes(b, data))
                             for b in buckets}, prefill_shards=data,
            prefill_attention_cost=1 / (6 * self.config.n_embd),
            decode_windows=ecfg.decode_windows(),
            decode_slot_counts=self.runner.decode_widths,
            eos_token_id=self.config.eos_token_id, prefix_caching=ecfg.enable_prefix_caching,
            block=block_size(self.max_seq_len), extend_buckets=ecfg.extend_buckets(block_size(self.max_seq_len)) or (),
            prefix_cache_max_blocks=ecfg.prefix_cache_max_blocks)

    def _extend_buckets(self) -> tuple[int, ...] | None:
        return self.engine_config.extend_buckets(block_size(self.max_seq_len))

    def warmup(self, score: bool = False, background: bool = False) -> dict[str, float]:
        """Compile every program now (in parallel); afterwards no prompt length or parameter mix compiles
        again (with `score`, also the scoring prefill programs: then prompt_logprobs requests compile
        nothing either). With `background`, programs the executable store holds are not waited for: they
        load in the background (a call meanwhile loads or waits for its own). Returns the compile seconds
        per program class (loads count as 0)."""
        sc = self.scheduler.config
        return self.runner.warmup(sc.prefill_buckets, sc.decode_windows, sc.decode_slot_counts, score=score,
                                  extend=self._extend_buckets(), background=background)

    @functools.cached_property
    def _warmup_programs(self) -> list:
        sc = self.scheduler.config
        return [(p, k) for p, k, _ in self.runner.programs(sc.prefill_buckets, sc.decode_windows,
                                                            sc.decode_slot_counts, extend=self._extend_buckets())]

    @property
    def num_programs(self) -> int:
        """How many programs `warmup` compiles for this configuration (prefill + decode + block copy + row
        move, and with prefix caching extend)."""
        return len(self._warmup_programs)

    @property
    def programs_ready(self) -> int:
        """How many of those are in memory now (a background warm-up loads them one after another)."""
        return sum(key in program for program, key in self._warmup_programs)

    def score(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
              top_n: int = 0) -> list[list[TokenLogprob | None]]:
        """Per prompt: None for its first token, then each later token's log-probability given the tokens
        before it (fp32 log-softmax of the raw logits) and the `top_n` most likely tokens there. Runs the
        batched prefill (prompts packed together), generating nothing."""
        params = SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=top_n)
        return [c.prompt_logprobs for c in self.generate(prompts, params)]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of one sequence: float32 [len(token_ids), vocab_size]."""
        ids = self.requests.check_token_ids(list(token_ids), "token_ids", limit=self.config.n_positions)
        bucket = next(b for b in self.scheduler.config.prefill_buckets + (self.config.n_positions,) if b >= len(ids))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(ids)] = ids
        out = self._logits_fn(self.runner.params, jnp.asarray(padded))
        return np.asarray(out[0, : len(ids), : self.config.vocab_size], np.float32)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete every prompt; one Completion per sample, grouped by prompt in input order. A sample that
        failed while running has finish_reason "error" and `error` set (the others are unaffected)."""
        prompts = as_prompt_list(prompts)
        per_prompt = broadcast_params(params, len(prompts))
        groups = [self.requests.make(p, sp) for p, sp in zip(prompts, per_prompt)]
        flat = list(itertools.chain.from_iterable(groups))
        for req in flat:
            self.scheduler.add(req)
        while not all(r.finished for r in flat):
            self.step()
        return [completion_of(r, self.tokenizer) for r in flat]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as tokens arrive (never half a character or a stop string);
        RequestError if the request fails while running."""
        (req,) = self.requests.make(prompt, dataclasses.replace(params or SamplingParams(), n=1))
        if req.text_stream is None:
            raise ValueError("stream: this engine has no tokenizer, so there is no text to stream")
        self.scheduler.add(req)
        while not req.finished:
            self.step()
            if req.finish_reason == "error":
                raise RequestError(f"request {req.request_id}: {req.error}")
            delta = req.text_stream.pop_delta()
            if delta:
                yield delta
        rest = req.text_stream.finish()
        if rest:
            yield rest

    def add_request(self, req: Request) -> None:
        """Queue a request (made by `self.requests.make`, or by hand: its sampling row is computed here)."""
        self.scheduler.add(attach_rows(req))

    def step(self, on_prefill: Callable[[list[Update]], None] | None = None) -> list[Update]:
        """One scheduling round: prefill admitted requests, then decode every live slot k steps (with
        `on_prefill`, the prefill updates go to it before the decode call instead of being returned)."""
        return self._steps.step(on_prefill)


def _locate(model, load_format: str) -> tuple[hf.Path | None, GPT2Config, str]:
    """(folder or None, config, concrete format) of a model argument; "auto" picks orbax or safetensors."""
    if load_format == "dummy":
        folder = hf.Path(model) if hf.Path(model).is_dir() else None
        return folder, hf.read_config(folder) if folder else preset(str(model)), load_format
    folder = hf.resolve(model)
    cfg = hf.read_config(folder)
    if load_format == "auto":
        load_format = "orbax" if checkpoint.is_orbax(folder) else "safetensors"
    if load_format == "orbax" and not checkpoint.is_orbax(folder):
        raise hf.CheckpointError(f"{folder}: no {checkpoint.ORBAX_DIR}/ folder; write one with "
                                 f"`python -m weights.convert MODEL {folder}`")
    return folder, cfg, load_format


def load_tokenizer(model, tokenizer=None, load_format: str = "auto") -> Tokenizer | None:
    """The tokenizer `Engine.from_pretrained(model, tokenizer=tokenizer, load_format=load_format)` uses;
    passed back to it as `tokenizer=`, it is loaded once."""
    folder, cfg, _ = _locate(model, load_format)
    return _load_tokenizer(tokenizer, folder, cfg)


def _load_tokenizer(tokenizer, folder, cfg: GPT2Config) -> Tokenizer | None:
    """The given tokenizer, else the folder's, else (for GPT-2's vocabulary) the packaged GPT-2 one."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_object(tokenizer)
    if tokenizer is not None:
        path = hf.Path(tokenizer)
        return Tokenizer.from_path(path if path.exists() else hf.resolve(tokenizer))
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return Tokenizer.from_path(folder)
    return Tokenizer.gpt2() if cfg.vocab_size == GPT2_VOCAB_SIZE else None
