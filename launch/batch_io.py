"""Files of a batch job: the streamed input, and an output that survives crashes and can be resumed.

Invariants:
- The input is read one line at a time (never whole); blank lines are skipped but still counted, so a
  line's number (its default id) is its 0-based physical position in the file.
- Every output line is written whole and flushed at once. `--resume` truncates a torn last line (bytes
  after the last newline, left by a crash mid-write) and returns only the keys of the complete lines:
  memory grows with the number of ids, never with their outputs.
- Without --resume an existing non-empty output is never silently overwritten (--overwrite says so).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import IO

from launch.jsonl import key_of_output

CHUNK = 1 << 20  # bytes read per step while searching backwards for the last newline


class JobError(Exception):
    """A job-level failure (input, output or model unusable): one message, non-zero exit, no traceback."""


def default_output(input_path: str) -> str:
    stem = input_path[: -len(".jsonl")] if input_path.endswith(".jsonl") else input_path
    return stem + ".out.jsonl"


def open_input(path: str) -> IO[bytes]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise JobError(f"cannot read input {path!r}: {e.strerror or e}") from None
    if os.path.isdir(path):
        f.close()
        raise JobError(f"cannot read input {path!r}: it is a folder; expected a .jsonl file")
    return f


def input_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(0-based line number, raw bytes) of every non-blank line."""
    for line_no, raw in enumerate(f):
        if raw.strip():
            yield line_no, raw


def count_lines(path: str) -> int:
    """Non-blank lines (for the progress bar's total)."""
    count = 0
    with open(path, "rb") as f:
        for line in f:
            count += bool(line.strip())
    return count


def answered_keys(path: str) -> set[str]:
    """Truncate a torn last line of an existing output, then the keys of its complete lines."""
    if not os.path.exists(path):
        return set()
    _truncate_torn_tail(path)
    keys = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                keys.add(key_of_output(json.loads(raw)))
            except ValueError as e:
                raise JobError(f"cannot resume from {path!r}: line {number} is not an output line of this "
                               f"tool ({e}); fix or move the file") from None
    return keys


def _truncate_torn_tail(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        end = size
        while end > 0:
            start = max(0, end - CHUNK)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


def encode_line(obj: dict) -> bytes:
    """One output line: compact UTF-8 JSON and a newline (JSON escapes every newline inside it)."""
    try:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. in an id): \u-escapes round-trip it
        data = json.dumps(obj).encode("ascii")
    return data + b"\n"


class OutputWriter:
    """Appends JSON lines, each flushed as soon as it is written; `-` writes to stdout, os.devnull discards."""

    def __init__(self, path: str, resume: bool, overwrite: bool) -> None:
        self.path = path
        self.done: set[str] = set()
        self.discards = path == os.devnull  # a multi-process job's other processes: order is moot
        if path == "-":
            if resume:
                raise JobError("--resume needs an output file; it cannot continue a job written to stdout")
            self._file, self._owned = sys.stdout.buffer, False
            return
        if resume:
            self.done = answered_keys(path)
        elif os.path.exists(path) and os.path.getsize(path) > 0 and not overwrite:
            raise JobError(f"output {path!r} already exists; pass --resume to finish it or --overwrite to replace it")
        try:
            self._file, self._owned = open(path, "ab" if resume else "wb"), True
        except OSError as e:
            raise JobError(f"cannot write output {path!r}: {e.strerror or e}") from None

    @property
    def spill_dir(self) -> str | None:
        """Where results waiting for their turn may spill: the output's folder (None: the system's temp folder)."""
        return None if self.path == "-" or self.discards else os.path.dirname(os.path.abspath(self.path))

    def write_line(self, data: bytes) -> None:
        """Append one encoded line (`encode_line`) and flush it."""
        self._file.write(data)
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()
