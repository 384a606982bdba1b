"""`python -m launch.batch INPUT.jsonl [options]`: run a JSONL file of prompts through the engine.

Flags map onto `EngineConfig` fields (--max-slots, --max-seq-len, ...) and onto the default
`SamplingParams` of every line (--temperature, --max-new-tokens, ...); a line's own fields override them.
Without --max-seq-len the context is sized to the job's longest line (`launch/batch_context.py`).
Line formats and the output shape: `launch/jsonl.py` (native) and `launch/openai_batch.py` (OpenAI batch).
The loop: `launch/batch_job.py`; files and --resume: `launch/batch_io.py`.

Exit status: 0 when every line got an output line (bad lines get error lines); 1 for a job-level failure
(input unreadable, output not writable, model not loadable), with one message on stderr; 2 for bad flags.
A finished job exits without the interpreter's teardown (`exit_now`).
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import time
from typing import IO, TYPE_CHECKING

from tqdm import tqdm

from engine.config import DTYPES, EngineConfig
from engine.sampling import SamplingParams
from launch import distributed
from launch.batch_context import check_unchanged, sized_options
from launch.batch_io import JobError, count_lines, default_output, input_lines, open_input
from launch.batch_job import DEFAULT_BUFFERED_BYTES, BatchJob, JobOptions, Stats
from launch.engine_flags import EngineLoadError, add_engine_flags, engine_options, load_engine, load_tokenizer

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger("launch.batch")

ENGINE_FLAGS = ("max_slots", "max_seq_len", "decode_steps", "prefill_buckets", "mesh",
                "enable_prefix_caching", "prefix_cache_max_blocks", "scan_layers",
                "kv_slot_groups")
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "stop", "ignore_eos", "logprobs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.batch", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="JSONL file: one request object per line")
    p.add_argument("--model", default="gpt2", help="hub id or local folder of an HF GPT-2 checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder/file or hub id (default: the model's own)")
    p.add_argument("--output", help="output JSONL (default: INPUT with .jsonl -> .out.jsonl); '-' for stdout")
    p.add_argument("--resume", action="store_true", help="keep the output's complete lines, answer the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--dtype", choices=DTYPES, default=EngineConfig.dtype)
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights of the model's shape (needs no checkpoint)")
    e = p.add_argument_group("engine (EngineConfig fields; default: EngineConfig's)")
    add_engine_flags(e, ENGINE_FLAGS, {"max_seq_len": "context positions per slot (prompt + output); unset: the "
                                                      "smallest of 128, 256, 512, 1024 that holds the job's longest "
                                                      "line (prompt tokens + max_new_tokens), read ahead from the "
                                                      "input (a pipe or a file over 16 MiB: 1024)"})
    e.add_argument("--max-in-flight", type=int,
                   help="unfinished requests in the engine at once; a line of n samples counts n "
                        "(default: 4 x max-slots)")
    e.add_argument("--max-buffered-bytes", type=byte_size, default=DEFAULT_BUFFERED_BYTES,
                   help="finished results waiting for an earlier line, held in memory (e.g. 64M, 1G); "
                        "past this they spill to a temporary file next to the output")
    s = p.add_argument_group("default sampling (SamplingParams fields; a line's own fields win)")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--seed", type=int, help="lines without a seed get one derived from this and their id")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", default=None)
    s.add_argument("--logprobs", type=int, help="return the top-N logprobs of every generated token")
    distributed.add_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def byte_size(text: str) -> int:
    """argparse type: bytes as an int >= 0, optionally with a K, M or G suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a byte count >= 0 such as 67108864, 64M or 1G, got {text!r}")
    return value


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def configs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[dict, JobOptions]:
    """Engine options and job options from the flags; a bad value is a usage error naming the field."""
    options = engine_options(args, ENGINE_FLAGS, parser)
    try:
        defaults = SamplingParams(**_given(args, SAMPLING_FLAGS))
    except ValueError as e:
        parser.error(str(e))
    max_in_flight = args.max_in_flight if args.max_in_flight is not None else 4 * EngineConfig(**options).max_slots
    if max_in_flight < 1:
        parser.error(f"--max-in-flight: expected an int >= 1, got {max_in_flight}")
    return options, JobOptions(defaults, args.seed, max_in_flight, args.model, args.max_buffered_bytes)


def load_logged(args: argparse.Namespace, options: dict, job: JobOptions,
                source: IO[bytes]) -> tuple[Engine, int | None]:
    """The engine, with what was loaded and how long it took in the log. Without --max-seq-len its context
    is sized to the job's lines (`launch.batch_context`: read ahead from `source`, rewound; also returns the
    bytes read ahead, None when not read ahead)."""
    tokenizer = load_tokenizer(args)  # any failure to load is job-level: one message, no traceback
    options, read_ahead = sized_options(source, tokenizer, job.defaults.max_new_tokens, options)
    distributed.check_same({k: options.get(k) for k in ("max_seq_len", "kv_slot_groups")},
                           "the context sized to the input: it must be the same file on every host")
    log.info("loading %s (load_format=%s, %s)", args.model, args.load_format,
             ", ".join(f"{k}={v}" for k, v in options.items()))
    started = time.perf_counter()
    engine = load_engine(args, options, tokenizer)
    log.info("loaded in %.1f s (tokenizer: %s)", time.perf_counter() - started,
             "yes" if engine.tokenizer is not None else "none: token-id prompts only")
    return engine, read_ahead


def run(args: argparse.Namespace, engine_kwargs: dict, options: JobOptions) -> Stats:
    source = open_input(args.input)
    output = args.output or default_output(args.input)
    writer = distributed.output_writer(output, resume=args.resume, overwrite=args.overwrite)  # process 0 writes
    if writer.done:
        log.info("resuming %s: %d lines already answered", output, len(writer.done))
    try:
        engine, read_ahead = load_logged(args, engine_kwargs, options, source)
        total = count_lines(args.input) if sys.stderr.isatty() else None
        with tqdm(total=total, unit="line", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            stats = BatchJob(engine, writer, options, bar).run(input_lines(source))
        check_unchanged(source, read_ahead, engine.max_seq_len)
    finally:
        writer.close()
        source.close()
    log.info("done -> %s | %s", "stdout" if output == "-" else output, stats.summary())
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for name in ("launch", "engine"):  # engine: programs compiled or loaded on first use, with their seconds
        logging.getLogger(name).setLevel(args.log_level)
    engine_kwargs, options = configs(args, parser)  # a bad flag fails before JAX starts
    try:
        distributed.initialize(args)
        run(args, engine_kwargs, options)
    except (JobError, EngineLoadError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished lines are saved, rerun with --resume to answer the rest")
        return 130
    except Exception as e:  # the engine or the disk failed mid-job: the output so far is complete lines
        log.debug("job failed", exc_info=True)
        log.error("job failed (%s: %s); finished lines are saved, rerun with --resume "
                  "(--log-level DEBUG shows the traceback)", type(e).__name__, e)
        return 1
    return 0


def exit_now(code: int) -> None:
    """End the process with `code` after the job (its files are closed by then): run the exit handlers
    (JAX's and logging's shutdown included), flush the standard streams, then skip the interpreter's
    teardown, which frees the KV cache and every loaded program's code object by object: 1.5-2 s of a
    gpt2 job on the 2-core VM."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
