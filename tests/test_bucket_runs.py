"""Runs whose directory is a gs:// URI, against a GCS API server started by the test session (tests/gcs.py): a
run killed twice resumes from the bucket exactly, a sweep runs and is fitted there, and tools read it back."""

import json
import os
import random
import runpy
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm import storage
from jaxlm.checkpoint import load_params
from jaxlm.cli import run
from jaxlm.scaling import collect_results, read_csv, write_csv
from tests.devices import use_first_devices
from tests.processes import process_env
from tests.test_scaling import EPOCH_CSV
from tests.test_fault_tolerance import finish, launch, losses, workspace, write_experiment  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_MODULE = '''
import dataclasses
from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig

BASE = Experiment(
    name="base",
    model=ModelConfig(family="gpt2", n_layers=1, d_model=16, n_heads=2, vocab_size=264, max_seq_len=32),
    data=DataConfig(source="text:{corpus}", tokenizer="byte", seq_len=16, batch_size=8, cache_dir="{cache}",
                    val_fraction=0.2),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=8, eval_every=8, eval_steps=1, ckpt_every=100, log_every=2, samples=0),
)
SWEEP = tuple(
    dataclasses.replace(BASE, name=f"d{{d}}", model=dataclasses.replace(BASE.model, d_model=d, d_ff=4 * d))
    for d in (16, 32)
)

if __name__ == "__main__":
    run(SWEEP)
'''


def start(args, cwd):
    env = process_env()
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def logged_step(run_dir):
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return 0
    lines = storage.read_text(path).splitlines()
    return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)


def bucket_losses(run_dir):
    rows = [json.loads(line) for line in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def read_csv_local(rows, tmp_path):
    write_csv(rows, str(tmp_path / "results.csv"))
    return read_csv(str(tmp_path / "results.csv"))


def assert_no_local_gs_folder(*folders):
    for folder in folders:
        assert not [n for n in os.listdir(folder) if n.startswith("gs:")], folder


@pytest.mark.slow
def test_a_run_in_a_bucket_killed_twice_resumes_exactly(workspace, gcs, tmp_path, capsys):
    script = write_experiment(workspace, "bucket")
    reference = workspace / "bucket_reference"
    code, _, err = finish(launch(script, reference))
    assert code == 0, err[-3000:]

    run_dir = f"{gcs}/run"
    rng = random.Random(5)
    for low, high in ((3, 9), (11, 18)):
        proc = start([str(script), "--train.out-dir", run_dir], tmp_path)
        deadline, target = time.time() + 240, rng.randint(low, high)
        while logged_step(run_dir) < target:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, out, err = finish(start([str(script), "--train.out-dir", run_dir], tmp_path))
    assert code == 0 and "resuming" in out, err[-3000:]

    assert bucket_losses(run_dir) == losses(reference)  # every logged step, exactly
    _, params = load_params(run_dir)
    _, want = load_params(str(reference))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {"config.json", "metrics.jsonl", "summary.json", "loss.png", "checkpoints"} <= set(storage.listdir(run_dir))
    # TensorBoard's events reached the bucket too (copied at checkpoints), the resumed tries' replacing the lost.
    events = tmp_path / "events"
    events.mkdir()
    for name in storage.listdir(run_dir):
        if name.startswith("events.out.tfevents"):
            (events / name).write_bytes(storage.read_bytes(storage.join(run_dir, name)))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    assert logged == pytest.approx(bucket_losses(run_dir), rel=1e-6)

    from tools import sample  # reads the run back from the bucket (in this process: no claim about processes)

    capsys.readouterr()
    sample.main(["--run", run_dir, "--prompt", "spam", "--max-new-tokens", "8", "--temperature", "0"])
    assert "spam" in capsys.readouterr().out
    assert_no_local_gs_folder(tmp_path, ROOT, workspace)


@pytest.mark.slow
def test_a_sweep_runs_and_is_fitted_in_a_bucket(workspace, gcs, tmp_path, monkeypatch):
    # In this process (on one device): the claim is about gs:// paths through jaxlm.storage, which this process's
    # clients reach as a run process's do (the `gcs` fixture points them at the server); the killed run above is
    # the one about processes.
    from tools import fit_scaling, plot_runs

    use_first_devices(monkeypatch, 1)
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_MODULE.format(corpus=workspace / "corpus" / "*.txt", cache=workspace / "cache"))
    sweep_dir = f"{gcs}/sweep"
    run(runpy.run_path(str(script))["SWEEP"], argv=["--train.out-dir", sweep_dir])
    assert set(storage.listdir(sweep_dir)) >= {"d16", "d32"}
    rows = collect_results(sweep_dir)  # both members, read back from the bucket
    assert [r["name"] for r in rows] == ["d16", "d32"] and rows[0]["N"] < rows[1]["N"]
    write_csv(rows, f"{sweep_dir}/results.csv")
    assert read_csv(f"{sweep_dir}/results.csv") == read_csv_local(rows, tmp_path)
    # Two tiny members bracket no optimum; the fit itself runs on Epoch AI's Chinchilla table, from the bucket.
    table = f"{gcs}/chinchilla.csv"
    storage.write_bytes(table, EPOCH_CSV.read_bytes())
    fits = f"{sweep_dir}/fits"
    assert fit_scaling.main([table, "--out", fits, "--approaches", "2,3", "--bootstrap", "0"]) == 0
    assert {"fits.json", "isoflop.png", "optimal.png", "parametric.png"} <= set(storage.listdir(fits))
    assert {"approach2", "approach3"} <= set(json.loads(storage.read_text(f"{fits}/fits.json")))
    assert plot_runs.main([f"{sweep_dir}/d16", f"{sweep_dir}/d32", "--out", f"{sweep_dir}/compared.png"]) == 0
    assert storage.isfile(f"{sweep_dir}/compared.png")
    assert_no_local_gs_folder(tmp_path, ROOT, workspace)
