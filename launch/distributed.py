"""Multi-process (multi-host) runs for the entry points: `jax.distributed` start-up and one output writer.

Every process runs the same program over the global mesh (SPMD): the same input lines in the same order,
the same scheduling, the same compiled programs. Invariants:
- `initialize` runs before JAX touches a device. Explicit `--coordinator/--num-processes/--process-id`
  win; otherwise it auto-initialises where JAX can discover the cluster itself (a Cloud TPU VM, or
  `JAX_COORDINATOR_ADDRESS` set), and is a no-op for a plain single process.
- Results stay alone on stdout: once distributed, the C-level fd 1 (where collective libraries such as
  Gloo print connection chatter) goes to stderr, and Python's `sys.stdout` keeps the original stdout.
- Only process 0 writes the output; the others write to os.devnull. With --resume every process reads the
  answered keys after process 0 has repaired the file (a barrier), and all must agree on their number:
  the output must be on a filesystem every host sees.
- What a process derives from its own copy of the input (the batch job's sized context) is checked equal on
  every process (`check_same`) before any engine is built.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

from launch.batch_io import JobError, OutputWriter, answered_keys

log = logging.getLogger("launch.distributed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-process (auto-detected on Cloud TPU; explicit flags otherwise)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator, the same on every process")
    g.add_argument("--num-processes", type=int, help="processes in the job (one per host, usually)")
    g.add_argument("--process-id", type=int, help="this process's index in [0, num-processes)")


def initialize(args: argparse.Namespace) -> None:
    """Start `jax.distributed` from the flags, or by auto-detection where a cluster is discoverable."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise JobError("multi-process: give all of --coordinator HOST:PORT, --num-processes N and "
                           "--process-id I (0-based), or none of them")
        if not 0 <= args.process_id < args.num_processes:
            raise JobError(f"--process-id {args.process_id} is out of range for --num-processes "
                           f"{args.num_processes} (expected 0 .. {args.num_processes - 1})")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or importlib.util.find_spec("libtpu") is not None:
        jax.distributed.initialize()  # JAX discovers the TPU pod slice (or reads JAX_* variables)
    else:
        return
    _keep_stdout_for_results()
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _keep_stdout_for_results() -> None:
    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(results, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def output_writer(path: str, resume: bool, overwrite: bool) -> OutputWriter:
    """Process 0's real writer; the others' devnull writer that still knows the answered keys."""
    import jax

    if jax.process_count() == 1:
        return OutputWriter(path, resume=resume, overwrite=overwrite)
    from jax.experimental import multihost_utils

    writer = OutputWriter(path, resume=resume, overwrite=overwrite) if is_writer() else None
    multihost_utils.sync_global_devices("launch.distributed: output opened")
    if writer is None:
        writer = OutputWriter(os.devnull, resume=False, overwrite=True)
        writer.done = answered_keys(path) if resume and path != "-" else set()
    if resume:
        multihost_utils.assert_equal(len(writer.done), "processes disagree on the answered lines of "
                                     f"{path!r}: --resume needs it on a filesystem every host sees")
    return writer


def check_same(values: dict[str, int | None], what: str) -> None:
    """Every process must have the same `values` (ints or None; e.g. the engine options a process derived
    from its input): a JobError naming `what` otherwise, before any of them builds an engine."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    try:
        multihost_utils.assert_equal(np.asarray([-1 if v is None else v for v in values.values()]),
                                     f"processes disagree on {what} ({values} on process {jax.process_index()})")
    except AssertionError as e:
        raise JobError(str(e)) from None
