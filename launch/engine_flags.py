"""The `EngineConfig` flags the command lines share (`launch.batch`, `launch.serve`), the engine options they
give, and loading the engine from them.

Invariants:
- A flag's dest is its `EngineConfig` field name; an unset flag (None) leaves the field's default.
- Each command line picks which fields it exposes, and their order in --help, by a tuple of field names.
- Nothing here imports JAX until `load_engine` or `load_tokenizer` runs, so flag errors come before the slow
  import.
"""
from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from engine.config import EngineConfig

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def int_tuple(text: str) -> tuple[int, ...]:
    """argparse type for comma-separated ints such as `16,64,256`."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 16,64,256, got {text!r}") from None


# EngineConfig field -> add_argument keywords (dtype is left to each command line: it has no help text)
FLAGS: dict[str, dict] = {
    "max_slots": dict(type=int, help="requests decoded together (cache slots)"),
    "max_seq_len": dict(type=int, help="context positions per slot (prompt + output)"),
    "decode_steps": dict(type=int, help="tokens per decode call"),
    "prefill_buckets": dict(type=int_tuple, help="comma-separated padded prompt lengths"),
    "prefill_token_budget": dict(type=int, help="tokens per prefill call and data shard"),
    "mesh": dict(help="device mesh, e.g. data=2,model=4"),
    "seed": dict(type=int, help="engine seed for requests without their own"),
    "enable_prefix_caching": dict(action=argparse.BooleanOptionalAction, default=None,
                                  help="reuse shared prompt prefixes (unset: on): n > 1 forks one prefill, and full 128-position "
                                       "cache blocks of earlier prompts stay cached in free slots"),
    "prefix_cache_max_blocks": dict(type=int, help="cached blocks kept in free slots (unset: all), least recently used "
                                                   "forgotten first"),
    "scan_layers": dict(action=argparse.BooleanOptionalAction, default=None,
                        help="run the layers as one scan over stacked weights (unset: off): compile time independent "
                             "of depth (start-up in a fraction of the time), decode slower on CPU"),
    "kv_slot_groups": dict(type=int, help="KV cache slot groups, 1 to 8 dividing --max-slots (unset: 4, else 2, else 1; "
                                          "1 with the slots over data): 1 compiles and loads decode ~3x faster, but "
                                          "every slot then reads as far as the longest"),
}


class EngineLoadError(Exception):
    """The model (or tokenizer) could not be loaded; the message names the model and the cause."""


def add_engine_flags(group: argparse._ActionsContainer, fields: tuple[str, ...], helps: dict | None = None) -> None:
    """`--max-slots` style flags for `fields` (keys of FLAGS), in that order; `helps`: a command line's own
    help text for some of them."""
    for field in fields:
        keywords = dict(FLAGS[field], **({"help": helps[field]} if helps and field in helps else {}))
        group.add_argument("--" + field.replace("_", "-"), **keywords)


def engine_options(args: argparse.Namespace, fields: tuple[str, ...], parser: argparse.ArgumentParser) -> dict:
    """EngineConfig keyword arguments from --dtype and the given `fields`; a bad value is a usage error
    (exit 2) naming the field."""
    options = {"dtype": args.dtype, **{f: getattr(args, f) for f in fields if getattr(args, f) is not None}}
    try:
        EngineConfig(**options)
    except ValueError as e:
        parser.error(str(e))
    return options


def load_engine(args: argparse.Namespace, options: dict, tokenizer: Tokenizer | None = None) -> Engine:
    """`Engine.from_pretrained` from --model, --tokenizer (or `tokenizer`, from `load_tokenizer`),
    --load-format and `options`; any failure is one EngineLoadError (the traceback goes to the DEBUG log)."""
    from engine.engine import Engine  # imports JAX: after the cheap checks

    try:
        return Engine.from_pretrained(args.model, tokenizer=tokenizer or args.tokenizer, load_format=args.load_format,
                                      **options)
    except Exception as e:
        log.debug("model load failed", exc_info=True)
        raise EngineLoadError(f"cannot load model {args.model!r}: {e}") from None


def load_tokenizer(args: argparse.Namespace) -> Tokenizer | None:
    """The tokenizer `load_engine(args, ...)` would load (None: the model has none); a failure is one
    EngineLoadError."""
    from engine.engine import load_tokenizer  # imports JAX: after the cheap checks

    try:
        return load_tokenizer(args.model, args.tokenizer, args.load_format)
    except Exception as e:
        log.debug("tokenizer load failed", exc_info=True)
        raise EngineLoadError(f"cannot load model {args.model!r}: {e}") from None
