"""Train step, optimizer, schedules, accumulation, the loop's outputs and resume."""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import sharding
from jaxlm.checkpoint import read_config
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.optim import decay_mask, make_optimizer, make_schedule
from jaxlm.train import init_train_state, make_train_step, train


def tiny_experiment(family="gpt2", **train_kw) -> Experiment:
    model = ModelConfig(family=family, n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32)
    return Experiment(
        name="tiny",
        model=model,
        data=DataConfig(seq_len=16, batch_size=8, vocab_size=64),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2),
        train=TrainConfig(steps=train_kw.pop("steps", 30), **train_kw),
        mesh=MeshConfig(data=1),
    )


def single_device_mesh():
    return sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])


def random_batch(seed, batch=8, seq=16, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_lowers_the_loss(family):
    exp = tiny_experiment(family)
    mesh = single_device_mesh()
    state = init_train_state(exp, mesh)
    step = jax.jit(make_train_step(exp))
    batch = random_batch(0)  # one fixed batch: the model must learn to memorise it
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(64), rel=0.05)  # near uniform at initialisation
    assert losses[-1] < 0.5 * losses[0]


def random_params(exp, seed=0):
    """Random values in the train state's parameter tree (its shapes from jax.eval_shape: nothing compiles)."""
    abstract = jax.eval_shape(lambda: init_train_state(exp, single_device_mesh()))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), abstract)


def test_weight_decay_applies_to_matrices_only():
    exp = tiny_experiment()
    params = random_params(exp)
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['embed']['embedding']"] and flat["['blocks']['attn']['query']['kernel']"]
    assert not flat["['blocks']['attn']['query']['bias']"] and not flat["['blocks']['attn_norm']['scale']"]
    assert not flat["['final_norm']['bias']"]
    # With zero gradients, AdamW's only effect is decay: -lr * wd * param on matrices, nothing elsewhere.
    cfg = OptimConfig(lr=0.5, min_lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip=0)
    tx = make_optimizer(cfg, 10)
    # One compiled update (run eagerly, each leaf's operations would compile on their own).
    updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
    for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)):
        expected = -0.5 * 0.1 * p if flat[jax.tree_util.keystr(path)] else np.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-8)


def test_schedules_follow_their_formulas():
    steps, warmup, lr, min_lr = 100, 10, 1.0, 0.1
    cos = make_schedule(OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, schedule="cosine"), steps)
    for s in (0, 5, 10, 40, 77, 100):
        if s < warmup:
            want = lr * s / warmup
        else:
            frac = (s - warmup) / (steps - warmup)
            want = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(cos(s)) == pytest.approx(want, abs=1e-6), s
    wsd = make_schedule(
        OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, schedule="wsd", decay_fraction=0.2), steps
    )
    # Decay over the last 20 steps: stable until step 80, then linear to min_lr at 100.
    for s, want in ((5, 0.5), (10, 1.0), (50, 1.0), (80, 1.0), (90, 0.55), (100, 0.1)):
        assert float(wsd(s)) == pytest.approx(want, abs=1e-6), s
    const = make_schedule(OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, schedule="constant"), steps)
    assert [float(const(s)) for s in (5, 10, 99)] == pytest.approx([0.5, 1.0, 1.0])


@pytest.mark.slow
def test_clipping_bounds_the_update():
    params = random_params(tiny_experiment())
    big = jax.tree.map(lambda p: np.full_like(p, 100.0), params)
    clip = optax.clip_by_global_norm(1.0)
    clipped = jax.jit(lambda g: clip.update(g, clip.init(params))[0])(big)
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------------------------------------ the loop


def write_text_corpus(folder) -> str:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n", "    "]
    folder.mkdir()
    for i in range(60):
        text = " ".join(rng.choice(words, size=200))
        (folder / f"doc{i:03d}.txt").write_text(text)
    return str(folder / "*.txt")


def loop_experiment(root, corpus, **train_kw) -> Experiment:
    model = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=320,
                        max_seq_len=64, dropout=0.1)
    train_cfg = dict(steps=6, eval_every=3, eval_steps=1, ckpt_every=3, log_every=1, samples=1, sample_tokens=8,
                     tensorboard=False, out_dir=str(root / "run"))
    train_cfg.update(train_kw)
    return Experiment(
        name="loop",
        model=model,
        data=DataConfig(source=f"text:{corpus}", tokenizer="byte", seq_len=32, batch_size=8,
                        cache_dir=str(root / "cache"), val_fraction=0.2),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(**train_cfg),
    )


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished_loop_run(tmp_path_factory):
    """One 6-step run of the loop experiment (evaluations at 0, 3, 6; checkpoints at 3 and 6), left alone: the
    loop tests read it or work on copies of it. Returns (corpus glob, experiment, summary)."""
    root = tmp_path_factory.mktemp("loop")
    corpus = write_text_corpus(root / "corpus")
    exp = loop_experiment(root, corpus)
    return corpus, exp, train(exp)


def copied_run(finished_loop_run, tmp_path, **train_kw) -> Experiment:
    """The finished run copied to tmp_path/run, and its experiment pointed there (out_dir is bookkeeping)."""
    _, exp, _ = finished_loop_run
    shutil.copytree(exp.run_dir, tmp_path / "run")
    return Experiment(**{**exp.__dict__, "train": dataclasses.replace(exp.train, out_dir=str(tmp_path / "run"),
                                                                      **train_kw)})


@pytest.mark.slow
def test_loop_writes_metrics_plot_samples_and_resumes_exactly(finished_loop_run, tmp_path):
    _, exp, summary = finished_loop_run
    run_dir = exp.run_dir
    rows = read_rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert train_rows[0]["tokens_per_sec"] is None  # the first step compiles: not a throughput figure
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(key in r for r in train_rows), key
    assert all(r["tokens_per_sec"] > 0 for r in train_rows[1:])
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    assert all(r["val_bpb"] > 0 for r in eval_rows)
    for name in ("loss.png", "samples.txt", "summary.json", "config.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert summary["val_loss"] == eval_rows[-1]["val_loss"]
    assert summary["peak_flops"] > 0 and summary["peak_source"]  # what its MFU is measured against
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir), key=lambda s: (not s.isdigit(), s))[:2] == ["3", "6"]

    # Restart (a copy of the run) from the step-3 checkpoint, as if the process had died after it: steps 4-6 must
    # be the same.
    resumed = copied_run(finished_loop_run, tmp_path, samples=0)
    shutil.rmtree(os.path.join(resumed.run_dir, "checkpoints", "6"))
    os.remove(os.path.join(resumed.run_dir, "summary.json"))
    train(resumed)
    again = read_rows(resumed.run_dir)
    first_losses = {r["step"]: r["loss"] for r in train_rows if r["step"] > 3}
    second_losses = {r["step"]: r["loss"] for r in again if "loss" in r and r["step"] > 3}
    assert second_losses == first_losses
    assert [r["val_loss"] for r in again if "val_loss" in r and r["step"] == 6] == [eval_rows[-1]["val_loss"]]


@pytest.mark.slow
def test_a_different_config_in_the_same_run_directory_is_refused(finished_loop_run, tmp_path):
    from jaxlm.errors import CheckpointError

    exp = copied_run(finished_loop_run, tmp_path)
    other = Experiment(**{**exp.__dict__, "optim": OptimConfig(lr=1e-3, warmup_steps=2)})
    with pytest.raises(CheckpointError, match="optim.lr"):
        train(other)


@pytest.mark.slow
def test_a_start_that_failed_before_its_first_step_does_not_block_its_directory(finished_loop_run, tmp_path, capsys):
    from jaxlm.errors import CheckpointError, DataError

    _, shared, _ = finished_loop_run
    # The shared run's config in a new directory: the corrected start compiles the programs the shared run compiled.
    exp = Experiment(**{**shared.__dict__, "train": dataclasses.replace(shared.train, out_dir=str(tmp_path / "run"),
                                                                        samples=0)})
    missing = Experiment(**{**exp.__dict__, "data": dataclasses.replace(exp.data, source="text:/nowhere/*.txt")})
    with pytest.raises(DataError, match="no file matches"):
        train(missing)
    assert not os.path.exists(exp.run_dir)  # the data is set up before anything is written
    train(exp)  # the corrected command takes the directory over
    assert read_config(exp.run_dir).data.source == exp.data.source
    capsys.readouterr()
    train(exp)  # a finished run says so, without restoring it first
    assert "is finished (step 6)" in capsys.readouterr().out

    a_file = tmp_path / "file"
    a_file.write_text("")
    blocked = Experiment(**{**exp.__dict__, "train": dataclasses.replace(exp.train, out_dir=str(a_file))})
    with pytest.raises(CheckpointError, match="cannot create the run directory"):
        train(blocked)
