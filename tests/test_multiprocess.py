"""Real multi-process runs on one machine: processes started here, joined by jax.distributed on 127.0.0.1.

Each worker (tests/_multiprocess_worker.py) is a fresh Python with its own CPU devices; CPU processes exchange
data through gloo. Every subprocess has a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests._multiprocess_worker import train_steps
from tests.processes import process_env

pytestmark = pytest.mark.slow  # real processes joined by jax.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_multiprocess_worker.py")
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, args: dict, devices: int) -> subprocess.Popen:
    env = process_env(devices)
    return subprocess.Popen(
        [sys.executable, WORKER, mode, json.dumps(args)], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; all are killed if any outlives the timeout."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def test_two_processes_log_the_losses_of_one_process_with_four_devices():
    mesh, steps = [1, 2, 2], 3  # fsdp across the two processes, tensor within each
    coordinator = f"127.0.0.1:{free_port()}"
    pair = [
        start("train", dict(mesh=mesh, steps=steps, coordinator=coordinator, num_processes=2, process_id=i,
                            init_timeout_s=TIMEOUT_S), devices=2)
        for i in range(2)
    ]
    # The reference, one process with four devices, is not about processes: it runs here, on 4 of the session's 8
    # devices, while the pair runs.
    try:
        single = train_steps(dict(mesh=mesh, steps=steps, devices=4))
    finally:
        results = finish(pair)
    for status, out, err in results:
        assert status == 0, err[-3000:]
    rows = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results] + [single]
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in rows] == [
        (0, 2, 4, 2), (1, 2, 4, 2), (0, 1, 4, 4)
    ]
    reference = rows[2]
    assert len(reference["losses"]) == steps and abs(reference["losses"][0] - np.log(64)) < 0.05
    for row in rows[:2]:
        np.testing.assert_allclose(row["losses"], reference["losses"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(row["param_abs_sums"], reference["param_abs_sums"], rtol=1e-5, atol=1e-6)


def test_a_coordinator_that_never_comes_up_ends_every_process_with_one_line_and_status_2(tmp_path):
    # Process 1 of a job whose coordinator (process 0) never starts: nothing ever answers at its address. And
    # process 0 of another job, which starts the coordinator and waits for a process 1 that never comes. Both
    # go through jaxlm.cli.run, as `python -m experiments.<name>` would.
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    processes = [
        start("cli", dict(coordinator=address, num_processes=2, process_id=i, init_timeout_s=2,
                          out_dir=str(tmp_path / f"run{i}")), devices=1)
        for i, address in zip((1, 0), addresses)
    ]
    began = time.monotonic()
    results = finish(processes, timeout=60)
    assert time.monotonic() - began < 45
    for (status, out, err), address in zip(results, addresses):
        lines = err.strip().splitlines()
        assert status == 2, err[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: process ") and address in lines[0], err
    assert not any(tmp_path.iterdir())  # refused before anything was written
