"""A batch job's context sized to its lines (`launch.batch` without --max-seq-len).

The KV cache, the prefill buckets and every decode, extend and copy program grow with `max_seq_len`: the
16-slot decode program of a 1024-position gpt2 engine holds kernels for 8 cache blocks of 128 positions per
layer and slot group (each group reads those its slots reach), a 128-position engine's for one. So a job
whose every line fits in fewer positions runs on the smallest level that holds its longest line: `BLOCK` x
2^k positions (a few levels, so the executable store serves later jobs of the same level), at most the
default context (`EngineConfig.max_seq_len`; the engine clips it to the checkpoint's positions). A
context of one block also gets one KV slot group unless --kv-slot-groups is given (`sized_options`).

A line needs its prompt's tokens plus its max_new_tokens (`max_tokens`; else the job's default; at least
one: scoring a prompt keeps one position free). The read-ahead takes only those two fields (the prompt
as `native_prompt` / `body_prompt` read it, text tokenized by the job's tokenizer), so it may count a
line the job then refuses for another field: the context can only come out larger than needed, never
smaller (so is a text prompt of over LONG_TEXT characters a position, taken to need the whole context
untokenized). A line whose prompt or max_new_tokens cannot be read is left out (the job answers it with
its error). Reading stops at the first line that already needs the default context (over 512 positions of
1024: `needs_the_cap`). A line that fits gets the same positions and limits as under the default context
(the positions past a slot's own are masked either way), and one that does not fit meets the same limit;
the programs differ (fewer blocks, prefill buckets clipped to the context, maybe one slot group), so
logprobs can differ in float rounding, and greedy near-ties with them. Lines a --resume run skips are
counted too.

The read-ahead goes through the job's own open input (then rewound), so it sees the bytes the job will
read, as far as the file's size then: lines appended while the job runs are not counted, and
`check_unchanged` warns when the input grew. Only a regular file of at most READ_AHEAD_BYTES is read
ahead (a pipe would be consumed; a larger file is a long job, whose start-up matters less than a second
pass over it): other inputs keep the default, and so does a read that fails. Every process of a
multi-process job must choose the same context (`launch.distributed.check_same`).
"""
from __future__ import annotations

import io
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO

from engine.config import EngineConfig
from engine.sampling import MAX_INT, int_in
from engine.tokenizer import Tokenizer
from launch.batch_io import input_lines
from launch.jsonl import ALIASES, native_prompt, read_line
from launch.openai_batch import body_prompt

log = logging.getLogger(__name__)

CHUNK = 512  # text prompts tokenized together
# A text prompt of more characters than this per position of `needs_the_cap` is taken to need the whole
# context without being tokenized (English runs ~4 characters a token; a 13 MiB prompt took 10 s).
LONG_TEXT = 64
READ_AHEAD_BYTES = 16 << 20  # ~50k lines of ~60 tokens: read ahead in ~3.5 s on the 2-core CPU


def levels(block: int, cap: int) -> list[int]:
    """The contexts a job can get: `block` x 2^k below `cap`, then `cap`."""
    out = []
    while (block << len(out)) < cap:
        out.append(block << len(out))
    return out + [cap]


def context_level(need: int, block: int, cap: int) -> int:
    """The smallest level >= need (`cap` past them all)."""
    return next(level for level in levels(block, cap) if level >= need or level == cap)


def needs_the_cap(block: int, cap: int) -> int:
    """The least need whose level is `cap`: past it, no line can change the context."""
    below = levels(block, cap)[:-1]
    return below[-1] + 1 if below else 1


def prompts(lines: Iterable[tuple[int, bytes]], default_new: int) -> Iterator[tuple[str | list, int]]:
    """(prompt, max(max_new_tokens, 1)) of every line whose two fields can be read; the others are left out."""
    for line_no, raw in lines:
        line = read_line(raw, line_no)
        obj = line.obj.get("body") if line.openai and line.obj is not None else line.obj
        if line.problem is not None or not isinstance(obj, Mapping):
            continue
        given = [obj[k] for k in (*ALIASES, *ALIASES.values()) if obj.get(k) is not None]
        if not all(int_in(n, 0, MAX_INT) for n in given):
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
            if len(prompt) > LONG_TEXT * enough:
                return max(longest, enough)  # taken to need it all, untokenized: larger is always safe
            texts.append((prompt, new))
            if len(texts) == CHUNK:
                longest = max(longest, tokenize())
        else:
            longest = max(longest, len(prompt) + new)
        if longest >= enough:
            return longest
    return max(longest, tokenize()) if texts else longest


def sized_options(source: IO[bytes], tokenizer: Tokenizer | None, default_new: int,
                  options: dict) -> tuple[dict, int | None]:
    """`options` (EngineConfig fields) with `max_seq_len` sized to the job read from `source` (`default_new`:
    the job's max_new_tokens), unless given or `source` is not read ahead; with a context of one block also
    `kv_slot_groups` 1 unless given (groups skip the blocks their slots do not reach: with one block only
    an empty group skips its one, and each group adds its own attention kernels to every program). Returns
    them and the bytes read ahead (None: not read ahead). `source` is left at its start."""
    from engine.kv_cache import BLOCK  # imports JAX: after the flags are checked

    if "max_seq_len" in options:
        return options, None
    cap, name = EngineConfig.max_seq_len, getattr(source, "name", "the input")
    started = time.perf_counter()
    info = os.fstat(source.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size > READ_AHEAD_BYTES:
        why = f"over {READ_AHEAD_BYTES >> 20} MiB" if stat.S_ISREG(info.st_mode) else "not a regular file"
        log.info("context: %s is %s, so not read ahead: the default (%d positions or the model's; "
                 "--max-seq-len sets it)", name, why, cap)
        return options, None
    try:
        data = source.read(info.st_size)
    except OSError as e:
        log.warning("context: reading %s ahead failed (%s): the default (%d positions or the model's)", name, e, cap)
        return options, None
    finally:
        source.seek(0)  # a regular file; raises if it cannot: the job must not start mid-file
    enough = needs_the_cap(BLOCK, cap)
    need = longest_line(prompts(input_lines(io.BytesIO(data)), default_new), tokenizer, enough)
    level = context_level(need, BLOCK, cap)
    log.info("context: %d positions (longest line %s; read ahead in %.1f s; --max-seq-len sets it)", level,
             f"{need} positions" if need < enough else f">= {enough}", time.perf_counter() - started)
    sized = {"max_seq_len": level, **({"kv_slot_groups": 1} if level <= BLOCK else {})}
    return {**sized, **options}, len(data)  # a given --kv-slot-groups wins


def check_unchanged(source: IO[bytes], read_ahead: int | None, context: int) -> None:
    """Warn when the input grew after it was read ahead: lines appended since had `context` positions."""
    try:
        size = os.fstat(source.fileno()).st_size
    except (OSError, ValueError):  # closed or gone: nothing more to say
        return
    if read_ahead is not None and size > read_ahead:
        log.warning("the input grew from %d to %d bytes after it was read ahead: lines added since ran with a "
                    "context of %d positions; rerun any cut short (finish_reason length) with --max-seq-len",
                    read_ahead, size, context)
