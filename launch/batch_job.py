"""The batch loop: stream lines into the engine, keep its slots full, write results in input order.

Each round: (1) read lines while the engine holds fewer than `max_in_flight` unfinished requests (a line
of n samples counts n); validate each fully and queue its requests, or turn it into an error result at
once; (2) run one `engine.step()`; (3) hand every line whose requests all finished to the `InOrderWriter`,
which writes it at once if every earlier line is written, else keeps it (in memory up to
`max_buffered_bytes`, then in a spill file) until they are. New requests are queued while slots are busy,
so a slot freed by a finished request is refilled by the next step (continuous batching), and a long line
at the head delays only the writing of the lines after it, never their admission.

Invariants:
- Exactly one output line per non-blank input line not already answered, in input order.
- At most `max_in_flight` requests are in the engine; finished outputs waiting for an earlier line take at
  most `max_buffered_bytes` of memory (the rest spill to disk). Ids are remembered (to skip answered lines
  on --resume and to reject a repeated id); outputs leave memory once written or spilled.
- A bad line becomes an error result, and so does a line whose request failed while running (its error
  says so; the engine serves the other lines on); only an engine that cannot run at all propagates.
- Admission depends only on the input and the engine's state, never on what waits to be written, so every
  process of a multi-process job (only process 0 writes) admits the same lines at the same steps.
- Counts (`Stats`, the progress bar) move when a line is answered, written or still waiting its turn.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator

from engine.requests import RequestError, completion_of
from engine.sampling import SamplingParams
from engine.scheduler import Request
from launch.batch_io import OutputWriter, encode_line
from launch.batch_order import InOrderWriter, OrderStats
from launch.jsonl import Job, Line, native_error, native_job, native_output, read_line
from launch.openai_batch import openai_error, openai_job, openai_output

DEFAULT_BUFFERED_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class JobOptions:
    defaults: SamplingParams  # every line's parameters before its own overrides
    base_seed: int | None  # lines without a seed get one derived from this and their id
    max_in_flight: int  # unfinished requests in the engine at once
    model_name: str  # reported in OpenAI responses
    max_buffered_bytes: int = DEFAULT_BUFFERED_BYTES  # finished outputs held in memory for their turn


@dataclasses.dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0  # engine steps run
    slot_steps: int = 0  # sum over steps of the slots filled as each began
    order: OrderStats = dataclasses.field(default_factory=OrderStats)
    # Prefix reuse (engine.prefix_cache): prompt tokens admitted, of those reused (forked or copied from
    # cached blocks), and the blocks cached at the end.
    prefix_queried: int = 0
    prefix_reused: int = 0
    cached_blocks: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def busy_slots(self) -> float:
        """Mean slots filled per engine step (each step first fills free slots from the queue)."""
        return self.slot_steps / max(self.steps, 1)

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def summary(self) -> str:
        s = self.elapsed
        return (f"lines: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already answered) | "
                f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated | wall {s:.1f} s | "
                f"{self.generated_tokens / s:.1f} generated tokens/s, {(self.ok + self.failed) / s:.2f} lines/s, "
                f"{self.busy_slots:.1f} busy slots per step | "
                f"waiting for an earlier line: at most {self.order.peak_waiting} lines, "
                f"{self.order.spilled_lines} spilled ({self.order.spilled_bytes / 2**20:.1f} MiB) | "
                f"prefix cache: {self.hit_rate:.0%} of prompt tokens reused, {self.cached_blocks} blocks cached")

    @property
    def hit_rate(self) -> float:
        return self.prefix_reused / self.prefix_queried if self.prefix_queried else 0.0


@dataclasses.dataclass
class _Running:
    position: int  # in the InOrderWriter
    line: Line
    requests: list[Request]

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.requests)


class BatchJob:
    def __init__(self, engine, writer: OutputWriter, options: JobOptions, progress=None) -> None:
        self.engine, self.options, self.progress = engine, options, progress
        self.stats = Stats()
        self.ordered = InOrderWriter(writer, options.max_buffered_bytes, self.stats.order)
        self._answered = writer.done  # keys in the output before this run (read-only)
        self._seen: set[str] = set()  # keys admitted in this run
        self._running: list[_Running] = []  # admitted lines with a request still in the engine
        self._in_engine = 0  # their requests
        self._next: tuple[int, Job] | None = None  # read and valid, waiting for room in the engine
        self._prefix = engine.scheduler.prefix_stats  # the engine's counters before this job

    def run(self, lines: Iterable[tuple[int, bytes]]) -> Stats:
        source, more = iter(lines), True
        try:
            while more or self._running:
                more = more and self._fill(source)
                if self._running:
                    self._step()
                    self._collect()
            if self.ordered.waiting:
                raise RuntimeError(f"batch loop: {self.ordered.waiting} answered lines were never written")
        finally:
            self.ordered.close()
        queried, reused, self.stats.cached_blocks = self.engine.scheduler.prefix_stats
        self.stats.prefix_queried, self.stats.prefix_reused = queried - self._prefix[0], reused - self._prefix[1]
        return self.stats

    def _fill(self, source: Iterator[tuple[int, bytes]]) -> bool:
        """Queue lines while the engine has room for their requests; False once the input is exhausted."""
        while self._in_engine < self.options.max_in_flight:
            if self._next is None:
                item = next(source, None)
                if item is None:
                    return False
                self._next = self._read(*item)
                continue
            position, job = self._next
            if self._in_engine + job.params.n > self.options.max_in_flight:
                break
            self._next = None
            self._start(position, job)
        return True

    def _read(self, line_no: int, raw: bytes) -> tuple[int, Job] | None:
        """A valid line's position and job; None for a line already answered or answered with an error."""
        line = read_line(raw, line_no)
        if line.key in self._answered:
            self.stats.skipped += 1
            self._advance(1)
            return None
        position = self.ordered.reserve()
        try:
            if line.problem is not None:
                raise ValueError(line.problem)
            if line.key in self._seen:
                raise ValueError(f"{'custom_id' if line.openai else 'id'}: {line.ident!r} repeats an earlier "
                                 f"line's; ids must be unique")
            self._seen.add(line.key)
            return position, self._validate(line)
        except (ValueError, TypeError) as e:  # TypeError: a JSON type no check anticipated; still the line's fault
            self._answer(position, self._error(line, str(e)))
            return None

    def _start(self, position: int, job: Job) -> None:
        try:
            requests = self._queue(job)
        except (ValueError, TypeError) as e:
            self._answer(position, self._error(job.line, str(e)))
            return
        self._running.append(_Running(position, job.line, requests))
        self._in_engine += len(requests)

    @staticmethod
    def _error(line: Line, message: str) -> dict:
        return openai_error(line, message) if line.openai else native_error(line, message)

    def _validate(self, line: Line) -> Job:
        make = openai_job if line.openai else native_job
        job = make(line, self.options.defaults, self.options.base_seed)
        if job.params.n > self.options.max_in_flight:
            raise ValueError(f"n: {job.params.n} samples exceed --max-in-flight {self.options.max_in_flight}; "
                             f"lower n or raise --max-in-flight")
        if isinstance(job.prompt, str) and self.engine.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer (give one with --tokenizer); "
                             "send token ids in 'prompt_token_ids' instead")
        return job

    def _queue(self, job: Job) -> list[Request]:
        requests = self.engine.requests.make(job.prompt, job.params, request_id=str(job.line.line_no))
        added = []
        try:
            for req in requests:
                self.engine.add_request(req)
                added.append(req)
        except ValueError:
            for req in added:
                self.engine.scheduler.abort(req.request_id)
            raise
        return requests

    def _collect(self) -> None:
        """Answer every line whose requests all finished; the others stay running."""
        running = []
        for entry in self._running:
            if entry.done:
                self._in_engine -= len(entry.requests)
                self._answer(entry.position, self._output_or_error(entry))
            else:
                running.append(entry)
        self._running = running

    def _answer(self, position: int, output: dict) -> None:
        if output.get("error") is not None:
            self.stats.failed += 1
        else:
            self.stats.ok += 1
        self.ordered.put(position, encode_line(output))
        self._advance(1)

    def _output_or_error(self, entry: _Running) -> dict:
        line = entry.line
        try:
            failed = [r.error for r in entry.requests if r.finish_reason == "error"]
            if failed:
                raise RequestError(failed[0])
            return self._result(entry)
        except Exception as e:  # the line's request failed while running, or building its output did
            message = f"internal error: {type(e).__name__}: {e}"
            return openai_error(line, message, "server_error") if line.openai else native_error(line, message)

    def _result(self, entry: _Running) -> dict:
        tokenizer = self.engine.tokenizer
        completions = [completion_of(r, tokenizer) for r in entry.requests]
        self.stats.prompt_tokens += len(completions[0].prompt_token_ids)
        if entry.line.openai:
            return openai_output(entry.line, completions, self.options.model_name, tokenizer)
        return native_output(entry.line, completions, has_text=tokenizer is not None, tokenizer=tokenizer)

    def _step(self) -> None:
        if not self.engine.scheduler.has_work():
            raise RuntimeError("batch loop: a running line is unfinished but the engine has no work left")
        queued = self.engine.scheduler.num_waiting + self.engine.scheduler.num_live
        self.stats.steps += 1
        self.stats.slot_steps += min(queued, self.engine.scheduler.config.max_slots)
        updates = self.engine.step()
        self.stats.generated_tokens += sum(len(u.new_token_ids) for u in updates)
        if self.progress is not None:
            rate = self.stats.generated_tokens / self.stats.elapsed
            self.progress.set_postfix_str(f"{rate:.1f} tok/s, {self.ordered.waiting} waiting for an earlier line",
                                          refresh=False)

    def _advance(self, lines: int) -> None:
        if self.progress is not None:
            self.progress.update(lines)
