"""The batch loop: stream lines into the engine, keep its slots full, write results in input order.

Each round: (1) read lines until `max_in_flight` lines are pending (queued, running, or finished but
waiting behind an earlier line); validate each fully and queue its n requests, or turn it into an error
result at once; (2) write and flush every finished line at the head of the pending queue; (3) run one
`engine.step()`. New requests are queued while slots are busy, so a slot freed by a finished request is
refilled by the next step (continuous batching).

Invariants:
- Exactly one output line per non-blank input line not already answered, in input order.
- At most `max_in_flight` lines are held in memory; ids are remembered (to skip answered lines on
  --resume and to reject a repeated id), outputs are not.
- A bad line becomes an error result, and so does a line whose request failed while running (its error
  says so; the engine serves the other lines on); only an engine that cannot run at all propagates.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable

from engine.requests import RequestError, completion_of
from engine.sampling import SamplingParams
from engine.scheduler import Request
from launch.batch_io import OutputWriter
from launch.jsonl import Job, Line, native_error, native_job, native_output, read_line
from launch.openai_batch import openai_error, openai_job, openai_output


@dataclasses.dataclass(frozen=True)
class JobOptions:
    defaults: SamplingParams  # every line's parameters before its own overrides
    base_seed: int | None  # lines without a seed get one derived from this and their id
    max_in_flight: int
    model_name: str  # reported in OpenAI responses


@dataclasses.dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Prefix reuse (engine.prefix_cache): prompt tokens admitted, of those reused (forked or copied from
    # cached blocks), and the blocks cached at the end.
    prefix_queried: int = 0
    prefix_reused: int = 0
    cached_blocks: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def summary(self) -> str:
        s = self.elapsed
        return (f"lines: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already answered) | "
                f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated | wall {s:.1f} s | "
                f"{self.generated_tokens / s:.1f} generated tokens/s, {(self.ok + self.failed) / s:.2f} lines/s | "
                f"prefix cache: {self.hit_rate:.0%} of prompt tokens reused, {self.cached_blocks} blocks cached")

    @property
    def hit_rate(self) -> float:
        return self.prefix_reused / self.prefix_queried if self.prefix_queried else 0.0


@dataclasses.dataclass
class _Pending:
    line: Line
    requests: list[Request]
    output: dict | None = None  # set at once for a bad line

    @property
    def done(self) -> bool:
        return self.output is not None or all(r.finished for r in self.requests)


class BatchJob:
    def __init__(self, engine, writer: OutputWriter, options: JobOptions, progress=None) -> None:
        self.engine, self.writer, self.options, self.progress = engine, writer, options, progress
        self.stats = Stats()
        self._answered = writer.done  # keys in the output before this run (read-only)
        self._seen: set[str] = set()  # keys admitted in this run
        self._prefix = engine.scheduler.prefix_stats  # the engine's counters before this job

    def run(self, lines: Iterable[tuple[int, bytes]]) -> Stats:
        pending: deque[_Pending] = deque()
        source, more = iter(lines), True
        while more or pending:
            while more and len(pending) < self.options.max_in_flight:
                item = next(source, None)
                more = item is not None
                entry = self._admit(*item) if more else None
                if entry is not None:
                    pending.append(entry)
            self._write_ready(pending)
            if pending:
                self._step()
        queried, reused, self.stats.cached_blocks = self.engine.scheduler.prefix_stats
        self.stats.prefix_queried, self.stats.prefix_reused = queried - self._prefix[0], reused - self._prefix[1]
        return self.stats

    def _admit(self, line_no: int, raw: bytes) -> _Pending | None:
        """A pending entry for one line: queued requests or an error; None if already answered."""
        line = read_line(raw, line_no)
        if line.key in self._answered:
            self.stats.skipped += 1
            self._advance(1)
            return None
        try:
            if line.problem is not None:
                raise ValueError(line.problem)
            if line.key in self._seen:
                raise ValueError(f"{'custom_id' if line.openai else 'id'}: {line.ident!r} repeats an earlier "
                                 f"line's; ids must be unique")
            self._seen.add(line.key)
            return _Pending(line, self._queue(self._validate(line)))
        except (ValueError, TypeError) as e:  # TypeError: a JSON type no check anticipated; still the line's fault
            error = openai_error(line, str(e)) if line.openai else native_error(line, str(e))
            return _Pending(line, [], error)

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

    def _write_ready(self, pending: deque[_Pending]) -> None:
        while pending and pending[0].done:
            entry = pending.popleft()
            if entry.output is None:
                entry.output = self._output_or_error(entry)
            if "error" in entry.output and entry.output["error"] is not None:
                self.stats.failed += 1
            else:
                self.stats.ok += 1
            self.writer.write(entry.output)
            self._advance(1)

    def _output_or_error(self, entry: _Pending) -> dict:
        line = entry.line
        try:
            failed = [r.error for r in entry.requests if r.finish_reason == "error"]
            if failed:
                raise RequestError(failed[0])
            return self._result(entry)
        except Exception as e:  # the line's request failed while running, or building its output did
            message = f"internal error: {type(e).__name__}: {e}"
            return openai_error(line, message, "server_error") if line.openai else native_error(line, message)

    def _result(self, entry: _Pending) -> dict:
        tokenizer = self.engine.tokenizer
        completions = [completion_of(r, tokenizer) for r in entry.requests]
        self.stats.prompt_tokens += len(completions[0].prompt_token_ids)
        if entry.line.openai:
            return openai_output(entry.line, completions, self.options.model_name, tokenizer)
        return native_output(entry.line, completions, has_text=tokenizer is not None, tokenizer=tokenizer)

    def _step(self) -> None:
        if not self.engine.scheduler.has_work():
            raise RuntimeError("batch loop: a pending line is unfinished but the engine has no work left")
        updates = self.engine.step()
        self.stats.generated_tokens += sum(len(u.new_token_ids) for u in updates)
        if self.progress is not None:
            rate = self.stats.generated_tokens / self.stats.elapsed
            self.progress.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)

    def _advance(self, lines: int) -> None:
        if self.progress is not None:
            self.progress.update(lines)
