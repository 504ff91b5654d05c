"""Scaling laws: Chinchilla's three approaches to the compute-optimal frontier, with bootstrap intervals.

Approach 1 (`fit_envelope`): the envelope of minimum loss over training curves against compute C = 6ND.
Approach 2 (`fit_isoflop`): a parabola in log N per compute budget; the optima follow N_opt = k C^a.
Approach 3 (`fit_parametric`): L(N, D) = E + A / N^alpha + B / D^beta, fitted as Besiroglu et al. 2024 (Epoch AI)
refitted Hoffmann et al. 2022: a Huber loss on log L, summed over points, minimised by L-BFGS from a grid of starts.

Sweeps: `isoflop_grid` declares the runs of an IsoFLOP sweep as Experiments, `wsd_branches` the runs of one model
size under the warmup-stable-decay schedule (Hägele et al. 2024), and `collect_results` reads finished runs back
into a table (`write_csv`, `read_csv`).

Every fit validates its input and raises `ScalingError` (a `JaxlmError`) naming the budget, column or row at fault;
a fit that does not converge raises rather than returning numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.flops import count_nonembedding_params, count_params, flops_per_token


class ScalingError(JaxlmError, ValueError):
    """Scaling data that cannot be fitted, or a fit that failed."""


# ----------------------------------------------------------------------------------------------------------------
# Input checks and bootstrap summaries


def _positive_array(name: str, values, n: int | None = None) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ScalingError(f"{name} must be numbers: {e}") from None
    if x.ndim != 1:
        raise ScalingError(f"{name} must be one-dimensional, got shape {x.shape}")
    if n is not None and len(x) != n:
        raise ScalingError(f"{name} has {len(x)} values where {n} were expected: give one value per run")
    bad = np.flatnonzero(~(np.isfinite(x) & (x > 0)))
    if len(bad):
        i = int(bad[0])
        raise ScalingError(f"{name}[{i}] = {float(x[i])!r} is not a positive finite number ({len(bad)} such values)")
    return x


def _summarise(samples: dict[str, np.ndarray], level: float) -> tuple[dict, dict]:
    """Percentile intervals at `level` and standard deviations of bootstrap samples."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()}
    stderrs = {k: float(np.std(v, ddof=1)) for k, v in samples.items()}
    return intervals, stderrs


def _check_bootstrap(bootstrap: int, level: float) -> None:
    if bootstrap < 0 or (0 < bootstrap < 2):
        raise ScalingError(f"bootstrap={bootstrap}: use 0 (no intervals) or at least 2 resamples")
    if not 0 < level < 1:
        raise ScalingError(f"level={level} must be in (0, 1), e.g. 0.95")


def _too_many_failures(what: str, failed: int, total: int) -> None:
    if failed * 2 > total:
        raise ScalingError(
            f"{what}: {failed} of {total} bootstrap resamples could not be fitted; add points (more sizes per "
            "budget or more runs) before asking for intervals"
        )


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of log y = log k + p log x; returns (p, k)."""
    p, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(p), float(np.exp(logk))


# ----------------------------------------------------------------------------------------------------------------
# Approach 3: the parametric fit


# Epoch AI's grid of initialisations: alpha, beta, e = log E, a = log A, b = log B.
_ALPHA_GRID = np.arange(0.0, 2.01, 0.5)
_E_GRID = np.arange(-1.0, 1.01, 0.5)
_AB_GRID = np.arange(0.0, 25.01, 5.0)
_NAMES = ("E", "A", "B", "alpha", "beta", "a", "b")


def _initial_grid() -> np.ndarray:
    """All 4500 starts as rows (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = np.meshgrid(_AB_GRID, _AB_GRID, _E_GRID, _ALPHA_GRID, _ALPHA_GRID, indexing="ij")
    return np.stack([a.ravel(), b.ravel(), e.ravel(), alpha.ravel(), beta.ravel()], axis=1)


def _huber_objective(params, log_n, log_d, log_loss, weights, delta):
    """Summed Huber loss of log L against LSE(a - alpha log N, b - beta log D, e) and its gradient, per row.

    params: (R, 5) rows of (a, b, e, alpha, beta); weights: None, (n,) or (R, n) point multiplicities.
    Returns (R,) values and (R, 5) gradients; a row that overflows gives a non-finite value.
    """
    a, b, e, alpha, beta = (np.ascontiguousarray(params[:, i : i + 1]) for i in range(5))
    # The LSE without the usual max shift: the terms are the model's own A/N^alpha, B/D^beta and E, which stay
    # far from overflow at any sensible point; an overflowing trial step comes out non-finite and is rejected.
    # Operations write into their inputs where they can: at 4500 x 240 the temporaries cost as much as the maths.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e1 = np.multiply(alpha, log_n)
        np.exp(np.subtract(a, e1, out=e1), out=e1)
        e2 = np.multiply(beta, log_d)
        np.exp(np.subtract(b, e2, out=e2), out=e2)
        e3 = np.exp(e)
        total = np.add(e1, e2)
        total += e3
        r = np.log(total)
        np.subtract(log_loss, r, out=r)
        # Huber = c (|r| - c / 2) with c = min(|r|, delta); its derivative in r is clip(r, -delta, delta).
        abs_r = np.abs(r)
        c = np.minimum(abs_r, delta)
        if weights is not None:
            abs_r *= weights
        value = np.einsum("ij,ij->i", c, abs_r)
        if weights is not None:
            c *= np.sqrt(weights)
        value -= 0.5 * np.einsum("ij,ij->i", c, c)
        psi = np.clip(r, -delta, delta, out=r)
        if weights is not None:
            psi *= weights
        # d huber / d param = -psi * d LSE / d param; the LSE's derivatives are the softmax weights of its terms.
        q = np.divide(psi, total, out=psi)
        q1 = np.multiply(e1, q, out=e1)
        q2 = np.multiply(e2, q, out=e2)
        # einsum rather than `@`: a multithreaded BLAS matrix-vector product is many times slower at this size.
        grad = np.stack(
            [-q1.sum(1), -q2.sum(1), -e3[:, 0] * q.sum(1), np.einsum("ij,j->i", q1, log_n),
             np.einsum("ij,j->i", q2, log_d)],
            axis=1,
        )
    return value, grad


def _two_loop(g, S, Y, rho):
    """L-BFGS direction -H g for each row; empty history slots have rho = 0 and drop out."""
    q = g.copy()
    m = S.shape[1]
    alphas = np.zeros((g.shape[0], m))
    for j in range(m - 1, -1, -1):
        alphas[:, j] = rho[:, j] * np.einsum("ij,ij->i", S[:, j], q)
        q -= alphas[:, j, None] * Y[:, j]
    yy = np.einsum("ij,ij->i", Y[:, -1], Y[:, -1])
    gamma = np.where(rho[:, -1] > 0, 1.0 / np.maximum(rho[:, -1] * yy, 1e-300), 1.0)
    r = gamma[:, None] * q
    for j in range(m):
        beta = rho[:, j] * np.einsum("ij,ij->i", Y[:, j], r)
        r += S[:, j] * (alphas[:, j] - beta)[:, None]
    return -r


def _batched_lbfgs(fun, x0, *, memory=10, max_iter=500, gtol=1e-5, ftol=1e7 * np.finfo(float).eps, max_ls=40):
    """Minimise many independent problems at once with L-BFGS and a backtracking (Armijo) line search.

    fun(x, rows) -> (values, grads) evaluates the problems `rows` at points x. The stopping rules are scipy's
    L-BFGS-B defaults (projected gradient <= gtol, or relative reduction <= factr * eps). Returns x, f, converged.
    """
    x = np.array(x0, dtype=np.float64)
    n_rows, dim = x.shape
    f, g = fun(x, np.arange(n_rows))
    S, Y = np.zeros((n_rows, memory, dim)), np.zeros((n_rows, memory, dim))
    rho = np.zeros((n_rows, memory))
    active = np.isfinite(f) & np.all(np.isfinite(g), axis=1)
    converged = np.zeros(n_rows, dtype=bool)
    done = active & (np.abs(g).max(axis=1) <= gtol)
    converged[done], active[done] = True, False
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if len(rows) == 0:
            break
        xa, fa, ga = x[rows], f[rows], g[rows]
        d = _two_loop(ga, S[rows], Y[rows], rho[rows])
        slope = np.einsum("ij,ij->i", ga, d)
        fresh = (rho[rows, -1] == 0) | ~(slope < 0)
        if fresh.any():  # no usable curvature yet (or not a descent direction): a scaled gradient step
            rho[rows[fresh]] = 0.0
            d[fresh] = -ga[fresh]
            slope[fresh] = -np.einsum("ij,ij->i", ga[fresh], ga[fresh])
        step = np.where(fresh, np.minimum(1.0, 1.0 / np.sqrt(-slope)), 1.0)
        pending = np.ones(len(rows), dtype=bool)
        xn, fn, gn = xa.copy(), fa.copy(), ga.copy()
        for _ in range(max_ls):
            p = np.flatnonzero(pending)
            xt = xa[p] + step[p, None] * d[p]
            ft, gt = fun(xt, rows[p])
            ok = np.isfinite(ft) & np.all(np.isfinite(gt), axis=1) & (ft <= fa[p] + 1e-4 * step[p] * slope[p])
            xn[p[ok]], fn[p[ok]], gn[p[ok]] = xt[ok], ft[ok], gt[ok]
            pending[p[ok]] = False
            step[p[~ok]] *= 0.5
            if not pending.any():
                break
        moved = ~pending
        # Rows whose line search failed stop here, unconverged (the final polish with scipy decides).
        active[rows[pending]] = False
        upd = rows[moved]
        s, y = xn[moved] - xa[moved], gn[moved] - ga[moved]
        sy = np.einsum("ij,ij->i", s, y)
        good = sy > np.finfo(float).eps * np.einsum("ij,ij->i", y, y)
        ug = upd[good]
        S[ug] = np.roll(S[ug], -1, axis=1)
        Y[ug] = np.roll(Y[ug], -1, axis=1)
        rho[ug] = np.roll(rho[ug], -1, axis=1)
        S[ug, -1], Y[ug, -1], rho[ug, -1] = s[good], y[good], 1.0 / sy[good]
        x[upd], f[upd], g[upd] = xn[moved], fn[moved], gn[moved]
        small_step = (fa[moved] - fn[moved]) <= ftol * np.maximum(np.maximum(np.abs(fa[moved]), np.abs(fn[moved])), 1)
        flat = np.abs(gn[moved]).max(axis=1) <= gtol
        stop = small_step | flat
        converged[upd[stop]] = True
        active[upd[stop]] = False
    return x, f, converged


@dataclass(frozen=True, eq=False)
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap samples, intervals and standard errors (if any).

    `a` and `b` are the compute-optimal exponents N_opt ~ C^a, D_opt ~ C^b under C = 6ND.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    stderrs: dict[str, float] = field(default_factory=dict)
    bootstrap_failed: int = 0

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising the loss subject to C = 6ND (Hoffmann et al. 2022, eq. 4)."""
        C = np.asarray(C, dtype=np.float64)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n_opt = G * (C / 6.0) ** self.a
        return n_opt, C / (6.0 * n_opt)

    def values(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in _NAMES}


_TIGHT = {"ftol": 1e-15, "gtol": 1e-9, "maxiter": 20_000, "maxfun": 40_000}


def _polish(log_n, log_d, log_loss, weights, delta, start):
    """scipy's L-BFGS-B from `start`; returns (x, f, converged)."""

    def fun(p):
        value, grad = _huber_objective(p[None], log_n, log_d, log_loss, weights, delta)
        return float(value[0]), grad[0]

    # Tight tolerances: with an objective of order delta * n, scipy's default relative-reduction test stops
    # within a few steps of any start, which would leave bootstrap refits where they began.
    res = minimize(fun, start, jac=True, method="L-BFGS-B", options=_TIGHT)
    # At a Huber optimum the line search can stop on round-off with the gradient already near zero.
    ok = bool(res.success) or float(np.abs(res.jac).max()) <= 1e-5
    return res.x, float(res.fun), ok and bool(np.all(np.isfinite(res.x)))


def _distinct_best(x, f, converged, count):
    """Up to `count` converged end points with the lowest objective, at least 1e-3 apart."""
    order = [i for i in np.argsort(f) if np.isfinite(f[i])]
    chosen: list[int] = []
    for i in order:
        if all(np.abs(x[i] - x[j]).max() > 1e-3 for j in chosen):
            chosen.append(i)
        if len(chosen) == count:
            break
    # Unconverged end points are still worth polishing, but converged ones come first.
    return sorted(chosen, key=lambda i: (not converged[i], f[i]))


def _minimise_parametric(log_n, log_d, log_loss, weights, delta, starts, polish_count):
    """Batched L-BFGS from every start, then scipy L-BFGS-B from the best distinct end points; the best wins."""

    def fun(params, rows):
        w = weights if weights is None or weights.ndim == 1 else weights[rows]
        return _huber_objective(params, log_n, log_d, log_loss, w, delta)

    x, f, converged = _batched_lbfgs(fun, starts)
    ends = _distinct_best(x, f, converged, polish_count)
    polished = [_polish(log_n, log_d, log_loss, weights, delta, x[i]) for i in ends]
    good = [(px, pf) for px, pf, ok in polished if ok]
    best = min(good, key=lambda r: r[1]) if good else None
    lowest = min((pf for _, pf, _ in polished), default=np.inf)
    if best is not None and lowest < best[1] - 1e-9 * abs(best[1]):
        best = None  # an unconverged point beats every converged one: the minimum was not found
    return best, x, f, converged


def fit_parametric(
    N, D, loss, *, delta: float = 1e-3, bootstrap: int = 0, seed: int = 0, level: float = 0.95, polish: int = 5
) -> ParametricFit:
    """Approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta as Epoch AI did (Besiroglu et al. 2024).

    Minimises the Huber loss (delta) between log L and LSE(a - alpha log N, b - beta log D, e), summed over
    points, from every start of the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, ..., 1}, a, b in {0, 5, ..., 25}
    (4500 starts, run together by a vectorised L-BFGS); the best distinct end points are refined with scipy's
    L-BFGS-B and the lowest objective is kept. With bootstrap > 0, each resample of the points (with replacement)
    is refitted from the full fit's best distinct end points, which gives percentile intervals at `level` and
    standard errors for E, A, B, alpha, beta and the exponents a, b.
    """
    loss = _positive_array("loss", loss)
    n = len(loss)
    N, D = _positive_array("N", N, n), _positive_array("D", D, n)
    if n <= 5:
        raise ScalingError(f"fit_parametric needs more points than its 5 parameters, got {n}")
    if not delta > 0:
        raise ScalingError(f"delta={delta} must be positive")
    _check_bootstrap(bootstrap, level)
    log_n, log_d, log_loss = np.log(N), np.log(D), np.log(loss)
    best, x, f, converged = _minimise_parametric(log_n, log_d, log_loss, None, delta, _initial_grid(), polish)
    if best is None:
        raise ScalingError(
            f"the parametric fit did not converge (best of {len(x)} starts refined by L-BFGS-B without reaching a "
            "minimum): check that loss falls with N and D, and that the runs are not duplicated or mislabelled"
        )
    (a, b, e, alpha, beta), objective = best
    if not (alpha > 0 and beta > 0):
        raise ScalingError(
            f"the parametric fit found alpha={alpha:.3g}, beta={beta:.3g}: loss does not fall with both N and D, "
            "so there is no compute-optimal frontier; check the runs"
        )
    fit = dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=alpha, beta=beta)
    samples: dict[str, np.ndarray] = {}
    intervals, stderrs, failed = {}, {}, 0
    if bootstrap:
        rng = np.random.default_rng(seed)
        starts = x[_distinct_best(x, f, converged, polish)]
        k = len(starts)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(bootstrap)]).astype(float)
        # All resamples and starts in one batch: a resample is the original points weighted by their multiplicity.
        bx, bf, bconv = _batched_lbfgs(
            lambda p, rows: _huber_objective(p, log_n, log_d, log_loss, counts[rows // k], delta),
            np.tile(starts, (bootstrap, 1)),
            gtol=_TIGHT["gtol"],
            ftol=_TIGHT["ftol"],
        )
        draws = []
        for r in range(bootstrap):
            rows = slice(r * k, (r + 1) * k)
            i = _distinct_best(bx[rows], bf[rows], bconv[rows], 1)
            px, _, ok = _polish(log_n, log_d, log_loss, counts[r], delta, bx[rows][i[0]]) if i else (None, None, False)
            if not ok:
                failed += 1
                continue
            a_, b_, e_, al_, be_ = px
            if not (al_ > 0 and be_ > 0):  # no compute-optimal frontier in this resample
                failed += 1
                continue
            draws.append((np.exp(e_), np.exp(a_), np.exp(b_), al_, be_, be_ / (al_ + be_), al_ / (al_ + be_)))
        _too_many_failures("fit_parametric", failed, bootstrap)
        table = np.array(draws)
        samples = {name: table[:, i] for i, name in enumerate(_NAMES)}
        intervals, stderrs = _summarise(samples, level)
    return ParametricFit(
        **{k: float(v) for k, v in fit.items()},
        objective=objective,
        n_points=n,
        samples=samples,
        intervals=intervals,
        stderrs=stderrs,
        bootstrap_failed=failed,
    )


# ----------------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles


def group_budgets(C, rtol: float = 0.05) -> np.ndarray:
    """Label each point with its compute budget: sorted budgets within a factor (1 + rtol) of a group's first
    member share a label. Members of one sweep budget differ a little because steps are whole numbers."""
    C = _positive_array("C", C)
    order = np.argsort(C, kind="stable")
    labels = np.empty(len(C), dtype=int)
    label, first = -1, 0.0
    for i in order:
        if label < 0 or C[i] > first * (1 + rtol):
            label, first = label + 1, C[i]
        labels[i] = label
    return labels


@dataclass(frozen=True, eq=False)
class IsoflopFit:
    """Per-budget parabolas loss = p[0] x^2 + p[1] x + p[2] in x = ln N, their optima, and N_opt = k_n C^a,
    D_opt = k_d C^b with D = C / (6N). `skipped` lists budgets left out (only with skip_unfittable=True)."""

    budgets: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    parabolas: np.ndarray
    labels: np.ndarray  # the budget index of each input point, -1 where its budget was skipped
    a: float
    k_n: float
    b: float
    k_d: float
    skipped: tuple[str, ...] = ()
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    stderrs: dict[str, float] = field(default_factory=dict)
    bootstrap_failed: int = 0
    bootstrap_dropped: int = 0  # (resample, budget) pairs left out of a resample's power law

    def n_opt_at(self, C):
        return self.k_n * np.asarray(C, dtype=np.float64) ** self.a

    def d_opt_at(self, C):
        return self.k_d * np.asarray(C, dtype=np.float64) ** self.b

    def values(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "k_n": self.k_n, "k_d": self.k_d}


def _budget_optimum(
    budget: float, N: np.ndarray, loss: np.ndarray, tried: tuple[float, float] | None = None
) -> tuple[float, float, np.ndarray]:
    """The parabola in ln N through one budget's runs and its minimum (N_opt, loss at N_opt, coefficients).

    `tried` is the range of sizes the optimum must lie in (default: the sizes given).
    """
    sizes = np.unique(N)
    if len(sizes) < 3:
        raise ScalingError(
            f"budget C={budget:.3g} has {len(sizes)} model size(s); a parabola needs at least 3: add sizes to it"
        )
    x = np.log(N)
    centre = x.mean()  # fit in centred x for conditioning, then expand
    p2, p1, p0 = np.polyfit(x - centre, loss, 2)
    if not p2 > 0:
        raise ScalingError(
            f"budget C={budget:.3g}: the parabola of loss against log N opens downward (no minimum); its runs do "
            "not bracket an optimum, or they are too noisy"
        )
    u = -p1 / (2 * p2)
    n_opt = float(np.exp(centre + u))
    lo, hi = tried or (sizes[0], sizes[-1])
    if not lo <= n_opt <= hi:
        raise ScalingError(
            f"budget C={budget:.3g}: the fitted optimum N={n_opt:.3g} lies outside the sizes tried "
            f"({lo:.3g} to {hi:.3g}); add sizes beyond it"
        )
    loss_opt = float(p0 - p1 * p1 / (4 * p2))
    coeffs = np.array([p2, p1 - 2 * p2 * centre, p0 - p1 * centre + p2 * centre * centre])
    return n_opt, loss_opt, coeffs


def _isoflop_optima(N, C, loss, labels, tried=None):
    """Per budget label: (budget, N_opt, loss_opt, coefficients) or the ScalingError that prevented a fit."""
    out = []
    for g in range(labels.max() + 1):
        idx = np.flatnonzero(labels == g)
        budget = float(np.exp(np.log(C[idx]).mean()))
        try:
            out.append((budget, *_budget_optimum(budget, N[idx], loss[idx], tried[g] if tried else None)))
        except ScalingError as e:
            out.append(e)
    return out


def _power_laws_of_optima(budgets, n_opt):
    budgets, n_opt = np.asarray(budgets), np.asarray(n_opt)
    a, k_n = _power_law(budgets, n_opt)
    b, k_d = _power_law(budgets, budgets / (6.0 * n_opt))
    return a, k_n, b, k_d


def fit_isoflop(
    N,
    C,
    loss,
    *,
    budget_rtol: float = 0.05,
    skip_unfittable: bool = False,
    bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> IsoflopFit:
    """Approach 2: per compute budget, a parabola of loss in ln N and its minimum; then power laws of the optima.

    Points whose C agree within `budget_rtol` share a budget (`group_budgets`). A budget with fewer than three
    sizes, a parabola that opens downward, or an optimum outside the sizes tried raises `ScalingError` naming the
    budget; with `skip_unfittable` such budgets are left out and listed in `skipped` instead. With bootstrap > 0,
    points are resampled within each budget. A budget whose resample has no bracketed optimum (say, fewer than
    three distinct sizes drawn) is left out of that resample's power law and counted in `bootstrap_dropped`; a
    resample left with fewer than two budgets counts in `bootstrap_failed`.
    """
    loss = _positive_array("loss", loss)
    N, C = _positive_array("N", N, len(loss)), _positive_array("C", C, len(loss))
    _check_bootstrap(bootstrap, level)
    raw_labels = group_budgets(C, budget_rtol)
    results = _isoflop_optima(N, C, loss, raw_labels)
    kept = [g for g, r in enumerate(results) if not isinstance(r, ScalingError)]
    errors = [r for r in results if isinstance(r, ScalingError)]
    if errors and not skip_unfittable:
        raise errors[0]
    if len(kept) < 2:
        raise ScalingError(
            f"fit_isoflop needs at least 2 budgets with a fitted optimum to fit N_opt = k C^a, got {len(kept)}"
            + (f" ({len(errors)} skipped, e.g. {errors[0]})" if errors else "")
        )
    relabel = np.full(len(results), -1)
    relabel[kept] = np.arange(len(kept))
    labels = relabel[raw_labels]
    budgets, n_opt, loss_opt, parabolas = (np.array(v) for v in zip(*(results[g] for g in kept)))
    a, k_n, b, k_d = _power_laws_of_optima(budgets, n_opt)
    samples: dict[str, np.ndarray] = {}
    intervals, stderrs, failed, dropped = {}, {}, 0, 0
    if bootstrap:
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(labels == g) for g in range(len(kept))]
        tried = [(N[g].min(), N[g].max()) for g in groups]
        draws = []
        for _ in range(bootstrap):
            idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
            res = _isoflop_optima(N[idx], C[idx], loss[idx], labels[idx], tried)
            ok = [g for g, r in enumerate(res) if not isinstance(r, ScalingError)]
            dropped += len(res) - len(ok)
            if len(ok) < 2:
                failed += 1
                continue
            row_n_opt = np.full(len(kept), np.nan)
            row_n_opt[ok] = [res[g][1] for g in ok]
            draws.append([*_power_laws_of_optima([res[g][0] for g in ok], row_n_opt[ok]), *row_n_opt])
        _too_many_failures("fit_isoflop", failed, bootstrap)
        table = np.array(draws)
        names = ["a", "k_n", "b", "k_d"] + [f"n_opt[{i}]" for i in range(len(kept))]
        samples = {name: table[:, i][np.isfinite(table[:, i])] for i, name in enumerate(names)}
        intervals, stderrs = _summarise({k: v for k, v in samples.items() if len(v) >= 2}, level)
    return IsoflopFit(
        budgets=budgets, n_opt=n_opt, d_opt=budgets / (6.0 * n_opt), loss_opt=loss_opt, parabolas=parabolas,
        labels=labels, a=a, k_n=k_n, b=b, k_d=k_d, skipped=tuple(str(e) for e in errors), samples=samples,
        intervals=intervals, stderrs=stderrs, bootstrap_failed=failed, bootstrap_dropped=dropped,
    )


# ----------------------------------------------------------------------------------------------------------------
# Approach 1: the envelope of training curves


@dataclass(frozen=True, eq=False)
class Curve:
    """One run's training curve: its size N and the loss after each number of tokens."""

    N: float
    tokens: np.ndarray
    loss: np.ndarray
    name: str = ""


@dataclass(frozen=True, eq=False)
class EnvelopeFit:
    """The minimum-loss envelope over curves at each compute C = 6ND (which run attains it, N_opt, D_opt), and
    the power laws N_opt = k_n C^a, D_opt = k_d C^b fitted to it."""

    C: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss: np.ndarray
    a: float
    k_n: float
    b: float
    k_d: float
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    stderrs: dict[str, float] = field(default_factory=dict)
    bootstrap_failed: int = 0

    def n_opt_at(self, C):
        return self.k_n * np.asarray(C, dtype=np.float64) ** self.a

    def d_opt_at(self, C):
        return self.k_d * np.asarray(C, dtype=np.float64) ** self.b

    def values(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "k_n": self.k_n, "k_d": self.k_d}


def _checked_curve(i: int, curve: Curve) -> tuple[float, np.ndarray, np.ndarray]:
    label = f"curve {i}" + (f" ({curve.name})" if curve.name else "")
    if not (np.isfinite(curve.N) and curve.N > 0):
        raise ScalingError(f"{label}: N = {curve.N!r} is not a positive number")
    try:
        tokens = _positive_array("tokens", curve.tokens)
        loss = _positive_array("loss", curve.loss, len(tokens))
    except ScalingError as e:
        raise ScalingError(f"{label}: {e}") from None
    if len(tokens) < 2:
        raise ScalingError(f"{label} has {len(tokens)} point(s); a training curve needs at least 2")
    order = np.argsort(tokens, kind="stable")
    tokens, loss = tokens[order], loss[order]
    if np.any(np.diff(tokens) == 0):
        raise ScalingError(f"{label} repeats a token count; give one loss per number of tokens")
    return float(curve.N), tokens, loss


def _envelope_core(curves, n_points):
    sizes = np.array([n for n, _, _ in curves])
    if len(np.unique(sizes)) < 2:
        raise ScalingError("fit_envelope needs curves of at least 2 model sizes")
    lo = np.array([6 * n * t[0] for n, t, _ in curves])
    hi = np.array([6 * n * t[-1] for n, t, _ in curves])
    # Where only one size has data the envelope is that size by default; keep the range where two sizes compete.
    per_size_lo = np.sort([lo[sizes == s].min() for s in np.unique(sizes)])
    per_size_hi = np.sort([hi[sizes == s].max() for s in np.unique(sizes)])
    c_lo, c_hi = per_size_lo[1], per_size_hi[-2]
    if not c_lo < c_hi:
        raise ScalingError("the training curves do not overlap in compute C = 6ND; the envelope needs overlapping runs")
    grid = np.geomspace(c_lo, c_hi, n_points)
    best = np.full(n_points, np.inf)
    best_n = np.zeros(n_points)
    smallest = np.full(n_points, np.inf)  # the range of sizes with data at each C
    largest = np.zeros(n_points)
    for n, t, l in curves:
        want = np.log(grid / (6 * n))
        inside = (want >= np.log(t[0])) & (want <= np.log(t[-1]))
        at = np.full(n_points, np.inf)
        at[inside] = np.interp(want[inside], np.log(t), l)
        better = at < best
        best[better], best_n[better] = at[better], n
        smallest[inside] = np.minimum(smallest[inside], n)
        largest[inside] = np.maximum(largest[inside], n)
    # Where the smallest or largest size with data wins, the optimum may lie beyond it: the point only bounds
    # N_opt, and keeping it would flatten the fitted slope. (Also drops C with no data from any run.)
    interior = np.isfinite(best) & (best_n > smallest) & (best_n < largest)
    if len(np.unique(best_n[interior])) < 2:
        raise ScalingError(
            "the envelope's optimum is a size between the smallest and largest run at fewer than two sizes: add "
            "smaller and larger runs so that the optimum is bracketed over a range of compute"
        )
    grid, best, best_n = grid[interior], best[interior], best_n[interior]
    d_opt = grid / (6 * best_n)
    a, k_n = _power_law(grid, best_n)
    b, k_d = _power_law(grid, d_opt)
    return dict(C=grid, n_opt=best_n, d_opt=d_opt, loss=best, a=a, k_n=k_n, b=b, k_d=k_d)


def fit_envelope(
    curves: Sequence[Curve], *, n_points: int = 200, bootstrap: int = 0, seed: int = 0, level: float = 0.95
) -> EnvelopeFit:
    """Approach 1: at each of `n_points` log-spaced compute values C = 6ND, the run with the lowest loss
    (curves interpolated linearly in log tokens) gives N_opt and D_opt; power laws are fitted to them.

    The range is where at least two model sizes have data; compute values where the smallest or largest size
    with data wins are left out (the optimum is not bracketed there). With bootstrap > 0, whole runs are resampled.
    """
    if len(curves) < 2:
        raise ScalingError(f"fit_envelope needs at least 2 training curves, got {len(curves)}")
    if n_points < 2:
        raise ScalingError(f"n_points={n_points} must be at least 2")
    _check_bootstrap(bootstrap, level)
    checked = [_checked_curve(i, c) for i, c in enumerate(curves)]
    core = _envelope_core(checked, n_points)
    samples: dict[str, np.ndarray] = {}
    intervals, stderrs, failed = {}, {}, 0
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            try:
                res = _envelope_core([checked[i] for i in rng.integers(0, len(checked), len(checked))], n_points)
            except ScalingError:
                failed += 1
                continue
            draws.append([res["a"], res["b"], res["k_n"], res["k_d"]])
        _too_many_failures("fit_envelope", failed, bootstrap)
        table = np.array(draws)
        samples = {name: table[:, i] for i, name in enumerate(["a", "b", "k_n", "k_d"])}
        intervals, stderrs = _summarise(samples, level)
    return EnvelopeFit(**core, samples=samples, intervals=intervals, stderrs=stderrs, bootstrap_failed=failed)


# ----------------------------------------------------------------------------------------------------------------
# Sweeps: IsoFLOP grids and WSD branches


def _family_d_ff(cfg: ModelConfig) -> int:
    return ModelConfig(family=cfg.family, d_model=cfg.d_model, n_heads=cfg.n_heads).d_ff


def reshape_model(base: ModelConfig, n_layers: int, d_model: int, head_dim: int) -> ModelConfig:
    """`base` with a new depth and width and heads of `head_dim`, built afresh so that derived fields resolve.

    A default d_ff stays the family default; a custom one keeps its ratio to d_model. Grouped-query attention
    keeps (as near as the head count allows) its group size.
    """
    heads = d_model // head_dim
    group = base.n_heads // base.n_kv_heads
    if d_model % head_dim or heads % group:
        raise ConfigError(
            f"d_model={d_model} is not a whole number of {group}-head groups of head_dim {head_dim}: pick a width "
            f"that is a multiple of {group * head_dim}"
        )
    kv = heads // group
    d_ff = None if base.d_ff == _family_d_ff(base) else max(1, round(base.d_ff * d_model / base.d_model))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(n_layers=n_layers, d_model=d_model, n_heads=heads, n_kv_heads=kv, d_ff=d_ff)
    return ModelConfig(**fields)


@dataclass(frozen=True)
class AspectRatioShapes:
    """A family of shapes: d_model / n_layers near `aspect`, d_model a multiple of `head_dim`, heads of `head_dim`.

    Called with a base config and a target parameter count, it returns the shape whose count (`count`) is nearest
    the target in log; among shapes within 5% of that, the one whose aspect ratio is nearest `aspect`. Widths
    within a factor `band` of aspect * n_layers are allowed, which keeps the ladder of sizes fine at small scale.
    With grouped-query attention, widths are whole numbers of head groups, so the group size is kept.
    """

    aspect: float = 64.0
    head_dim: int = 64
    band: float = 2.0
    max_layers: int = 256
    count: Callable[[ModelConfig], int] = count_params

    def __post_init__(self):
        if not (self.aspect > 0 and self.head_dim > 0 and self.band >= 1 and self.max_layers > 0):
            raise ConfigError(
                f"AspectRatioShapes(aspect={self.aspect}, head_dim={self.head_dim}, band={self.band}, "
                f"max_layers={self.max_layers}): aspect, head_dim and max_layers must be positive and band >= 1"
            )

    def _widths(self, n_layers: int, group: int) -> range:
        step = self.head_dim * group
        lo = max(1, math.ceil(self.aspect * n_layers / self.band / step))
        hi = max(lo, math.floor(self.aspect * n_layers * self.band / step))
        return range(lo * step, hi * step + 1, step)

    def __call__(self, base: ModelConfig, n_params: float) -> ModelConfig:
        target = math.log(max(n_params, 1.0))
        group = base.n_heads // base.n_kv_heads
        best: list[tuple[float, float, ModelConfig]] = []
        for n_layers in range(1, self.max_layers + 1):
            widths = self._widths(n_layers, group)
            # Counts grow with depth at a fixed width band: stop once the narrowest shape is far above target.
            if math.log(self.count(reshape_model(base, n_layers, widths[0], self.head_dim))) > target + math.log(4):
                break
            for d_model in widths:
                cfg = reshape_model(base, n_layers, d_model, self.head_dim)
                off = abs(math.log(self.count(cfg)) - target)
                best.append((off, abs(math.log(d_model / (n_layers * self.aspect))), cfg))
        if not best:
            return reshape_model(base, 1, self._widths(1, group)[0], self.head_dim)
        nearest = min(b[0] for b in best)
        return min((b for b in best if b[0] <= nearest + math.log(1.05)), key=lambda b: (b[1], b[0]))[2]


def _describe(cfg: ModelConfig) -> str:
    layers = "layer" if cfg.n_layers == 1 else "layers"
    return f"{cfg.n_layers} {layers} x d_model {cfg.d_model}, {cfg.n_heads} heads"


def isoflop_grid(
    base: Experiment,
    budgets: Sequence[float],
    *,
    sizes_per_budget: int = 5,
    shape_rule: Callable[[ModelConfig, float], ModelConfig] = AspectRatioShapes(),
    tokens_per_param: float = 20.0,
    span: float = 3.0,
    warmup_fraction: float = 0.05,
    count: Callable[[ModelConfig], int] = count_params,
) -> tuple[Experiment, ...]:
    """An IsoFLOP sweep: for each compute budget C, `sizes_per_budget` shapes spanning the expected optimum.

    The centre is Chinchilla's rule of thumb, D = tokens_per_param x N with C = 6ND, i.e. N = sqrt(C / (6 x 20));
    sizes are log-spaced from centre / span to centre x span and mapped to shapes by `shape_rule(base.model, N)`.
    Each member trains on D = C / flops_per_token tokens: TrainConfig.steps = D / (batch_size x seq_len), which is
    also the learning-rate schedule's length, with `warmup_fraction` of it as warmup. Members are named
    f"{base.name}-C{C:.0e}-N{N}" (N by `count`, which should be the count the shape rule targets) and write to
    <base run dir>/<member name>, so that the base's run directory is the sweep's (`collect_results`).
    """
    if sizes_per_budget < 3:
        raise ConfigError(
            f"sizes_per_budget={sizes_per_budget}: a parabola per budget needs at least 3 sizes (5 is usual)"
        )
    if not (span > 1 and tokens_per_param > 0 and 0 <= warmup_fraction < 1):
        raise ConfigError(
            f"span={span}, tokens_per_param={tokens_per_param}, warmup_fraction={warmup_fraction}: span must exceed 1, "
            "tokens_per_param be positive and warmup_fraction be in [0, 1)"
        )
    if not budgets:
        raise ConfigError("isoflop_grid needs at least one compute budget")
    tokens_per_step = base.data.batch_size * base.data.seq_len
    smallest = shape_rule(base.model, 1.0)
    n_smallest = count(smallest)
    members: list[Experiment] = []
    for C in sorted(float(c) for c in budgets):
        if not (math.isfinite(C) and C > 0):
            raise ConfigError(f"compute budget {C!r} is not a positive number of FLOPs")
        centre = math.sqrt(C / (6.0 * tokens_per_param))
        if centre / span < n_smallest:
            c_min = 6.0 * tokens_per_param * (n_smallest * span) ** 2
            raise ConfigError(
                f"budget C={C:.3g} is too small for the smallest shape ({_describe(smallest)}, N={n_smallest:,}): its "
                f"sizes would start at {centre / span:,.0f} parameters; use budgets of at least {c_min:.3g} FLOPs"
            )
        shapes: dict[tuple[int, int, int], ModelConfig] = {}
        for target in centre * np.geomspace(1 / span, span, sizes_per_budget):
            cfg = shape_rule(base.model, float(target))
            shapes[(cfg.n_layers, cfg.d_model, cfg.n_heads)] = cfg
        if len(shapes) < sizes_per_budget:
            raise ConfigError(
                f"budget C={C:.3g}: the shape rule gives only {len(shapes)} distinct shapes for sizes "
                f"{centre / span:,.0f} to {centre * span:,.0f}; widen span or use a finer shape family"
            )
        for cfg in sorted(shapes.values(), key=count):
            n = count(cfg)
            steps = round(C / flops_per_token(cfg, base.data.seq_len) / tokens_per_step)
            if steps < 1:
                raise ConfigError(
                    f"budget C={C:.3g} gives the {n:,}-parameter model less than one step of "
                    f"{tokens_per_step:,} tokens; raise the budget or lower batch_size x seq_len"
                )
            name = f"{base.name}-C{C:.0e}-N{n}"
            members.append(
                dataclasses.replace(
                    base,
                    name=name,
                    model=cfg,
                    optim=dataclasses.replace(base.optim, warmup_steps=round(warmup_fraction * steps)),
                    train=dataclasses.replace(
                        base.train,
                        steps=steps,
                        out_dir=os.path.join(base.run_dir, name),
                        eval_every=min(base.train.eval_every, steps),
                        log_every=min(base.train.log_every, steps),
                    ),
                )
            )
    return tuple(members)


def wsd_branches(
    base: Experiment, tokens: Sequence[float], *, decay_fraction: float = 0.2, warmup_fraction: float = 0.05
) -> tuple[Experiment, ...]:
    """Runs of one model (`base.model`) to several token counts under the WSD schedule (Hägele et al. 2024).

    Each member is a complete run: warmup, a stable phase at the peak rate, and a linear cooldown over its final
    `decay_fraction` of steps (OptimConfig.schedule='wsd'). Warmup is a fraction of the longest run and is the
    same for all, so up to its cooldown every member follows exactly the learning rate, data order and updates of
    the longest one: the members share one stable phase. The longest member comes first (the trunk) and saves a
    checkpoint at each other member's cooldown start. Run it, then start each shorter member from the trunk's
    checkpoint with `branch_from_trunk(trunk, member)`, which copies that checkpoint (parameters, optimizer state,
    data position) into the member's run directory so that the trainer resumes it there: only its cooldown is
    trained, and its result is identical to training it alone. (`TrainConfig.init_from=<trunk>/checkpoints/<step>`
    is a lighter alternative that loads the parameters only: the optimizer moments and data order start afresh,
    so the result is close to, not the same as, the full run.) Members are named f"{base.name}-wsd-D{D:.0e}".
    """
    if not tokens:
        raise ConfigError("wsd_branches needs at least one token count")
    if not (0 < decay_fraction < 1 and 0 <= warmup_fraction < 1):
        raise ConfigError(
            f"decay_fraction={decay_fraction}, warmup_fraction={warmup_fraction}: both must be in (0, 1) ([0, 1) for "
            "warmup)"
        )
    tokens_per_step = base.data.batch_size * base.data.seq_len
    steps = sorted({round(t / tokens_per_step) for t in tokens}, reverse=True)
    if steps[-1] < 1:
        raise ConfigError(f"token count {min(tokens):.3g} is less than one step of {tokens_per_step:,} tokens")
    warmup = round(warmup_fraction * steps[0])
    optim = dataclasses.replace(base.optim, schedule="wsd", decay_fraction=decay_fraction, warmup_steps=warmup)
    starts = [cooldown_start(s, optim) for s in steps[1:]]
    if starts and min(starts) <= warmup:
        raise ConfigError(
            f"the shortest run ({steps[-1]} steps) would start its cooldown before the shared warmup of {warmup} "
            "steps ends; lower warmup_fraction or drop the shortest token count"
        )
    trunk_saves = math.gcd(*starts) if starts else base.train.ckpt_every
    members = []
    for i, n_steps in enumerate(steps):
        name = f"{base.name}-wsd-D{n_steps * tokens_per_step:.0e}"
        train = dataclasses.replace(
            base.train,
            steps=n_steps,
            out_dir=os.path.join(base.run_dir, name),
            eval_every=min(base.train.eval_every, n_steps),
            log_every=min(base.train.log_every, n_steps),
        )
        if i == 0 and starts:
            train = dataclasses.replace(train, ckpt_every=trunk_saves, keep_checkpoints=n_steps // trunk_saves + 1)
        members.append(dataclasses.replace(base, name=name, optim=optim, train=train))
    return tuple(members)


def cooldown_start(steps: int, optim) -> int:
    """The step after which a WSD run of `steps` steps starts its cooldown (as jaxlm.optim.make_schedule has it)."""
    return steps - max(int(round(optim.decay_fraction * steps)), 1)


def branch_from_trunk(trunk: Experiment, branch: Experiment) -> str:
    """Seed `branch`'s run directory with the trunk's checkpoint at the branch's cooldown start, and the trunk's
    metrics up to it, so that training the branch resumes there. Returns the checkpoint directory copied."""
    step = cooldown_start(branch.train.steps, branch.optim)
    same = ("model", "data", "mesh")
    if any(getattr(trunk, s) != getattr(branch, s) for s in same) or trunk.optim != branch.optim:
        raise ConfigError(f"{branch.name} is not a branch of {trunk.name}: their model, data or optimizer differ")
    if trunk.train.seed != branch.train.seed or branch.train.steps > trunk.train.steps:
        raise ConfigError(f"{branch.name} is not a branch of {trunk.name}: it has another seed or is longer")
    source = os.path.join(trunk.run_dir, "checkpoints", str(step))
    if not os.path.isdir(source):
        raise ConfigError(
            f"the trunk {trunk.run_dir} has no checkpoint at step {step}, where {branch.name} starts its cooldown: "
            "train the trunk first (wsd_branches makes it save there)"
        )
    target = os.path.join(branch.run_dir, "checkpoints", str(step))
    if os.path.exists(os.path.join(branch.run_dir, "checkpoints")):
        raise ConfigError(f"{branch.run_dir} already has checkpoints; delete it to branch it again")
    shutil.copytree(source, target)
    rows = [r for r in _read_metrics(os.path.join(trunk.run_dir, "metrics.jsonl")) if r["step"] <= step]
    with open(os.path.join(branch.run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Results tables


COLUMNS = ("name", "N", "N_nonembed", "D", "C", "train_loss", "val_loss")
EPOCH_COLUMNS = ("Model Size", "Training FLOP", "loss")


def _read_metrics(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ScalingError(f"{path} line {number} is not JSON: the file is damaged") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ScalingError(f"{path} line {number} has no 'step': not a jaxlm metrics file")
            rows.append(row)
    return rows


def read_run(run_dir: str) -> tuple[Experiment, list[dict], list[dict]]:
    """A run directory's experiment (config.json), and its logged train rows and evaluations (metrics.jsonl), each
    by step; a step logged twice (a run resumed past it) keeps its last row."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise ScalingError(f"{run_dir} has no config.json: give the directory of a jaxlm run (such as runs/quickstart)")
    with open(config_path) as f:
        try:
            experiment = Experiment.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError) as e:
            raise ScalingError(f"{run_dir}/config.json is not a jaxlm config ({e})") from None
    rows = _read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train = {r["step"]: r for r in rows if "loss" in r and "tokens" in r}
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    return experiment, [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def _run_dirs(sweep_dir: str) -> list[str]:
    if not os.path.isdir(sweep_dir):
        raise ScalingError(f"{sweep_dir} is not a directory: give a sweep's run directory or a results CSV")
    names = sorted(os.listdir(sweep_dir))
    dirs = [os.path.join(sweep_dir, d) for d in names if os.path.exists(os.path.join(sweep_dir, d, "config.json"))]
    if not dirs:
        raise ScalingError(f"{sweep_dir} holds no run directories (subdirectories with config.json)")
    return dirs


def collect_results(sweep_dir: str, *, allow_unfinished: bool = False) -> list[dict]:
    """One row per run directory under `sweep_dir`: name, N, N_nonembed, D (tokens trained), C (FLOPs by
    jaxlm.flops.flops_per_token x D, so the members of one IsoFLOP budget share it), final train and validation
    loss. An unfinished run raises, naming it, unless `allow_unfinished` (then it is left out)."""
    results = []
    for run_dir in _run_dirs(sweep_dir):
        experiment, train, evals = read_run(run_dir)
        steps = experiment.train.steps
        finished = bool(train) and train[-1]["step"] >= steps and bool(evals) and evals[-1]["step"] >= steps
        if not finished:
            if allow_unfinished:
                continue
            last = train[-1]["step"] if train else 0
            raise ScalingError(
                f"run {run_dir} is unfinished (step {last} of {steps}, or no final evaluation): finish it, or pass "
                "allow_unfinished=True (--allow-unfinished) to leave it out"
            )
        D = float(train[-1]["tokens"])
        results.append(
            {
                "name": experiment.name,
                "N": count_params(experiment.model),
                "N_nonembed": count_nonembedding_params(experiment.model),
                "D": D,
                "C": flops_per_token(experiment.model, experiment.data.seq_len) * D,
                "train_loss": float(train[-1]["loss"]),
                "val_loss": float(evals[-1]["val_loss"]),
            }
        )
    if not results:
        raise ScalingError(f"{sweep_dir} has no finished runs yet")
    _validate(results, COLUMNS, sweep_dir)
    return results


def collect_curves(sweep_dir: str, *, allow_unfinished: bool = True, loss: str = "loss") -> list[Curve]:
    """The training curves (tokens, train loss; or `loss="val_loss"` for the evaluations) of the runs under
    `sweep_dir`, for `fit_envelope`. Runs with fewer than two points are left out."""
    curves = []
    for run_dir in _run_dirs(sweep_dir):
        experiment, train, evals = read_run(run_dir)
        finished = bool(train) and train[-1]["step"] >= experiment.train.steps
        if not (finished or allow_unfinished):
            continue
        tokens_per_step = experiment.data.batch_size * experiment.data.seq_len
        if loss == "val_loss":
            points = [(r["step"] * tokens_per_step, r["val_loss"]) for r in evals if r["step"] > 0]
        else:
            points = [(r["tokens"], r["loss"]) for r in train if r["tokens"] > 0]
        if len(points) >= 2:
            t, l = np.array(points, dtype=np.float64).T
            curves.append(Curve(N=float(count_params(experiment.model)), tokens=t, loss=l, name=experiment.name))
    return curves


def _validate(rows: list[dict], columns: Sequence[str], source: str, first_line: int = 2) -> None:
    for i, row in enumerate(rows):
        for column in columns:
            if column == "name":
                continue
            value = row.get(column)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            if not ok:
                label = f"line {first_line + i}" + (f" ({row['name']})" if row.get("name") else "")
                raise ScalingError(f"{source} {label}: {column} = {value!r} is not a positive number")


def write_csv(rows: Sequence[dict], path: str) -> None:
    """Write a results table with the columns `COLUMNS`, after checking every value."""
    rows = list(rows)
    _validate(rows, COLUMNS, path)
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ScalingError(f"results rows lack column(s) {', '.join(missing)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(float(row[k])) if k != "name" else row[k]) for k in COLUMNS})


def read_csv(path: str) -> list[dict]:
    """Read a results table: jaxlm's layout (`COLUMNS`), or Epoch AI's Chinchilla data (`Model Size`, `Training
    FLOP`, `loss`; there D = C / 6N and the single loss column is `loss`). Missing columns or values that are not
    positive numbers raise, naming the column and line."""
    if not os.path.isfile(path):
        raise ScalingError(f"{path} is not a file: give a results CSV or a sweep's run directory")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        raw = list(reader)
    epoch = all(c in header for c in EPOCH_COLUMNS) and "N" not in header
    needed = EPOCH_COLUMNS if epoch else COLUMNS
    missing = [c for c in needed if c not in header]
    if missing:
        raise ScalingError(
            f"{path} lacks column(s) {', '.join(missing)}: expected {', '.join(COLUMNS)} "
            f"(or Epoch AI's {', '.join(EPOCH_COLUMNS)})"
        )
    if not raw:
        raise ScalingError(f"{path} has a header but no rows")
    rows = []
    for i, r in enumerate(raw):
        row: dict = {}
        for column in needed:
            text = (r.get(column) or "").strip()
            try:
                row[column] = text if column == "name" else float(text)
            except ValueError:
                raise ScalingError(f"{path} line {i + 2}: {column} = {text!r} is not a number") from None
        if epoch:
            row = {"name": f"row{i + 2}", "N": row["Model Size"], "C": row["Training FLOP"], "loss": row["loss"]}
        rows.append(row)
    _validate(rows, ("N", "C", "loss") if epoch else COLUMNS, path)
    if epoch:
        for row in rows:
            row["D"] = row["C"] / (6.0 * row["N"])
    return rows
