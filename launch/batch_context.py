"""A batch job's context sized to its lines (`launch.batch` without --max-seq-len).

The KV cache, the prefill buckets and every decode, extend and copy program grow with `max_seq_len`: the
16-slot decode program of a 1024-position gpt2 engine reads 8 cache blocks of 128 positions per layer and
slot group, each block its own kernels; a 128-position engine's reads one. So a job whose every line fits
in fewer positions runs on the smallest level that holds its longest line: `BLOCK` x 2^k positions (a few
levels, so the executable store serves later jobs of the same level), at most the default context
(`EngineConfig.max_seq_len`; the engine clips it to the checkpoint's positions). A context of one block
also gets one KV slot group unless --kv-slot-groups is given (`sized_options`).

A line needs its prompt's tokens plus its max_new_tokens (`max_tokens`; else the job's default; at least
one: scoring a prompt keeps one position free). The read-ahead takes only those two fields (the prompt
as `native_prompt` / `body_prompt` read it, text tokenized by the job's tokenizer), so it may count a
line the job then refuses for another field: the context can only come out larger than needed, never
smaller. A line whose prompt or max_new_tokens cannot be read is left out (the job answers it with its
error). Reading stops once a line needs the default context. Outputs are those of the default context: a
line that fits attends to the same positions (those past a slot's own are masked either way; only the
float rounding of a longer masked sum can differ), and one that does not fit meets the same limit. Lines
a --resume run skips are counted too, and every process of a multi-process job reads the same file with
the same tokenizer, so all of them choose the same level.

Only a regular file of at most READ_AHEAD_BYTES is read ahead (a pipe would be consumed; a larger file is
a long job, whose start-up matters less than a second pass over it): other inputs keep the default.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping

from engine.config import EngineConfig
from engine.tokenizer import Tokenizer
from launch.batch_io import input_lines
from launch.jsonl import native_prompt, read_line
from launch.openai_batch import body_prompt

log = logging.getLogger(__name__)

CHUNK = 512  # text prompts tokenized together
READ_AHEAD_BYTES = 16 << 20  # ~50k lines of ~60 tokens: read ahead in ~3.5 s on the 2-core CPU


def context_level(need: int, block: int, cap: int) -> int:
    """The smallest `block` x 2^k >= need, at most `cap`."""
    level = block
    while level < need and level < cap:
        level *= 2
    return min(level, cap)


def prompts(lines: Iterable[tuple[int, bytes]], default_new: int) -> Iterator[tuple[str | list, int]]:
    """(prompt, max(max_new_tokens, 1)) of every line whose two fields can be read; the others are left out."""
    for line_no, raw in lines:
        line = read_line(raw, line_no)
        obj = line.obj.get("body") if line.openai and line.obj is not None else line.obj
        if line.problem is not None or not isinstance(obj, Mapping):
            continue
        given = [obj[k] for k in ("max_new_tokens", "max_tokens") if obj.get(k) is not None]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in given):
            continue  # the job refuses it
        try:
            prompt = body_prompt(obj) if line.openai else native_prompt(obj)
        except ValueError:
            continue
        yield prompt, max(max(given, default=default_new), 1)


def longest_line(lines: Iterable[tuple[str | list, int]], tokenizer: Tokenizer | None, enough: int) -> int:
    """Positions the longest (prompt, new tokens) needs; stops at `enough`."""
    longest, texts = 0, []

    def tokenize() -> int:
        counts = [len(ids) for ids in tokenizer.encode_batch([prompt for prompt, _ in texts])]
        need = max(n + new for n, (_, new) in zip(counts, texts))
        texts.clear()
        return need

    for prompt, new in lines:
        if isinstance(prompt, str):
            if tokenizer is None:
                continue  # the job answers it with an error
            texts.append((prompt, new))
            if len(texts) == CHUNK:
                longest = max(longest, tokenize())
        else:
            longest = max(longest, len(prompt) + new)
        if longest >= enough:
            return longest
    return max(longest, tokenize()) if texts else longest


def sized_options(path: str, tokenizer: Tokenizer | None, default_new: int, options: dict) -> dict:
    """`options` (EngineConfig fields) with `max_seq_len` sized to the job in `path` (`default_new`: the
    job's max_new_tokens), unless given or `path` is not read ahead; with a context of one block also
    `kv_slot_groups` 1 unless given (groups skip the blocks their slots do not reach: with one block only
    an empty group skips its one, and each group adds its own attention kernels to every program)."""
    from engine.kv_cache import BLOCK  # imports JAX: after the flags are checked

    if "max_seq_len" in options:
        return options
    cap = EngineConfig.max_seq_len
    if not os.path.isfile(path) or os.path.getsize(path) > READ_AHEAD_BYTES:
        why = f"over {READ_AHEAD_BYTES >> 20} MiB" if os.path.isfile(path) else "not a regular file"
        log.info("context: %s is %s, so not read ahead: the default %d positions (--max-seq-len sets it)",
                 path, why, cap)
        return options
    started = time.perf_counter()
    with open(path, "rb") as f:
        need = longest_line(prompts(input_lines(f), default_new), tokenizer, cap)
    level = context_level(need, BLOCK, cap)
    log.info("context: %d positions (longest line %s; read ahead in %.1f s; --max-seq-len sets it)", level,
             f"{need} positions" if need < cap else f">= {cap}", time.perf_counter() - started)
    sized = {"max_seq_len": level, **({"kv_slot_groups": 1} if level <= BLOCK else {})}
    return {**sized, **options}  # a given --kv-slot-groups wins
