"""Preemption and timed saves in real processes: two processes on loopback (jax.distributed, gloo) where only one
receives SIGTERM agree on the step to save and both exit 75; `--train.ckpt-every-minutes` saves by the clock."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from jaxlm.train import PREEMPTED_EXIT_CODE, TimedSaves
from tests.test_fault_tolerance import (  # noqa: F401  (workspace: the module's corpus fixture)
    assert_same_run, finish, launch, wait_for_step, workspace, write_experiment,
)
from tests.processes import process_env
from tests.test_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_pair(script, run_dir, *args):
    """Two processes of one run (2 CPU devices each), joined through a coordinator on a free local port."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = process_env(
        2, JAX_COMPILATION_CACHE_DIR=str(run_dir.parent / "jax_cache_pair"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return [
        subprocess.Popen(
            [sys.executable, str(script), "--train.out_dir", str(run_dir), "--mesh.coordinator-address", coordinator,
             "--mesh.num-processes", "2", "--mesh.process-id", str(i), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]


def finish_pair(pair, timeout=300):
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in pair:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in pair:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_in_both(workspace):
    script = write_experiment(workspace, "pair", steps=24, ckpt_every=100)
    reference = workspace / "pair_reference"
    for code, _, err in finish_pair(launch_pair(script, reference)):
        assert code == 0, err[-3000:]

    run_dir = workspace / "pair_preempted"
    rng = random.Random(11)
    pair = launch_pair(script, run_dir)
    wait_for_step(pair[0], run_dir, rng.randint(3, 12))
    time.sleep(rng.uniform(0.0, 0.3))
    pair[rng.randint(0, 1)].send_signal(signal.SIGTERM)
    results = finish_pair(pair)
    steps = []
    for code, _, err in results:
        assert code == PREEMPTED_EXIT_CODE, err[-3000:]
        message = err.strip().splitlines()[-1]
        assert message.startswith("SIGTERM: saved a checkpoint at step"), err[-3000:]
        steps.append(int(message.split("step ")[1].split()[0]))
    assert steps[0] == steps[1] < 24
    assert str(steps[0]) in os.listdir(run_dir / "checkpoints")

    resumed = finish_pair(launch_pair(script, run_dir))
    for code, out, err in resumed:
        assert code == 0, err[-3000:]
    assert f"from step {steps[0]}" in resumed[0][1]
    assert_same_run(run_dir, reference)


def test_timed_saves_follow_the_clock():
    now = [100.0]
    saves = TimedSaves(0.5, clock=lambda: now[0])
    assert not saves.due()
    now[0] += 29.0
    assert not saves.due()
    now[0] += 1.0
    assert saves.due()
    saves.saved()
    assert not saves.due()
    now[0] += 31.0
    assert saves.due()
    assert not TimedSaves(0.0, clock=lambda: now[0]).due()  # off


@pytest.mark.slow
def test_a_run_saves_by_the_clock_between_its_step_checkpoints(workspace):
    script = write_experiment(workspace, "timed", steps=16, ckpt_every=1000)
    plain, timed = workspace / "untimed", workspace / "timed"
    code, _, err = finish(launch(script, plain, "--train.keep-checkpoints", "100"))
    assert code == 0, err[-3000:]
    assert os.listdir(plain / "checkpoints") == ["16"]  # only the last step: the interval is never reached
    # 3 ms: most steps (with their metrics and saves) take longer, so most steps save.
    args = ("--train.keep-checkpoints", "100", "--train.ckpt-every-minutes", "0.00005")
    code, _, err = finish(launch(script, timed, *args))
    assert code == 0, err[-3000:]
    saved = sorted(int(n) for n in os.listdir(timed / "checkpoints"))
    assert len(saved) >= 8 and saved[0] == 1 and saved[-1] == 16, saved  # step 1 is due by its compilation
