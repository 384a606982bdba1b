"""Batch admission bounded by unfinished work: `InOrderWriter` alone (no model), `BatchJob` on the tiny engine
(a long line at the head must not stop admission; spilling changes no output), and `launch.batch` killed
while finished lines sit in its spill file (--resume answers each line once, in order)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from engine.sampling import SamplingParams
from launch.batch_io import OutputWriter, encode_line
from launch.batch_job import BatchJob, JobOptions
from launch.batch_order import InOrderWriter
from tests.test_batch_cli import ENGINE_FLAGS, REPO, command, complete_lines, greedy, read_jsonl, run_batch, write_jsonl


def line(i: int, size: int = 0) -> bytes:
    return encode_line({"id": i, "text": "x" * size})


def put_shuffled(ordered: InOrderWriter, count: int, seed: int, watch=None) -> None:
    positions = [ordered.reserve() for _ in range(count)]
    random.Random(seed).shuffle(positions)
    for p in positions:
        ordered.put(p, line(p, size=p % 7))
        if watch is not None:
            watch(ordered)


@pytest.mark.parametrize("budget", [0, 200, 1 << 20])
@pytest.mark.parametrize("compact_after", [8, 4096])
def test_any_finish_order_is_written_once_in_order_within_the_budget(tmp_path, monkeypatch, budget, compact_after):
    monkeypatch.setattr("launch.batch_order.COMPACT_AFTER", compact_after)  # 8: the table's front is dropped often
    out = tmp_path / "out.jsonl"
    writer = OutputWriter(str(out), resume=False, overwrite=False)
    ordered = InOrderWriter(writer, budget)
    held = []
    put_shuffled(ordered, 500, seed=budget, watch=lambda o: held.append(o.held_bytes))
    ordered.close()
    writer.close()
    assert out.read_bytes() == b"".join(line(i, size=i % 7) for i in range(500))
    assert max(held) <= budget and ordered.waiting == 0
    assert (ordered._first > 0) == (compact_after == 8)  # written positions left the table
    stats = ordered.stats
    assert stats.peak_waiting > 100  # a random order keeps many lines waiting
    assert (stats.spilled_lines > 0) == (budget < 1 << 20)
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # the spill file never had a name


def test_spill_file_sits_next_to_the_output_and_is_emptied_when_nothing_waits(tmp_path):
    writer = OutputWriter(str(tmp_path / "out.jsonl"), resume=False, overwrite=False)
    ordered = InOrderWriter(writer, 0)
    first, second, third = (ordered.reserve() for _ in range(3))
    ordered.put(second, line(second, 100))
    spill = ordered._spill
    spill.flush()
    assert os.path.dirname(os.path.realpath(f"/proc/self/fd/{spill.fileno()}")) == str(tmp_path.resolve())
    assert os.fstat(spill.fileno()).st_nlink == 0 and os.fstat(spill.fileno()).st_size > 100
    ordered.put(first, line(first))
    assert os.fstat(spill.fileno()).st_size == 0  # every waiting line written: the spill file is empty
    ordered.put(third, line(third))
    ordered.close()
    writer.close()
    assert [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_stuck_head_keeps_memory_at_8_bytes_a_waiting_line(tmp_path):
    import tracemalloc

    writer = OutputWriter(str(tmp_path / "out.jsonl"), resume=False, overwrite=False)
    ordered = InOrderWriter(writer, 0)
    stuck, count = ordered.reserve(), 100_000
    tracemalloc.start()
    for _ in range(count):
        ordered.put(ordered.reserve(), line(1, size=40))  # ~60 bytes each: 6 MB of output behind the head
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ordered.waiting == count and ordered.held_bytes == 0 and ordered.stats.spilled_bytes > 5 << 20
    assert peak < 8 * count + (1 << 20)  # the position table, plus the spill file's write buffer
    ordered.put(stuck, line(0))
    ordered.close()
    writer.close()
    assert (tmp_path / "out.jsonl").stat().st_size == len(line(0)) + ordered.stats.spilled_bytes


def test_a_discarding_writer_holds_nothing(tmp_path):
    writer = OutputWriter(os.devnull, resume=False, overwrite=True)
    ordered = InOrderWriter(writer, 0)
    put_shuffled(ordered, 50, seed=1)
    assert ordered.waiting == 0 and ordered.stats.spilled_lines == 0 and ordered._spill is None


def test_a_position_is_answered_once(tmp_path):
    ordered = InOrderWriter(OutputWriter(str(tmp_path / "o.jsonl"), resume=False, overwrite=False), 1 << 10)
    ordered.reserve(), ordered.reserve()
    ordered.put(1, line(1))
    with pytest.raises(ValueError, match="position 1: already has an output"):
        ordered.put(1, line(1))


class Watched:
    """The engine, recording how many requests it holds (queued or in a slot) when each step starts."""

    def __init__(self, engine) -> None:
        self.engine, self.in_engine = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def step(self):
        scheduler = self.engine.scheduler
        self.in_engine.append(scheduler.num_waiting + scheduler.num_live)
        return self.engine.step()


def ids_line(ident, tokens: int, **extra) -> bytes:
    obj = {"id": ident, "prompt_token_ids": [464, 2068, 7586], "max_tokens": tokens, "temperature": 0,
           "ignore_eos": True, **extra}
    return json.dumps(obj).encode()


def run_job(engine, path: Path, raw_lines: list[bytes], max_in_flight: int, budget: int, resume: bool = False):
    writer = OutputWriter(str(path), resume=resume, overwrite=True)
    options = JobOptions(SamplingParams(), 7, max_in_flight, "tiny", budget)
    try:
        stats = BatchJob(engine, writer, options).run(enumerate(raw_lines))
    finally:
        writer.close()
    return stats, [json.loads(x) for x in path.read_text().splitlines()]


def test_a_long_line_at_the_head_does_not_stop_admission(tiny_engine, tmp_path):
    slots = tiny_engine.engine_config.max_slots
    lines = [ids_line("long", 96)] + [ids_line(f"s{i}", 4) for i in range(12)]
    engine = Watched(tiny_engine)
    stats, outputs = run_job(engine, tmp_path / "out.jsonl", lines, max_in_flight=slots, budget=0)
    assert [o["id"] for o in outputs] == ["long"] + [f"s{i}" for i in range(12)]
    assert len(outputs[0]["token_ids"]) == 96 and all(len(o["token_ids"]) == 4 for o in outputs[1:])
    # Every step until the last short line has been admitted runs with every slot's worth of requests:
    # the short lines that finish behind the unfinished head wait on disk, not in the engine's budget.
    steps_while_admitting = engine.in_engine[: engine.in_engine.index(min(engine.in_engine))]
    assert len(steps_while_admitting) >= 6 and set(steps_while_admitting) == {slots}
    assert stats.order.peak_waiting == 12 and stats.order.spilled_lines == 12
    assert (stats.ok, stats.failed) == (13, 0)


def mixed_lines() -> list[bytes]:
    lines = [ids_line("head", 40)]
    for i in range(10):
        lines.append(ids_line(f"g{i}", 2 + i % 3))
        if i % 3 == 0:
            lines.append(ids_line(f"n{i}", 3, n=2, temperature=0.8))  # n > 1: one line, two requests
        if i % 4 == 1:
            lines.append(b'{"id": "bad%d", "prompt": "x", "top_p": 2}' % i)  # an error line, answered at once
    return lines


def test_spilling_changes_no_output_and_resume_answers_the_rest_once(tiny_engine, tmp_path):
    lines = mixed_lines()
    _, kept = run_job(tiny_engine, tmp_path / "mem.jsonl", lines, max_in_flight=3, budget=1 << 30)
    stats, spilled = run_job(tiny_engine, tmp_path / "spill.jsonl", lines, max_in_flight=3, budget=300)
    assert spilled == kept and [o["id"] for o in kept] == [json.loads(x)["id"] for x in lines]
    assert stats.order.spilled_lines > 0 and stats.failed == 3 and stats.ok == len(lines) - 3
    partial = tmp_path / "partial.jsonl"  # a crash that left 5 lines written (the rest held or spilled)
    partial.write_bytes(b"".join(encode_line(o) for o in kept[:5]))
    stats, resumed = run_job(tiny_engine, partial, lines, max_in_flight=3, budget=0, resume=True)
    assert resumed == kept and stats.skipped == 5


def test_resume_after_kill_9_while_lines_are_spilled(tmp_path, batch_model, batch_env):
    lines = [greedy("a", "First", 2), greedy("head", "A long one", 100, ignore_eos=True), "not json",
             {"id": "n2", "prompt": "Two samples", "n": 2, "max_tokens": 3, "seed": 5},
             *(greedy(f"s{i}", f"Short {i}", 3) for i in range(24))]
    path = write_jsonl(tmp_path / "jobs.jsonl", lines)
    reference = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS, "--output", "-")
    assert reference.returncode == 0, reference.stderr
    victim = subprocess.Popen(command(path, "--model", batch_model, *ENGINE_FLAGS, "--max-buffered-bytes", "0"),
                              cwd=REPO, env=batch_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for message in victim.stderr:  # the first spilled line is logged: kill the job right then
        if "spilling" in message:
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it spilled"
    out = tmp_path / "jobs.out.jsonl"
    written = complete_lines(out)
    assert written < len(lines) and sorted(os.listdir(tmp_path)) == ["jobs.jsonl", "jobs.out.jsonl"]
    resumed = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS, "--resume", "--max-buffered-bytes", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(lines) - written - 1} ok, 1 failed, {written} skipped" in resumed.stderr
    assert read_jsonl(out) == [json.loads(x) for x in reference.stdout.splitlines()]  # once each, in order
