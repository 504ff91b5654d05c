"""Killed, preempted and misconfigured runs, in real processes: exact resume, safe saves, clear refusals."""

import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import load_params
from jaxlm.cli import run
from tests.devices import use_first_devices
from tests.processes import process_env

pytestmark = pytest.mark.slow  # real processes, killed and restarted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT_MODULE = '''
import sys
from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig

EXPERIMENT = Experiment(
    name="ft",
    model=ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=2, vocab_size=264, max_seq_len=32, dropout=0.1),
    data=DataConfig(source="text:{corpus}", tokenizer="byte", seq_len=16, batch_size=8, cache_dir="{cache}",
                    val_fraction=0.2),
    optim=OptimConfig(lr=3e-3, warmup_steps=3),
    train=TrainConfig(steps={steps}, eval_every=1000, eval_steps=1, ckpt_every={ckpt_every}, log_every=1,
                      samples=0, keep_checkpoints=2),
)

if __name__ == "__main__":
    run(EXPERIMENT)
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(["spam", "eggs", "ham", "\n", "(x)"], 300)))
    return root


def write_experiment(workspace, name, steps=24, ckpt_every=4):
    path = workspace / f"{name}.py"
    path.write_text(EXPERIMENT_MODULE.format(
        corpus=workspace / "corpus" / "*.txt", cache=workspace / "cache", steps=steps, ckpt_every=ckpt_every
    ))
    return path


def launch(script, run_dir, *args):
    # The runs of a module share JAX's compilation cache: a restart loads its steps instead of compiling them
    # again (a third of this file's time). A cache entry cut short by a kill is only warned about and recompiled.
    env = process_env(
        JAX_COMPILATION_CACHE_DIR=str(run_dir.parent / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return subprocess.Popen(
        [sys.executable, str(script), "--train.out_dir", str(run_dir), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def logged_step(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
    return max(steps, default=0)


def wait_for_step(proc, run_dir, step, timeout=240):
    deadline = time.time() + timeout
    while logged_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


STEPS = 36


@pytest.fixture(scope="module")
def reference(workspace):
    """The same run left alone (36 steps: room for a SIGTERM after two kills, whose steps run fast)."""
    script = write_experiment(workspace, "exp", steps=STEPS)
    run_dir = workspace / "reference"
    code, _, err = finish(launch(script, run_dir))
    assert code == 0, err[-3000:]
    return script, run_dir


def assert_same_run(run_dir, reference_dir):
    assert losses(run_dir) == losses(reference_dir)  # every logged step, exactly
    _, params = load_params(str(run_dir))
    _, want = load_params(str(reference_dir))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise


def test_sigkill_at_random_moments_then_sigterm_then_resume_is_the_same_run(workspace, reference):
    """One run, three interruptions: two SIGKILLs at random moments (each restart resumes from its last complete
    checkpoint), then a SIGTERM, which saves the step it reached and exits 75. The restart after it resumes from
    that step, and the whole is the run left alone: the same losses at every step, bitwise-equal params.

    The run saves every step, so a save is in flight almost all the time and each kill lands in or near one: a
    restart must find the last complete checkpoint, not a torn one. (The checkpoint interval does not change the
    computation: the reference saves every 4 steps. Each restart is a process start; one run carries every claim.)"""
    _, reference_dir = reference
    script = write_experiment(workspace, "every_step", steps=STEPS, ckpt_every=1)
    run_dir = workspace / "killed"
    rng = random.Random(7)
    for low, high in ((3, 9), (11, 18)):
        proc = launch(script, run_dir)
        wait_for_step(proc, run_dir, rng.randint(low, high))
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    proc = launch(script, run_dir)
    target = logged_step(run_dir) + 1  # past the steps the killed tries logged: this try must run one itself
    wait_for_step(proc, run_dir, target)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 75, err[-3000:]
    assert "resuming" in out
    message = err.strip().splitlines()[-1]
    assert message.startswith("SIGTERM: saved a checkpoint at step")
    step = int(message.split("step ")[1].split()[0])
    assert str(step) in os.listdir(run_dir / "checkpoints") and target <= step < STEPS

    code, out, err = finish(launch(script, run_dir))
    assert code == 0 and f"from step {step}" in out, err[-3000:]
    assert_same_run(run_dir, reference_dir)


def one_line_error(capsys, monkeypatch, script, run_dir, *args):
    """The command line's one-line error and exit status 2 for the run of `script` in `run_dir`. The refusals are
    the command line's own (jaxlm.cli), not a process's: they run in this process, which has the run's programs
    compiled already, and an uncaught exception would fail the test as a traceback would."""
    use_first_devices(monkeypatch, 1)  # as in the processes: one device
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(runpy.run_path(str(script))["EXPERIMENT"], argv=["--train.out_dir", str(run_dir), *args])
    err = capsys.readouterr().err
    # Progress bars may precede it on stderr; the error itself is one line, the last, with no traceback.
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2, err[-3000:]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("damage", ["other_config", "truncated", "missing_item", "garbage_step"])
def test_bad_checkpoints_are_refused_with_one_line(workspace, reference, damage, capsys, monkeypatch):
    script, reference_dir = reference
    run_dir = workspace / f"bad_{damage}"
    shutil.copytree(reference_dir, run_dir)
    checkpoints = run_dir / "checkpoints"
    latest = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    args = []
    if damage == "other_config":
        args = ["--optim.lr", "0.01"]
    elif damage == "truncated":
        for folder, _, files in os.walk(checkpoints / str(latest) / "state"):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
    elif damage == "missing_item":
        shutil.rmtree(checkpoints / str(latest) / "data")
    else:
        (checkpoints / str(latest + 100)).mkdir()
    os.remove(run_dir / "summary.json")  # so the run tries to continue rather than report itself finished
    line = one_line_error(capsys, monkeypatch, script, run_dir, *args)
    expected = {"other_config": "optim.lr", "truncated": str(latest), "missing_item": str(latest),
                "garbage_step": str(latest + 100)}[damage]
    assert expected in line, line


@pytest.mark.parametrize("skip", [False, True])
def test_a_planted_nan_stops_the_run_naming_the_step(workspace, skip, capsys, monkeypatch):
    script = write_experiment(workspace, "nan", steps=12, ckpt_every=100)
    run_dir = workspace / f"nan_{skip}"
    # A learning rate of 1e30 makes the first update overflow the next forward pass to inf - inf = NaN.
    args = ["--optim.lr", "1e30", "--optim.min-lr", "0", "--optim.warmup-steps", "0", "--optim.grad-clip", "0"]
    if skip:
        args += ["--train.skip-nonfinite", "--train.max-nonfinite", "3"]
    line = one_line_error(capsys, monkeypatch, script, run_dir, *args)
    assert "non-finite" in line and "at step" in line
    step = int(line.split("at step ")[1].split()[0])
    if skip:
        # Two NaN updates were skipped and counted; the third in a row stops the run.
        rows = [json.loads(r) for r in open(run_dir / "metrics.jsonl")]
        skipped = [r["skipped"] for r in rows if "loss" in r]
        assert skipped[-2:] == [1, 2] and step == rows[-1]["step"] + 1
    else:
        assert step == 2
