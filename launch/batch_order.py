"""Results written in input order while lines finish in any order, in bounded memory.

`BatchJob` takes a position for each line as it reads it (`reserve`) and hands over the line's encoded
output when the line finishes (`put`). A line whose turn has come is written at once, then every finished
line after it. A finished line that waits behind an unfinished one is held in memory while the held
outputs stay within `max_buffered_bytes`; past that it is appended to a spill file, an unnamed temporary
file in the output's folder (the OS removes it when the job ends, also on kill -9), and copied from there
to the output when its turn comes. The spill file is emptied whenever no line is waiting.

Invariants:
- Each position's bytes reach the output exactly once, in position order, each line written whole and
  flushed (`OutputWriter.write_line`). Held and spilled lines are not yet in the output, so after a crash
  `--resume` answers them again; no later run ever reads a spill file.
- Memory: the held outputs (at most `max_buffered_bytes`) plus 8 bytes per position between the oldest
  unwritten line and the newest line read (where its output waits).
- A writer that discards everything (`OutputWriter.discards`: the non-writing processes of a
  multi-process job) gets each line as it finishes; nothing is held or spilled.
"""
from __future__ import annotations

import array
import dataclasses
import logging
import tempfile
from typing import IO

from launch.batch_io import OutputWriter

log = logging.getLogger(__name__)

UNFINISHED, HELD = -1, -2  # markers in the per-position table; a value >= 0 is an offset in the spill file
COMPACT_AFTER = 4096  # written positions dropped from the table's front once this many have piled up


@dataclasses.dataclass
class OrderStats:
    peak_waiting: int = 0  # most finished lines waiting for an earlier one at once
    spilled_lines: int = 0
    spilled_bytes: int = 0


class InOrderWriter:
    def __init__(self, writer: OutputWriter, max_buffered_bytes: int, stats: OrderStats | None = None) -> None:
        self.writer, self.max_buffered_bytes = writer, max_buffered_bytes
        self.stats = stats if stats is not None else OrderStats()
        self._where = array.array("q")  # per position from self._first: UNFINISHED, HELD or a spill offset
        self._first = 0  # the position of self._where[0]
        self._head = 0  # the next position to write
        self._held: dict[int, bytes] = {}
        self._held_bytes = 0
        self._waiting = 0  # finished lines not yet written (held or spilled)
        self._spill: IO[bytes] | None = None
        self._spill_end = 0  # bytes in the spill file

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def reserve(self) -> int:
        """The position of the next line read (positions count from 0 in reading order)."""
        self._where.append(UNFINISHED)
        return self._first + len(self._where) - 1

    def put(self, position: int, data: bytes) -> None:
        """A reserved line's output: written now if its turn has come, else kept until it has."""
        if self.writer.discards:
            self.writer.write_line(data)
            return
        if position != self._head:
            self._keep(position, data)
            return
        self.writer.write_line(data)
        self._head += 1
        self._drain()

    def _keep(self, position: int, data: bytes) -> None:
        index = position - self._first
        if self._where[index] != UNFINISHED:
            raise ValueError(f"position {position}: already has an output; each line is answered once")
        if self._held_bytes + len(data) <= self.max_buffered_bytes:
            self._held[position] = data
            self._held_bytes += len(data)
            self._where[index] = HELD
        else:
            self._where[index] = self._append_spill(data)
        self._waiting += 1
        self.stats.peak_waiting = max(self.stats.peak_waiting, self._waiting)

    def _append_spill(self, data: bytes) -> int:
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(dir=self.writer.spill_dir, prefix=".batch-spill-")
            log.info("finished lines waiting behind an unfinished one exceed --max-buffered-bytes %d; "
                     "spilling them to an unnamed temporary file in %s", self.max_buffered_bytes,
                     self.writer.spill_dir or tempfile.gettempdir())
        offset = self._spill_end
        self._spill.seek(offset)
        self._spill.write(data)
        self._spill_end += len(data)
        self.stats.spilled_lines += 1
        self.stats.spilled_bytes += len(data)
        return offset

    def _drain(self) -> None:
        """Write every finished line from the head on, up to the first unfinished one."""
        while self._head - self._first < len(self._where):
            where = self._where[self._head - self._first]
            if where == UNFINISHED:
                break
            self.writer.write_line(self._take(where))
            self._waiting -= 1
            self._head += 1
        self._compact()

    def _take(self, where: int) -> bytes:
        if where == HELD:
            data = self._held.pop(self._head)
            self._held_bytes -= len(data)
            return data
        self._spill.seek(where)
        return self._spill.readline()  # one output line: JSON holds no raw newline

    def _compact(self) -> None:
        written = self._head - self._first
        if written >= COMPACT_AFTER and 2 * written >= len(self._where):
            del self._where[:written]
            self._first = self._head
        if self._waiting == 0 and self._spill_end > 0:
            self._spill.truncate(0)
            self._spill_end = 0

    def close(self) -> None:
        """Drop the spill file (what it still holds is answered again by --resume)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
