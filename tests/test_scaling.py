"""Scaling-law fits (Chinchilla approaches 1-3), checked against published fits and known laws."""

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import approx_fprime, minimize_scalar
from scipy.special import huber, logsumexp

from jaxlm import scaling
from jaxlm.errors import JaxlmError
from jaxlm.scaling import Curve, ParametricFit, ScalingError, fit_envelope, fit_isoflop, fit_parametric
from jaxlm.scaling import lbfgs, parametric

DATA = Path(__file__).parents[2] / "shared" / "data"
EPOCH_CSV = DATA / "chinchilla_epoch_2024.csv"

# Hoffmann et al. 2022's unrounded fit (the data README): a known law to generate losses from.
E, A, B, ALPHA, BETA = 1.6934, 406.4, 410.7, 0.33917, 0.28491
A_EXP = BETA / (ALPHA + BETA)  # N_opt ~ C^a under C = 6ND


def law(N, D):
    return E + A / N**ALPHA + B / D**BETA


def true_n_opt(C):
    """N_opt by numerical minimisation along C = 6ND (independent of the closed form)."""
    res = minimize_scalar(lambda x: law(np.exp(x), C / (6 * np.exp(x))), bounds=(0, 60), method="bounded",
                          options={"xatol": 1e-10})
    return float(np.exp(res.x))


def epoch_points():
    with open(EPOCH_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(loss)[:-5]  # Epoch drop the 5 runs with the highest loss
    return N[keep], C[keep] / (6 * N[keep]), loss[keep]


@pytest.mark.skipif(not EPOCH_CSV.exists(), reason=f"reference data not present at {DATA}")
def test_parametric_recovers_epoch_estimates():
    N, D, loss = epoch_points()
    assert len(N) == 240
    fit = fit_parametric(N, D, loss, bootstrap=16, seed=0)
    # Besiroglu et al. 2024 on this file, within their standard errors.
    assert abs(fit.E - 1.8172) <= 0.03
    assert abs(fit.alpha - 0.3478) <= 0.02
    assert abs(fit.beta - 0.3658) <= 0.02
    assert abs(fit.A - 482.01) <= 124.58
    assert abs(fit.B - 2085.43) <= 1293.23
    assert abs(fit.a - 0.513) <= 0.020
    # Bootstrap standard errors of the same order as theirs (16 resamples: a loose factor of 2.5).
    for name, published in [("E", 0.03), ("alpha", 0.02), ("beta", 0.02), ("a", 0.020)]:
        assert published / 2.5 < fit.stderrs[name] < published * 2.5, (name, fit.stderrs[name])
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        lo, hi = fit.intervals[name]
        assert lo < getattr(fit, name) < hi


def test_parametric_recovers_known_law():
    rng = np.random.default_rng(0)
    N = np.repeat(np.geomspace(1e7, 1e10, 8), 5)
    D = N * np.tile(np.geomspace(5, 100, 5), 8)
    loss = law(N, D) * np.exp(rng.normal(0, 0.003, len(N)))
    fit = fit_parametric(N, D, loss)
    assert fit.E == pytest.approx(E, abs=0.05)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.03)
    assert fit.beta == pytest.approx(BETA, abs=0.03)
    assert fit.a == pytest.approx(A_EXP, abs=0.03)
    assert np.allclose(fit.loss(N, D), law(N, D), rtol=0.01)


def test_compute_optimal_matches_numerical_minimum():
    fit = ParametricFit(E=E, A=A, B=B, alpha=ALPHA, beta=BETA, objective=0.0, n_points=0)
    for C in (1e19, 1e22, 5.76e23):
        n_opt, d_opt = fit.compute_optimal(C)
        assert n_opt == pytest.approx(true_n_opt(C), rel=1e-6)
        assert 6 * n_opt * d_opt == pytest.approx(C)
    assert fit.a + fit.b == pytest.approx(1.0)


def test_parametric_rejects_rising_loss():
    N = np.repeat(np.geomspace(1e7, 1e10, 6), 4)
    D = N * np.tile(np.geomspace(5, 100, 4), 6)
    with pytest.raises(ScalingError, match="does not fall"):
        fit_parametric(N, D, 2.0 + 0.5 * (N / 1e8) ** 0.2 + B / D**0.3)


def test_parametric_raises_when_no_start_converges(monkeypatch):
    class Stuck:
        success, fun, message = False, 1.0, "ABNORMAL_TERMINATION_IN_LNSRCH"
        x, jac = np.zeros(5), np.ones(5)

    monkeypatch.setattr(parametric, "minimize", lambda *args, **kwargs: Stuck())
    N = np.repeat(np.geomspace(1e7, 1e10, 4), 3)
    D = N * np.tile([5.0, 20.0, 80.0], 4)
    with pytest.raises(ScalingError, match="did not converge"):
        fit_parametric(N, D, law(N, D))


@pytest.mark.parametrize(
    "N, D, loss, message",
    [
        ([1e8] * 7, [1e9] * 7, [3, 3, 3, -1, 3, 3, 3], r"loss\[3\] = -1.0 is not a positive"),
        ([1e8] * 6 + [0], [1e9] * 7, [3] * 7, r"N\[6\] = 0.0"),
        ([1e8] * 7, [1e9] * 6, [3] * 7, "D has 6 values where 7"),
        ([1e8] * 7, [1e9] * 7, [3, 3, 3, float("nan"), 3, 3, 3], r"loss\[3\] = nan"),
        ([1e8] * 5, [1e9] * 5, [3] * 5, "more points than its 5 parameters"),
    ],
)
def test_parametric_bad_input(N, D, loss, message):
    with pytest.raises(ScalingError, match=message):
        fit_parametric(N, D, loss)


def test_scaling_error_is_a_jaxlm_error():
    assert issubclass(ScalingError, JaxlmError)
    with pytest.raises(ScalingError, match="bootstrap=1"):
        fit_isoflop([1e8] * 3, [1e18] * 3, [3, 2, 3], bootstrap=1)


def test_huber_objective_against_scipy():
    rng = np.random.default_rng(0)
    log_n, log_d = rng.uniform(16, 23, 30), rng.uniform(19, 26, 30)
    log_loss = rng.uniform(0.6, 1.4, 30)
    weights = rng.integers(0, 3, 30).astype(float)
    # Rows near an optimum (some residuals inside delta) and far from it.
    params = np.array([[6.0, 7.5, 0.6, 0.35, 0.37], [2.0, 20.0, -1.0, 0.5, 1.5], [25.0, 0.0, 1.0, 2.0, 0.0]])
    values, grads = parametric._huber_objective(params, log_n, log_d, log_loss, weights, 0.05)

    def reference(p):
        a, b, e, alpha, beta = p
        lse = logsumexp([a - alpha * log_n, b - beta * log_d, np.full(30, e)], axis=0)
        return float(np.sum(weights * huber(0.05, log_loss - lse)))

    for p, value, grad in zip(params, values, grads):
        assert value == pytest.approx(reference(p), rel=1e-12)
        assert np.allclose(grad, approx_fprime(p, reference, 1e-7), rtol=1e-4, atol=1e-6)


def test_batched_lbfgs_on_quadratics_and_rosenbrock():
    # Independent problems in one batch: shifted ill-conditioned quadratics and 2-D Rosenbrock functions.
    scales = np.array([1.0, 10.0, 1000.0])
    centres = np.array([[1.0, -2.0, 3.0], [0.0, 5.0, -5.0], [-1.0, 0.5, 2.0], [1.0, 1.0, 0.0]])

    def fun(x, rows):
        quad = rows < 3
        value, grad = np.zeros(len(rows)), np.zeros_like(x)
        d = x[quad] - centres[rows[quad]]
        value[quad], grad[quad] = 0.5 * (scales * d * d).sum(1), scales * d
        u, v = x[~quad, 0], x[~quad, 1]
        value[~quad] = (1 - u) ** 2 + 100 * (v - u * u) ** 2
        grad[~quad, 0] = -2 * (1 - u) - 400 * u * (v - u * u)
        grad[~quad, 1] = 200 * (v - u * u)
        return value, grad

    x0 = np.array([[0.0, 0.0, 0.0], [3.0, -3.0, 1.0], [10.0, 10.0, 10.0], [-1.2, 1.0, 0.0]])
    x, f, converged = lbfgs.batched_lbfgs(fun, x0, gtol=1e-9, ftol=0.0)
    assert converged.all()
    assert np.allclose(x[:3], centres[:3], atol=1e-6)
    assert np.allclose(x[3, :2], [1.0, 1.0], atol=1e-4)


def isoflop_points(budgets, sizes=7, span=8.0):
    """Sizes log-spaced around the known law's optimum at each budget."""
    N, C = [], []
    for c in budgets:
        centre = true_n_opt(c)
        N += list(centre * np.geomspace(1 / span, span, sizes))
        C += [c] * sizes
    N, C = np.array(N), np.array(C)
    return N, C, law(N, C / (6 * N))


def test_isoflop_recovers_known_exponents():
    N, C, loss = isoflop_points([1e18, 1e19, 1e20, 1e21])
    fit = fit_isoflop(N, C, loss)
    # The profile in log(N / N_opt) has the same shape at every budget, so the parabola's bias cancels in a.
    assert fit.a == pytest.approx(A_EXP, abs=1e-6)
    assert fit.b == pytest.approx(1 - A_EXP, abs=1e-6)
    assert np.allclose(fit.budgets, [1e18, 1e19, 1e20, 1e21])
    assert np.allclose(fit.n_opt, [true_n_opt(c) for c in fit.budgets], rtol=0.05)
    assert np.allclose(fit.d_opt, fit.budgets / (6 * fit.n_opt))


def test_isoflop_with_noise_and_bootstrap():
    rng = np.random.default_rng(1)
    N, C, loss = isoflop_points([1e18, 1e19, 1e20, 1e21, 1e22])
    # Members of a sweep budget differ slightly in C (whole numbers of steps): grouped within budget_rtol.
    C = C * (1 + rng.uniform(-0.01, 0.01, len(C)))
    loss = loss * np.exp(rng.normal(0, 0.002, len(loss)))
    fit = fit_isoflop(N, C, loss, bootstrap=100, seed=0)
    assert len(fit.budgets) == 5
    assert fit.a == pytest.approx(A_EXP, abs=0.02)
    lo, hi = fit.intervals["a"]
    assert lo < A_EXP < hi and hi - lo < 0.1
    assert fit.stderrs["a"] > 0
    assert set(fit.intervals) >= {"a", "b", "k_n", "k_d", "n_opt[0]"}


def test_isoflop_too_few_sizes_names_budget():
    N, C, loss = isoflop_points([1e18, 1e19, 1e20])
    keep = ~((C == 1e19) & (np.arange(len(C)) % 7 > 1))  # 2 sizes left at 1e19
    with pytest.raises(ScalingError, match=r"budget C=1e\+19 has 2 model size"):
        fit_isoflop(N[keep], C[keep], loss[keep])
    fit = fit_isoflop(N[keep], C[keep], loss[keep], skip_unfittable=True)
    assert len(fit.budgets) == 2 and "C=1e+19" in fit.skipped[0]
    assert np.all(fit.labels[C[keep] == 1e19] == -1)


def test_isoflop_downward_parabola_names_budget():
    N, C, loss = isoflop_points([1e18, 1e19, 1e20])
    at = C == 1e20
    loss = loss.copy()
    loss[at] = 3.0 - 0.1 * (np.log(N[at]) - np.log(N[at]).mean()) ** 2
    with pytest.raises(ScalingError, match=r"budget C=1e\+20: the parabola .* opens downward"):
        fit_isoflop(N, C, loss)


def test_isoflop_optimum_outside_sizes_names_budget():
    N, C, loss = isoflop_points([1e18, 1e19, 1e20])
    keep = ~((C == 1e18) & (N < np.array([true_n_opt(1e18)] * len(N)) * 1.5))  # only sizes above the optimum
    with pytest.raises(ScalingError, match=r"budget C=1e\+18: the fitted optimum .* outside the sizes tried"):
        fit_isoflop(N[keep], C[keep], loss[keep])


def test_isoflop_needs_two_budgets():
    N, C, loss = isoflop_points([1e19])
    with pytest.raises(ScalingError, match="at least 2 budgets"):
        fit_isoflop(N, C, loss)


def test_group_budgets():
    labels = scaling.group_budgets([1e18, 1.02e18, 3e18, 0.99e18, 2.95e18, 1e19])
    assert labels.tolist() == [0, 0, 1, 0, 1, 2]


def known_law_curves(sizes=20):
    tokens = np.geomspace(1e8, 1e12, 80)
    sizes = np.geomspace(1e7, 1e10, sizes)
    return [Curve(N=float(n), tokens=tokens, loss=law(n, tokens), name=f"N{n:.0e}") for n in sizes]


def test_envelope_recovers_known_exponents():
    fit = fit_envelope(known_law_curves(), bootstrap=30)
    assert fit.a == pytest.approx(A_EXP, abs=0.02)
    assert fit.b == pytest.approx(1 - A_EXP, abs=0.02)
    # Every envelope point is the best available size: no listed size does better there.
    sizes = np.geomspace(1e7, 1e10, 20)
    for c, n, best in zip(fit.C[::20], fit.n_opt[::20], fit.loss[::20]):
        assert best <= law(sizes, c / (6 * sizes)).min() + 1e-3
        assert true_n_opt(c) / 1.5 < n < true_n_opt(c) * 1.5
    lo, hi = fit.intervals["a"]
    assert lo <= fit.a <= hi


def test_envelope_errors():
    curves = known_law_curves(3)
    with pytest.raises(ScalingError, match="at least 2 model sizes"):
        fit_envelope([curves[0], curves[0]])
    bad = Curve(N=1e8, tokens=np.array([1e9, 2e9]), loss=np.array([3.0, 0.0]), name="tiny")
    with pytest.raises(ScalingError, match=r"curve 1 \(tiny\): loss\[1\] = 0.0"):
        fit_envelope([curves[0], bad])
    with pytest.raises(ScalingError, match="bracketed"):  # two sizes: each winner is the smallest or largest
        fit_envelope(known_law_curves(2))
    far = Curve(N=1e10, tokens=np.array([1e15, 2e15]), loss=np.array([2.0, 1.9]))
    with pytest.raises(ScalingError, match="do not overlap"):
        fit_envelope([Curve(N=1e7, tokens=np.array([1e8, 2e8]), loss=np.array([4.0, 3.9])), far])


# ---------------------------------------------------------------------------------------------------------------
# Sweeps and results tables

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import os  # noqa: E402

from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.flops import count_nonembedding_params, count_params, flops_per_token  # noqa: E402
from jaxlm.optim import make_schedule  # noqa: E402
from jaxlm.scaling import (  # noqa: E402
    AspectRatioShapes,
    branch_from_trunk,
    collect_curves,
    collect_results,
    isoflop_grid,
    read_csv,
    write_csv,
    wsd_branches,
)


def sweep_base(tmp_path, family="gpt2", **model):
    model = ModelConfig(family=family, vocab_size=512, max_seq_len=128, **model)
    return Experiment(
        name="iso",
        model=model,
        data=DataConfig(vocab_size=512, seq_len=64, batch_size=8),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10),
        train=TrainConfig(steps=100, out_dir=str(tmp_path / "iso"), eval_every=50, log_every=10),
    )


def test_isoflop_grid_members(tmp_path):
    base = sweep_base(tmp_path)
    budgets = [3e13, 1e14, 3e14]
    members = isoflop_grid(base, budgets, sizes_per_budget=5)
    assert len(members) == 15
    tokens_per_step = 8 * 64
    for C in budgets:
        group = [m for m in members if m.name.startswith(f"iso-C{C:.0e}-")]
        assert len(group) == 5
        sizes = [count_params(m.model) for m in group]
        assert sizes == sorted(sizes) and len(set(sizes)) == 5
        centre = math.sqrt(C / 120)  # D = 20 N and C = 6ND
        assert sizes[0] < centre < sizes[-1]
        for m, n in zip(group, sizes):
            assert m.name == f"iso-C{C:.0e}-N{n}"
            assert m.train.out_dir == os.path.join(str(tmp_path / "iso"), m.name)
            spent = flops_per_token(m.model, 64) * m.train.steps * tokens_per_step
            assert abs(spent / C - 1) <= 0.5 / m.train.steps + 1e-12  # whole steps
            assert m.optim.warmup_steps == round(0.05 * m.train.steps)
            assert m.optim.lr == base.optim.lr and m.data == base.data
            # Freshly resolved shapes: GPT-2's d_ff is 4 d_model of the new width, heads of 64.
            assert m.model.d_ff == 4 * m.model.d_model and m.model.head_dim == 64
            assert m.model.vocab_size == 512 and m.model.max_seq_len == 128
            assert m.train.eval_every <= m.train.steps


def test_isoflop_grid_trains_each_shape_once_per_seed(tmp_path):
    base = sweep_base(tmp_path)
    one = isoflop_grid(base, [1e14], sizes_per_budget=5)
    two = isoflop_grid(base, [1e14], sizes_per_budget=5, seeds=(3, 7))
    assert len(two) == 10 and len({m.name for m in two}) == 10
    for m in one:  # each member of the one-seed grid, twice: same shape, steps and schedule, its own seed and folder
        runs = [r for r in two if r.name.startswith(m.name + "-s")]
        assert [r.name for r in runs] == [f"{m.name}-s3", f"{m.name}-s7"] and [r.train.seed for r in runs] == [3, 7]
        for r in runs:
            assert (r.model, r.optim, r.data) == (m.model, m.optim, m.data) and r.train.steps == m.train.steps
            assert r.train.out_dir == os.path.join(str(tmp_path / "iso"), r.name)
    assert all(m.train.seed == base.train.seed for m in one)
    with pytest.raises(ConfigError, match="distinct seeds"):
        isoflop_grid(base, [1e14], seeds=(1, 1))


def test_isoflop_grid_llama_gqa(tmp_path):
    base = sweep_base(tmp_path, family="llama", n_layers=2, d_model=256, n_heads=4, n_kv_heads=2)
    members = isoflop_grid(base, [1e15], sizes_per_budget=5)
    assert len(members) == 5
    for m in members:
        cfg = m.model
        assert cfg.n_heads == 2 * cfg.n_kv_heads and cfg.head_dim == 64
        assert cfg.d_ff == 256 * -(-(8 * cfg.d_model // 3) // 256)  # Llama's default for this width
        assert cfg.tie_embeddings is False and cfg.bias is False


def test_isoflop_grid_budget_too_small(tmp_path):
    with pytest.raises(ConfigError, match=r"budget C=1e\+08 is too small for the smallest shape"):
        isoflop_grid(sweep_base(tmp_path), [1e14, 1e8])
    with pytest.raises(ConfigError, match="at least 3 sizes"):
        isoflop_grid(sweep_base(tmp_path), [1e14], sizes_per_budget=2)


def test_aspect_ratio_shapes():
    rule = AspectRatioShapes(aspect=64, head_dim=64)
    base = ModelConfig(family="gpt2", vocab_size=512, max_seq_len=128)
    for target in np.geomspace(1e6, 3e8, 12):
        cfg = rule(base, target)
        assert abs(math.log(count_params(cfg) / target)) < math.log(1.3)
        assert 32 <= cfg.d_model / cfg.n_layers <= 128
    big = rule(base, 1.2e8)
    assert 40 < big.d_model / big.n_layers < 100  # near the aspect when the ladder is fine


def test_wsd_branches_share_the_stable_phase(tmp_path):
    base = sweep_base(tmp_path)
    tokens_per_step = 8 * 64
    members = wsd_branches(base, [tokens_per_step * s for s in (500, 1000, 2000)], decay_fraction=0.2)
    assert [m.train.steps for m in members] == [2000, 1000, 500]
    trunk = members[0]
    for m in members:
        assert m.optim.schedule == "wsd" and m.optim.decay_fraction == 0.2
        assert m.optim.warmup_steps == 100 and m.model == base.model
    # The learning rates (from the optimizer's own schedule) agree with the trunk's until each branch cools down,
    # and the trunk keeps a checkpoint at each cooldown start.
    trunk_lr = make_schedule(trunk.optim, trunk.train.steps)
    for m in members[1:]:
        lr = make_schedule(m.optim, m.train.steps)
        start = m.train.steps - round(0.2 * m.train.steps)
        assert all(float(lr(s)) == float(trunk_lr(s)) for s in range(0, start + 1, 7))
        assert float(lr(m.train.steps)) == pytest.approx(base.optim.min_lr)
        assert start % trunk.train.ckpt_every == 0
        assert trunk.train.keep_checkpoints * trunk.train.ckpt_every >= trunk.train.steps - start
    with pytest.raises(ConfigError, match="before the shared warmup"):
        wsd_branches(base, [tokens_per_step * 10, tokens_per_step * 10_000], warmup_fraction=0.05)


def fake_run(root, experiment, rows):
    """A run directory as the trainer leaves it: config.json and metrics.jsonl."""
    run_dir = experiment.run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(experiment.to_json())
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def train_rows(experiment, final_loss):
    per_step = experiment.data.batch_size * experiment.data.seq_len
    steps = experiment.train.steps
    rows = []
    for s in sorted({*range(0, steps, max(1, steps // 4)), steps}):
        if s:
            rows.append({"step": s, "tokens": s * per_step, "loss": final_loss + (steps - s) / steps, "lr": 1e-3,
                         "grad_norm": 1.0, "tokens_per_sec": 1e4, "mfu": 0.1})
        rows.append({"step": s, "val_loss": final_loss + 0.05 + (steps - s) / steps, "val_bpb": 1.0})
    return rows


def test_branch_from_trunk_copies_checkpoint_and_metrics(tmp_path):
    base = sweep_base(tmp_path)
    trunk, branch = wsd_branches(base, [512 * 400, 512 * 100])
    fake_run(tmp_path, trunk, train_rows(trunk, 2.0))
    start = 100 - 20
    with pytest.raises(ConfigError, match=f"no checkpoint at step {start}"):
        branch_from_trunk(trunk, branch)
    step_dir = os.path.join(trunk.run_dir, "checkpoints", str(start))
    os.makedirs(os.path.join(step_dir, "state"))
    with open(os.path.join(step_dir, "state", "arrays"), "w") as f:
        f.write("weights")
    copied = branch_from_trunk(trunk, branch)
    assert copied == os.path.join(branch.run_dir, "checkpoints", str(start))
    with open(os.path.join(copied, "state", "arrays")) as f:
        assert f.read() == "weights"
    with open(os.path.join(branch.run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps and max(steps) <= start
    with pytest.raises(ConfigError, match="already has checkpoints"):
        branch_from_trunk(trunk, branch)
    other = dataclasses.replace(branch, optim=dataclasses.replace(branch.optim, lr=1.0))
    with pytest.raises(ConfigError, match="not a branch"):
        branch_from_trunk(trunk, other)


def test_collect_results_and_csv_round_trip(tmp_path):
    base = sweep_base(tmp_path)
    members = isoflop_grid(base, [3e13], sizes_per_budget=5)
    losses = [3.4, 3.1, 3.0, 3.05, 3.2]
    for m, loss in zip(members, losses):
        fake_run(tmp_path, m, train_rows(m, loss))
    rows = collect_results(str(tmp_path / "iso"))
    assert [r["name"] for r in rows] == sorted(m.name for m in members)
    by_name = {r["name"]: r for r in rows}
    for m, loss in zip(members, losses):
        r = by_name[m.name]
        D = m.train.steps * 8 * 64
        assert r["N"] == count_params(m.model) and r["N_nonembed"] == count_nonembedding_params(m.model)
        assert r["D"] == D and r["C"] == pytest.approx(flops_per_token(m.model, 64) * D)
        assert r["train_loss"] == pytest.approx(loss) and r["val_loss"] == pytest.approx(loss + 0.05)
    path = tmp_path / "results.csv"
    write_csv(rows, str(path))
    back = read_csv(str(path))
    assert back == rows
    curves = collect_curves(str(tmp_path / "iso"))
    assert len(curves) == 5 and all(c.tokens[-1] == by_name[c.name]["D"] for c in curves)
    # An unfinished run is named, or left out on request.
    m = members[0]
    fake_run(tmp_path, m, [r for r in train_rows(m, 3.4) if r["step"] < m.train.steps])
    with pytest.raises(ScalingError, match=f"run .*{re.escape(m.name)} is unfinished"):
        collect_results(str(tmp_path / "iso"))
    assert len(collect_results(str(tmp_path / "iso"), allow_unfinished=True)) == 4


def test_read_csv_errors(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("name,N,D,C,train_loss,val_loss\na,1e6,2e7,1e14,3.0,3.1\n")
    with pytest.raises(ScalingError, match="lacks column.*N_nonembed"):
        read_csv(str(path))
    path.write_text("name,N,N_nonembed,D,C,train_loss,val_loss\na,1e6,5e5,2e7,1e14,3.0,3.1\nb,2e6,1e6,1e7,1e14,3.0,0\n")
    with pytest.raises(ScalingError, match=r"line 3 \(b\): val_loss = 0.0 is not a positive number"):
        read_csv(str(path))
    path.write_text("name,N,N_nonembed,D,C,train_loss,val_loss\na,1e6,5e5,x,1e14,3.0,3.1\n")
    with pytest.raises(ScalingError, match="line 2: D = 'x' is not a number"):
        read_csv(str(path))
    with pytest.raises(ScalingError, match="absent.csv does not exist: give a results CSV"):
        read_csv(str(tmp_path / "absent.csv"))
    with pytest.raises(ScalingError, match=r"line 2 \(a\): N = -1.0"):
        write_csv([{"name": "a", "N": -1.0, "N_nonembed": 1.0, "D": 1.0, "C": 1.0, "train_loss": 1.0,
                    "val_loss": 1.0}], str(tmp_path / "w.csv"))


@pytest.mark.skipif(not EPOCH_CSV.exists(), reason=f"reference data not present at {DATA}")
def test_read_csv_epoch_layout():
    rows = read_csv(str(EPOCH_CSV))
    assert len(rows) == 245
    first = rows[0]
    assert first["N"] == pytest.approx(6795600349.289497) and first["loss"] == pytest.approx(5.005581996196243)
    assert first["D"] == pytest.approx(9.993852799709755e18 / (6 * 6795600349.289497))


# ---------------------------------------------------------------------------------------------------------------
# python -m tools.fit_scaling

from tools import fit_scaling  # noqa: E402


def known_law_sweep(tmp_path, budgets=(3e13, 1e14, 3e14)):
    """A sweep directory whose runs' losses follow the known law (curves included), as the trainer leaves it."""
    base = sweep_base(tmp_path)
    members = isoflop_grid(base, list(budgets), sizes_per_budget=5)
    per_step = 8 * 64
    for m in members:
        n = count_params(m.model)
        steps = m.train.steps
        rows = []
        for s in np.unique(np.geomspace(1, steps, 12).round().astype(int)):
            s = int(s)
            rows.append({"step": s, "tokens": s * per_step, "loss": float(law(n, s * per_step)), "lr": 1e-3,
                         "grad_norm": 1.0, "tokens_per_sec": None, "mfu": None})
        rows.append({"step": steps, "val_loss": float(law(n, steps * per_step)) + 0.01, "val_bpb": 1.0})
        fake_run(tmp_path, m, rows)
    return str(tmp_path / "iso")


@pytest.mark.slow
def test_fit_scaling_tool_on_a_sweep(tmp_path, capsys):
    sweep = known_law_sweep(tmp_path)
    out = tmp_path / "fits"
    assert fit_scaling.main([sweep, "--out", str(out), "--bootstrap", "8"]) == 0
    printed = capsys.readouterr().out
    assert "Approach 1" in printed and "Approach 2 (IsoFLOP parabolas, 3 budgets" in printed and "alpha" in printed
    for name in ("isoflop.png", "optimal.png", "parametric.png", "envelope.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fits = json.loads((out / "fits.json").read_text())
    assert set(fits) == {"approach1", "approach2", "approach3"}
    assert fits["approach3"]["values"]["alpha"] == pytest.approx(ALPHA, abs=0.05)
    assert set(fits["approach2"]["intervals"]) >= {"a", "b"}
    assert len(read_csv(str(out / "results.csv"))) == 15


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,N,N_nonembed,D,C,train_loss\na,1,1,1,1,1\n", r"lacks column\(s\) val_loss"),
        ("name,N,N_nonembed,D,C,train_loss,val_loss\na,1,1,1,1,1,-2\n", r"line 2 \(a\): val_loss = -2.0"),
    ],
)
def test_fit_scaling_tool_bad_csv(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert fit_scaling.main([str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and re.search(message, err)


def test_fit_scaling_tool_names_a_budget_without_a_parabola(tmp_path, capsys):
    rows = collect_results(known_law_sweep(tmp_path))
    at_1e14 = [r for r in rows if r["name"].startswith("iso-C1e+14-")]
    rows = [r for r in rows if r not in at_1e14] + at_1e14[:2]
    path = tmp_path / "two.csv"
    write_csv(rows, str(path))
    assert fit_scaling.main([str(path), "--approaches", "2"]) == 2
    err = capsys.readouterr().err
    assert "budget C=1e+14 has 2 model size(s)" in err
    assert fit_scaling.main([str(path), "--approaches", "2", "--unfittable", "skip", "--bootstrap", "0",
                             "--out", str(tmp_path / "o")]) == 0
    assert "skipped 1 budgets" in capsys.readouterr().out


def test_fit_scaling_tool_missing_source(tmp_path, capsys):
    assert fit_scaling.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nothing'} does not exist: give a results CSV or a sweep's run directory\n"


def test_fit_and_plot_is_the_tool_as_a_library_call(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    write_csv(collect_results(known_law_sweep(tmp_path)), str(path))
    with pytest.raises(ScalingError, match="--approaches '4'"):
        scaling.fit_and_plot(str(path), str(tmp_path / "o"), approaches="4")
    assert not (tmp_path / "o").exists()
    fits = scaling.fit_and_plot(str(path), str(tmp_path / "o"), approaches=(2,), bootstrap=0)
    assert set(fits) == {"2"} and len(fits["2"].budgets) == 3
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fits.json", "isoflop.png", "optimal.png"]
    out, err = capsys.readouterr()
    assert "Approach 2 (IsoFLOP parabolas, 3 budgets" in out and "wrote isoflop.png" in out and err == ""
