"""Finetuning runs on the one training loop: exact resume after SIGKILL, the same losses on a mesh as on one
device, and gradient accumulation equal to the whole batch."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import load_params
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.finetune import Classification, FinetuneConfig, InstructionTuning
from jaxlm.train import fit
from tests.processes import process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "delta", "sum", "list", "zero", "one"]


def write_instruct(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = list(rng.choice(WORDS, size=rng.integers(2, 6)))
            f.write(json.dumps({"instruction": "Reverse: " + " ".join(words), "output": " ".join(words[::-1])}) + "\n")
    return str(path)


def write_classify(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = int(rng.integers(2))
            words = rng.choice(WORDS[:4] if label else WORDS[4:], size=6)
            f.write(json.dumps({"text": " ".join(words), "label": str(label)}) + "\n")
    return str(path)


def experiment(out_dir, steps=4, batch_size=8, mesh=MeshConfig(), dropout=0.1, **train_kw):
    model = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=260,
                        max_seq_len=128, dropout=dropout)
    train = dict(steps=steps, eval_every=2, log_every=1, ckpt_every=2, seed=3, out_dir=str(out_dir))
    train.update(train_kw)
    return Experiment(
        name="ftloop", model=model, data=DataConfig(tokenizer="byte", seq_len=32, batch_size=batch_size),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.01), train=TrainConfig(**train), mesh=mesh,
    )


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdata")
    return {
        "instruct": FinetuneConfig(task="instruct", train_file=write_instruct(root / "train.jsonl", 48, 0),
                                   val_file=write_instruct(root / "val.jsonl", 8, 1), pack=True, max_len=96,
                                   samples=0),
        "classify": FinetuneConfig(task="classify", train_file=write_classify(root / "c_train.jsonl", 48, 2),
                                   val_file=write_classify(root / "c_val.jsonl", 12, 3), max_len=32, lora_rank=4),
    }


# ------------------------------------------------------------------------------------------- one device vs mesh


@pytest.fixture(scope="module")
def instruct_on_one_device(tmp_path_factory, files):
    """An instruction-tuning run of 4 steps on one device, finished: (its experiment, its summary). The mesh test
    compares with its losses; the finished-run test runs it again."""
    exp = experiment(tmp_path_factory.mktemp("ft_one") / "one", mesh=MeshConfig(data=1))
    return exp, fit(InstructionTuning(exp, files["instruct"]), devices=jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["instruct", "classify"])
def test_a_2x2_mesh_gives_the_one_device_losses(tmp_path, files, instruct_on_one_device, task):
    ft = files[task]
    make = InstructionTuning if task == "instruct" else Classification
    if task == "instruct":
        one = instruct_on_one_device[0]
    else:
        one = experiment(tmp_path / "one", mesh=MeshConfig(data=1))
        fit(make(one, ft), devices=jax.devices()[:1])
    mesh = experiment(tmp_path / "mesh", mesh=MeshConfig(data=2, fsdp=2))
    fit(make(mesh, ft), devices=jax.devices()[:4])
    (train_one, val_one), (train_mesh, val_mesh) = losses(one.train.out_dir), losses(tmp_path / "mesh")
    assert sorted(train_one) == list(range(1, 5)) and sorted(val_one) == [0, 2, 4]
    for step in train_one:
        assert train_mesh[step] == pytest.approx(train_one[step], abs=1e-5)
    for step in val_one:
        assert val_mesh[step] == pytest.approx(val_one[step], abs=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(tmp_path, files):
    # Without dropout: each microbatch draws its own dropout masks, which the whole batch would draw otherwise.
    whole = experiment(tmp_path / "whole", batch_size=16, mesh=MeshConfig(data=1), dropout=0.0)
    accumulated = experiment(tmp_path / "accum", batch_size=16, mesh=MeshConfig(data=1), dropout=0.0, grad_accum=4)
    for exp in (whole, accumulated):
        fit(InstructionTuning(exp, files["instruct"]), devices=jax.devices()[:1])
    (a, _), (b, _) = losses(tmp_path / "whole"), losses(tmp_path / "accum")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    # A different batch composition would differ by far more: the accumulated run saw the same rows.
    assert len(a) == 4 and max(a.values()) - min(a.values()) > 1e-2


# ----------------------------------------------------------------------------------------------- killed runs


SCRIPT = '''
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.finetune import FinetuneConfig, run_finetune

EXPERIMENT = Experiment(
    name="killed",
    model=ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=2, vocab_size=260, max_seq_len=128, dropout=0.1),
    data=DataConfig(tokenizer="byte", seq_len=32, batch_size=8),
    optim=OptimConfig(lr=3e-3, warmup_steps=3),
    train=TrainConfig(steps=16, eval_every=8, log_every=1, ckpt_every=3, keep_checkpoints=2),
)
FINETUNE = FinetuneConfig(task="instruct", train_file="{train}", val_file="{val}", pack=True, max_len=96, samples=0)

if __name__ == "__main__":
    run_finetune(EXPERIMENT, FINETUNE)
'''


def launch(script, run_dir, cache):
    env = process_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen(
        [sys.executable, str(script), "--train.out-dir", str(run_dir)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def logged_step(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((json.loads(line)["step"] for line in f if line.strip().endswith("}")), default=0)


@pytest.mark.slow
def test_an_instruction_tuning_run_killed_twice_resumes_as_the_same_run(tmp_path, files):
    ft = files["instruct"]
    script = tmp_path / "killed.py"
    script.write_text(SCRIPT.format(train=ft.train_file, val=ft.val_file))
    cache = tmp_path / "jax_cache"
    reference = launch(script, tmp_path / "reference", cache)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    run_dir = tmp_path / "killed"
    rng = random.Random(11)
    for low, high in ((2, 6), (8, 12)):
        proc = launch(script, run_dir, cache)
        target, deadline = rng.randint(low, high), time.time() + 240
        while logged_step(run_dir) < target:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run did not reach the step in time"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = launch(script, run_dir, cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming" in out

    assert losses(run_dir) == losses(tmp_path / "reference")  # every logged step and evaluation, exactly
    _, params = load_params(str(run_dir))
    _, want = load_params(str(tmp_path / "reference"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["validation_loss_after"] < summary["validation_loss_before"]


@pytest.mark.slow
def test_a_finished_finetune_is_not_run_again(files, instruct_on_one_device):
    exp, first = instruct_on_one_device
    again = fit(InstructionTuning(exp, files["instruct"]), devices=jax.devices()[:1])
    assert again["wall_s"] == first["wall_s"]
    other = dataclasses.replace(files["instruct"], max_len=48)
    with pytest.raises(Exception, match="finetuning run of another config"):
        fit(InstructionTuning(exp, other), devices=jax.devices()[:1])
