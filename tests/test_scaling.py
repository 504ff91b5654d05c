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

    monkeypatch.setattr(scaling, "minimize", lambda *args, **kwargs: Stuck())
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
    values, grads = scaling._huber_objective(params, log_n, log_d, log_loss, weights, 0.05)

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
    x, f, converged = scaling._batched_lbfgs(fun, x0, gtol=1e-9, ftol=0.0)
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
    return [Curve(N=float(n), tokens=tokens, loss=law(n, tokens), name=f"N{n:.0e}") for n in np.geomspace(1e7, 1e10, sizes)]


def test_envelope_recovers_known_exponents():
    fit = fit_envelope(known_law_curves(), bootstrap=30)
    assert fit.a == pytest.approx(A_EXP, abs=0.02)
    assert fit.b == pytest.approx(1 - A_EXP, abs=0.02)
    # Every envelope point is the best available size: no listed size does better there.
    sizes = np.geomspace(1e7, 1e10, 20)
    for c, n, l in zip(fit.C[::20], fit.n_opt[::20], fit.loss[::20]):
        assert l <= law(sizes, c / (6 * sizes)).min() + 1e-3
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
    far = Curve(N=1e10, tokens=np.array([1e15, 2e15]), loss=np.array([2.0, 1.9]))
    with pytest.raises(ScalingError, match="do not overlap"):
        fit_envelope([Curve(N=1e7, tokens=np.array([1e8, 2e8]), loss=np.array([4.0, 3.9])), far])
