"""The two Chinchilla sweeps: every member valid and on its budget, and a C4 member's train step traced on CPU."""

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm.scaling
import jaxlm.train

from experiments import chinchilla_c4, chinchilla_cpu
from jaxlm import sharding
from jaxlm.cli import parse
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError
from jaxlm.optim import make_schedule
from jaxlm.cli import run_isoflop_sweep
from jaxlm.scaling import ScalingError, budget_grid, check_budgets, member_flops
from jaxlm.train import abstract_train_state, make_train_step

pytestmark = pytest.mark.slow  # every member of both sweeps, a sweep run, a C4 member's step lowered

SWEEPS = {"cpu": chinchilla_cpu, "c4": chinchilla_c4}


def hand_flops_per_token(m: Experiment) -> float:
    """Training FLOPs per token written out from the shapes: 6 x (attention, MLP and output-logit weights) plus
    the attention scores and values, 12 x layers x width x context (forward 1/3, backward 2/3)."""
    c, T = m.model, m.data.seq_len
    d, h, k, e = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    attention = d * h * e + 2 * d * k * e + h * e * d
    mlp = (2 if c.mlp == "gelu" else 3) * d * c.d_ff
    weights = c.n_layers * (attention + mlp) + d * c.vocab_size
    return 6.0 * weights + 12.0 * c.n_layers * h * e * T


def hand_params(m: Experiment) -> int:
    """Parameter count from the shapes (GPT-2: LayerNorms with biases, tied; Llama: RMSNorm, no biases, untied)."""
    c = m.model
    d, f, V = c.d_model, c.d_ff, c.vocab_size
    if c.positions == "learned":
        assert (c.norm, c.mlp) == ("layernorm", "gelu")
        assert c.tie_embeddings and c.bias and c.n_kv_heads == c.n_heads
        block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
        return V * d + c.max_seq_len * d + c.n_layers * block + 2 * d
    assert (c.positions, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu")
    assert not c.tie_embeddings and not c.bias and not c.qk_norm
    kv = c.n_kv_heads * c.head_dim
    block = (2 * d * d + 2 * d * kv) + 3 * d * f + 2 * d
    return 2 * V * d + c.n_layers * block + d


@pytest.mark.parametrize("which", SWEEPS)
def test_every_member_spends_its_budget(which):
    module = SWEEPS[which]
    sweep, budgets = module.SWEEP, module.BUDGETS
    seeds = getattr(module, "SEEDS", (0,))
    assert len(sweep) == len(budgets) * module.SIZES_PER_BUDGET * len(seeds)
    assert len({m.name for m in sweep}) == len(sweep)
    assert len(budgets) >= 3 and module.SIZES_PER_BUDGET >= 5
    for budget in budgets:
        group = [m for m in sweep if module.BUDGET_OF[m.name] == budget]
        assert len(group) == module.SIZES_PER_BUDGET * len(seeds)
        sizes = [hand_params(m) for m in group]
        assert len(set(sizes)) == module.SIZES_PER_BUDGET >= 5
        # Every size once per seed, with the same shape and steps.
        for size in set(sizes):
            runs = [m for m in group if hand_params(m) == size]
            assert sorted(m.train.seed for m in runs) == sorted(seeds)
            assert len({(m.model, m.train.steps) for m in runs}) == 1
        # The sizes bracket the grid's centre, D = TOKENS_PER_PARAM x N with C = 6ND.
        assert min(sizes) < math.sqrt(budget / (6 * module.TOKENS_PER_PARAM)) < max(sizes)
        for m in group:
            tokens = m.train.steps * m.data.batch_size * m.data.seq_len
            # Whole steps: within half a step of the budget.
            assert abs(hand_flops_per_token(m) * tokens / budget - 1) <= 0.5 / m.train.steps + 1e-9, m.name
    assert {os.path.dirname(m.run_dir) for m in sweep} == {module.SWEEP_DIR}
    assert module.FITS_DIR.startswith(module.SWEEP_DIR + os.sep)


@pytest.mark.parametrize("which", SWEEPS)
def test_schedule_spans_each_run(which):
    for m in SWEEPS[which].SWEEP:
        steps, warmup, cfg = m.train.steps, m.optim.warmup_steps, m.optim
        assert warmup == round(0.05 * steps) and cfg.schedule == "cosine"
        schedule = make_schedule(cfg, steps)
        assert float(schedule(warmup)) == pytest.approx(cfg.lr, rel=1e-5)
        assert float(schedule(steps)) == pytest.approx(cfg.min_lr, rel=1e-5)
        # A third of the way through the decay: the cosine from lr to min_lr over the steps after warmup.
        at = warmup + (steps - warmup) // 3
        progress = (at - warmup) / (steps - warmup)
        expected = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(at)) == pytest.approx(expected, rel=1e-4)


def test_cpu_sweep_fits_the_corpus_and_the_clock():
    sweep = chinchilla_cpu.SWEEP
    for m in sweep:
        assert m.data.source == "pysrc" and m.data.tokenizer == "byte" and m.model.vocab_size >= 260
        # One family: 2 layers of one head, so that neighbouring sizes differ only in width.
        assert m.model.n_layers == 2 and m.model.n_heads == 1 and m.model.head_dim == m.model.d_model >= 8
    # No member repeats data: pysrc's training split holds 376M bytes with the test extra installed (main() checks
    # the corpus it finds).
    assert chinchilla_cpu.most_tokens() < 25e6
    assert len(chinchilla_cpu.BUDGETS) >= 4
    assert len(chinchilla_cpu.SEEDS) >= 2  # a run's own noise is as large as the differences near an optimum
    assert all(sum(chinchilla_cpu.BUDGET_OF[m.name] == b for m in sweep) == 7 * len(chinchilla_cpu.SEEDS)
               for b in chinchilla_cpu.BUDGETS)
    smallest = min(chinchilla_cpu.BUDGETS)
    assert min(m.train.steps for m in sweep if chinchilla_cpu.BUDGET_OF[m.name] == smallest) >= 250
    assert sum(member_flops(m) for m in sweep) < 6e13  # about 40 minutes on two CPU cores


def test_c4_sweep_is_declared_for_accelerators():
    for m in chinchilla_c4.SWEEP:
        assert m.data.source == "shards:c4/en/c4-train.*.json.gz"
        assert m.data.val_source == "c4/en/c4-validation.*.json.gz"
        assert m.model.family == "llama" and m.model.dtype == "bfloat16" and m.model.attention == "auto"
        assert m.mesh.data == -1 and m.data.seq_len == 2048 and m.data.batch_size % 8 == 0
        assert m.model.d_model % 128 == 0 and m.model.head_dim == 128
        assert m.optim.lr * m.model.d_model == pytest.approx(chinchilla_c4.LR_AT_256 * 256)
        assert m.data.vocab_size <= m.model.vocab_size
    budgets = sorted(chinchilla_c4.BUDGETS)
    assert budgets[0] >= 1e18 and budgets[-1] >= 1e20


def test_overrides_that_change_compute_are_refused():
    sweep, budget_of = chinchilla_cpu.SWEEP, chinchilla_cpu.BUDGET_OF
    check_budgets(parse(sweep, ["--optim.lr", "1e-3", "--train.eval-steps", "4"]), budget_of)
    base = chinchilla_cpu.BASE
    for flag, value in [("--data.batch-size", 2 * base.data.batch_size), ("--data.seq-len", base.data.seq_len // 2),
                        ("--train.steps", 10), ("--model.n-layers", 6)]:
        members = parse(sweep, [flag, str(value), "--sweep.members", "2"])
        message = re.escape(f"{members[0].name}: the overrides make it train on")
        with pytest.raises(ConfigError, match=message):
            check_budgets(members, budget_of)
    with pytest.raises(SystemExit) as exit_info:
        argv = ["--data.batch-size", str(2 * base.data.batch_size)]
        run_isoflop_sweep(sweep, budget_of, "unused", argv=argv)
    assert exit_info.value.code == 2


def test_the_cpu_sweep_refuses_a_budget_override_before_it_prepares_its_corpus(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setattr("sys.argv", ["chinchilla_cpu", "--data.seq-len", "64", "--data.cache-dir", str(cache)])

    def prepare_data(*args, **kwargs):
        raise AssertionError("the corpus was prepared before the overrides were checked")

    monkeypatch.setattr("jaxlm.data.prepare_data", prepare_data)
    with pytest.raises(SystemExit) as exit_info:
        chinchilla_cpu.main()
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "the overrides make it train on" in line
    assert not cache.exists()  # pysrc (hundreds of MB) was not prepared for a command that cannot run


def tiny_sweep(tmp_path):
    base = dataclasses.replace(
        chinchilla_cpu.BASE, train=dataclasses.replace(chinchilla_cpu.BASE.train, out_dir=str(tmp_path / "sweep"))
    )
    return budget_grid(
        base, [4e11], shape_rule=chinchilla_cpu.SHAPES, span=chinchilla_cpu.SPAN,
        tokens_per_param=chinchilla_cpu.TOKENS_PER_PARAM,
    )


def test_sweep_runs_a_slice_and_fits_only_when_all_are_finished(tmp_path, monkeypatch, capsys):
    sweep, budget_of = tiny_sweep(tmp_path)
    trained, fitted = [], []

    def fake_train(member):  # the members' training is tested elsewhere: here, which members run and when fits
        os.makedirs(member.run_dir, exist_ok=True)
        with open(os.path.join(member.run_dir, "summary.json"), "w") as f:
            f.write("{}")
        trained.append(member.name)
        return {}

    def fake_fit(source, out, **options):
        fitted.append((source, out, options))
        return {}

    monkeypatch.setattr(jaxlm.train, "train", fake_train)
    monkeypatch.setattr(jaxlm.scaling, "fit_and_plot", fake_fit)
    fits = str(tmp_path / "sweep" / "fits")
    command = f"python -m tools.fit_scaling {tmp_path / 'sweep'} --out {fits} --bootstrap 7"
    run_isoflop_sweep(sweep, budget_of, fits, bootstrap=7, argv=["--sweep.members", "1:3"])
    assert trained == [m.name for m in sweep[1:3]] and fitted == []
    assert f"once all are, fit with: {command}" in capsys.readouterr().out
    run_isoflop_sweep(sweep, budget_of, fits, bootstrap=7, argv=["--sweep.members", "3:"])
    run_isoflop_sweep(sweep, budget_of, fits, bootstrap=7, argv=["--sweep.members", "0"])
    assert sorted(trained) == sorted(m.name for m in sweep)
    assert fitted == [(str(tmp_path / "sweep"), fits, {"bootstrap": 7})]
    assert f"all {len(sweep)} members finished; fitting: {command}" in capsys.readouterr().out

    def failing_fit(source, out, **options):
        raise ScalingError("budget C=3e+11 has 2 model size(s)")

    monkeypatch.setattr(jaxlm.scaling, "fit_and_plot", failing_fit)
    with pytest.raises(SystemExit) as exit_info:
        run_isoflop_sweep(sweep, budget_of, fits, bootstrap=7, argv=["--sweep.members", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: budget C=3e+11 has 2 model size(s)\n"

    # --train.out-dir moves the whole sweep, and its fits with it.
    monkeypatch.setattr(jaxlm.scaling, "fit_and_plot", fake_fit)
    moved = tmp_path / "moved"
    run_isoflop_sweep(sweep, budget_of, fits, bootstrap=7, argv=["--train.out-dir", str(moved)])
    assert sorted(os.listdir(moved)) == sorted([m.name for m in sweep] + ["sweep_status.json"])
    assert fitted[-1] == (str(moved), str(moved / "fits"), {"bootstrap": 7})


def test_c4_member_train_step_traces_and_lowers_on_cpu():
    smallest = min(chinchilla_c4.SWEEP, key=hand_params)
    # cuDNN's fused attention refuses to trace without a GPU (jax checks the cuDNN version while tracing); XLA's
    # attention computes the same function with the same shapes, so everything else is the member as declared.
    member = dataclasses.replace(smallest, model=dataclasses.replace(smallest.model, attention="xla"))
    mesh = sharding.make_mesh(member.mesh)
    assert mesh.shape["data"] == len(jax.devices())
    state = abstract_train_state(member, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    assert n_params == hand_params(member)
    rows = (member.data.batch_size, member.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=sharding.batch_sharding(mesh)) for k in ("inputs", "targets")
    }
    step = make_train_step(member)
    new_state, metrics = jax.eval_shape(step, state, batch)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), state, new_state)
    assert all(jax.tree.leaves(same))
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
    text = lowered.as_text()
    assert "bf16" in text  # compute in bfloat16 (parameters stay float32)
    assert f"{member.data.batch_size}x{member.data.seq_len}x{member.model.vocab_size}" in text  # the logits
