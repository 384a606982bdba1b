"""Multi-process SPMD: two local processes (4 fake CPU devices each, `jax.distributed` over loopback) run
`python -m launch.batch` over one global data=2,model=4 mesh and write exactly what one process with 8
devices writes (short and prefill-heavy lines); only process 0 writes the output. The single process reads the HF safetensors folder, the
pair its orbax conversion (each process restoring only its own shards): one run covers both loaders."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch import distributed
from launch.batch_io import JobError
from tests.checkpoints import make_tiny_checkpoint
from weights import convert

REPO = Path(__file__).resolve().parents[1]
LINES = [
    {"prompt": "Hello world", "max_new_tokens": 8, "temperature": 0},
    {"prompt": "The quick brown fox", "max_new_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"prompt": "JAX is", "max_new_tokens": 10, "temperature": 0, "repetition_penalty": 1.2},
    {"prompt": "One two three", "max_new_tokens": 4, "temperature": 1.0, "top_k": 20, "seed": 11},
    {"prompt": "Sharding splits", "max_new_tokens": 7, "temperature": 0},
]
# Prefill-heavy: long prompts, two new tokens each; more lines than slots, so calls keep both data shards'
# prefill rows busy (each process prefills only its own slots' prompts).
LINES += [{"prompt": f"Line {i}: " + "the data axis splits prefill rows over hosts " * 2, "max_new_tokens": 2,
           "temperature": 0.7, "seed": i} for i in range(12)]
FLAGS = ["--max-slots", "8", "--max-seq-len", "32", "--decode-steps", "2", "--prefill-buckets", "16",
         "--mesh", "data=2,model=4", "--log-level", "INFO"]
TIMEOUT = 400


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"), seed=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, devices: int, out: Path) -> subprocess.Popen:
    """`launch.batch ARGS --output -`: results to OUT.jsonl (stdout), logs to OUT.log."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with open(out.with_suffix(".jsonl"), "wb") as stdout, open(out.with_suffix(".log"), "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "launch.batch", *map(str, args), "--output", "-"],
                                cwd=REPO, env=env, stdout=stdout, stderr=stderr)


def finish(procs: list[subprocess.Popen]) -> list[int]:
    try:
        return [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_write_exactly_what_one_process_writes(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    assert convert.main([str(tiny_model), str(tmp_path / "orbax")]) == 0
    port = free_port()
    procs = [start([prompts, "--model", tiny_model, *FLAGS], 8, tmp_path / "single")]
    procs += [start([prompts, "--model", tmp_path / "orbax", *FLAGS, "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", 2, "--process-id", i], 4, tmp_path / f"p{i}") for i in (0, 1)]
    codes = finish(procs)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("single", "p0", "p1")}
    assert codes == [0, 0, 0], logs
    assert "process 1 of 2: 4 local / 8 global devices" in logs["p1"]
    single = (tmp_path / "single.jsonl").read_text()
    assert [json.loads(x)["id"] for x in single.splitlines()] == list(range(len(LINES)))
    assert (tmp_path / "p0.jsonl").read_text() == single
    assert (tmp_path / "p1.jsonl").read_text() == ""  # only process 0 writes


def test_processes_that_size_the_context_differently_stop_before_building_an_engine(tiny_model, tmp_path):
    """Without --max-seq-len each process sizes the context from its own copy of the input
    (`launch.batch_context`): copies that differ are a job-level error on every process, not a hang."""
    port, procs = free_port(), []
    flags = [f for f in FLAGS if f not in ("--max-seq-len", "32")]
    for i, tokens in enumerate((10, 200)):  # 10 + 4 positions: 128; 200 + 4: 256
        (tmp_path / str(i)).mkdir()
        path = tmp_path / str(i) / "in.jsonl"
        path.write_text(json.dumps({"prompt_token_ids": [464] * tokens, "max_tokens": 4}) + "\n")
        procs.append(start([path, "--model", tiny_model, *flags, "--coordinator", f"127.0.0.1:{port}",
                            "--num-processes", 2, "--process-id", i], 4, tmp_path / f"p{i}"))
    assert finish(procs) == [1, 1]
    for i in (0, 1):
        log = (tmp_path / f"p{i}.log").read_text()
        assert "processes disagree on the context sized to the input" in log and "Traceback" not in log, log
        assert "loading" not in log  # no engine was built


@pytest.mark.parametrize("coordinator,num,pid,match", [
    ("127.0.0.1:1234", None, None, "give all of --coordinator HOST:PORT, --num-processes N and --process-id I"),
    (None, 2, 0, "give all of"),
    ("127.0.0.1:1234", 2, 2, r"--process-id 2 is out of range for --num-processes 2 \(expected 0 .. 1\)")])
def test_incomplete_distributed_flags_fail_before_starting(coordinator, num, pid, match):
    args = argparse.Namespace(coordinator=coordinator, num_processes=num, process_id=pid)
    with pytest.raises(JobError, match=match):
        distributed.initialize(args)


def test_flags_are_on_the_batch_cli():
    from launch.batch import build_parser

    args = build_parser().parse_args(["in.jsonl", "--coordinator", "10.0.0.1:8476", "--num-processes", "4",
                                      "--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:8476", 4, 3)
