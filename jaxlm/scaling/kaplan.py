"""Kaplan et al. 2020's laws: L(N) = (N_c/N)^alpha_N, L(D) = (D_c/D)^alpha_D (eqs. 1.1, 1.2) and
L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (eq. 1.5), fitted by least squares on log L.

The single-variable laws are straight lines in log-log space. The joint law is fitted by the batched L-BFGS
(as approach 3 is) from a grid of starts, polished with scipy's L-BFGS-B; bootstrap resamples are refitted from
the best end point as weighted problems, which gives percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from jaxlm.scaling._common import JointLaw, ScalingError, check_bootstrap, positive_array, summarise, too_many_failures
from jaxlm.scaling.lbfgs import batched_lbfgs

_JOINT_NAMES = ("N_c", "D_c", "alpha_N", "alpha_D", "a", "b")


@dataclass(frozen=True, eq=False)
class PowerLawFit:
    """L(x) = (x_c / x)^alpha for x = N (`variable` "N") or D, with bootstrap intervals (if any)."""

    variable: str
    x_c: float
    alpha: float
    n_points: int
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    stderrs: dict[str, float] = field(default_factory=dict)

    def loss(self, x):
        return (self.x_c / np.asarray(x, dtype=np.float64)) ** self.alpha

    def values(self) -> dict[str, float]:
        return {f"{self.variable}_c": self.x_c, f"alpha_{self.variable}": self.alpha}


def _line(log_x, log_loss, weights=None):
    """(x_c, alpha) of the weighted least-squares line log L = alpha log x_c - alpha log x."""
    slope, intercept = np.polyfit(log_x, log_loss, 1, w=None if weights is None else np.sqrt(weights))
    alpha = -slope
    return float(np.exp(intercept / alpha)) if alpha > 0 else np.nan, float(alpha)


def fit_power_law(x, loss, *, variable: str = "N", bootstrap: int = 0, seed: int = 0, level: float = 0.95):
    """Fit L(x) = (x_c / x)^alpha (Kaplan et al. 2020, eq. 1.1 for x = N, 1.2 for x = D) by least squares on log L.

    The points should be ones whose loss is limited by x alone (e.g. `lower_envelope`). With bootstrap > 0, the
    line is refitted on resamples of the points for percentile intervals at `level` on x_c and alpha.
    """
    if variable not in ("N", "D"):
        raise ScalingError(f"variable={variable!r}: choose N or D")
    loss = positive_array("loss", loss)
    x = positive_array(variable, x, len(loss))
    if len(np.unique(x)) < 3:
        raise ScalingError(f"L({variable}) needs at least 3 distinct values of {variable}, got {len(np.unique(x))}")
    check_bootstrap(bootstrap, level)
    log_x, log_loss = np.log(x), np.log(loss)
    x_c, alpha = _line(log_x, log_loss)
    if not alpha > 0:
        raise ScalingError(f"L({variable}): loss does not fall with {variable} (fitted exponent {alpha:.3g})")
    names = (f"{variable}_c", f"alpha_{variable}")
    samples, intervals, stderrs = {}, {}, {}
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws, failed = [], 0
        for _ in range(bootstrap):
            pick = rng.integers(0, len(x), len(x))
            if len(np.unique(x[pick])) < 2:
                failed += 1
                continue
            draw = _line(log_x[pick], log_loss[pick])
            if not draw[1] > 0:
                failed += 1
                continue
            draws.append(draw)
        too_many_failures(f"L({variable})", failed, bootstrap)
        table = np.array(draws)
        samples = {name: table[:, i] for i, name in enumerate(names)}
        intervals, stderrs = summarise(samples, level)
    return PowerLawFit(variable, x_c, alpha, len(x), samples, intervals, stderrs)


@dataclass(frozen=True, eq=False)
class KaplanFit(JointLaw):
    """L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D with bootstrap samples and intervals (if any).

    `a` and `b` are the compute-optimal exponents N_opt ~ C^a, D_opt ~ C^b of this law under C = 6ND.
    """

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float
    objective: float
    n_points: int
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    stderrs: dict[str, float] = field(default_factory=dict)
    bootstrap_failed: int = 0

    @property
    def exponents(self) -> tuple[float, float]:
        return self.alpha_N, self.alpha_D

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return ((self.N_c / N) ** (self.alpha_N / self.alpha_D) + self.D_c / D) ** self.alpha_D

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising the loss subject to C = 6ND.

        With r = alpha_N / alpha_D, L^(1/alpha_D) = N_c^r N^-r + 6 D_c N / C, whose derivative in N vanishes at
        N^(r+1) = r N_c^r C / (6 D_c).
        """
        C = np.asarray(C, dtype=np.float64)
        r = self.alpha_N / self.alpha_D
        log_n = (np.log(r) + r * np.log(self.N_c) + np.log(C / 6.0) - np.log(self.D_c)) / (r + 1.0)
        n_opt = np.exp(log_n)
        return n_opt, C / (6.0 * n_opt)

    def values(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in _JOINT_NAMES}


def _joint_objective(params, log_n, log_d, log_loss, weights):
    """Half the (weighted) sum of squared residuals of log L and its gradient, per row.

    params: (R, 4) rows of (n, d, r, alpha_D) with n = log N_c, d = log D_c, r = alpha_N / alpha_D; the model is
    log L = alpha_D LSE(r (n - log N), d - log D). weights: None, (n,) or (R, n). Returns (R,) and (R, 4).
    """
    n, d, r, alpha_d = (params[:, i : i + 1] for i in range(4))
    with np.errstate(over="ignore", invalid="ignore"):
        gap_n = n - log_n
        u1, u2 = r * gap_n, d - log_d
        top = np.maximum(u1, u2)
        e1, e2 = np.exp(u1 - top), np.exp(u2 - top)
        lse = top + np.log(e1 + e2)
        p1 = e1 / (e1 + e2)
        residual = log_loss - alpha_d * lse
        w_res = residual if weights is None else residual * weights
        value = 0.5 * np.einsum("ij,ij->i", w_res, residual)
        grad = -np.stack(
            [
                np.einsum("ij,ij->i", w_res, alpha_d * r * p1),
                np.einsum("ij,ij->i", w_res, alpha_d * (1.0 - p1)),
                np.einsum("ij,ij->i", w_res, alpha_d * p1 * gap_n),
                np.einsum("ij,ij->i", w_res, lse),
            ],
            axis=1,
        )
    return value, grad


def _joint_starts() -> np.ndarray:
    """Starts (n, d, r, alpha_D): critical scales e^10 to e^40, ratios 0.5 to 2, exponents 0.05 to 0.6."""
    grid = np.meshgrid(
        np.arange(10.0, 41.0, 10.0), np.arange(10.0, 41.0, 10.0), [0.5, 1.0, 2.0], [0.05, 0.15, 0.3, 0.6],
        indexing="ij",
    )
    return np.stack([g.ravel() for g in grid], axis=1)


def _polish_joint(log_n, log_d, log_loss, weights, start):
    def fun(p):
        value, grad = _joint_objective(p[None], log_n, log_d, log_loss, weights)
        return float(value[0]), grad[0]

    res = minimize(fun, start, jac=True, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 20_000})
    ok = (bool(res.success) or float(np.abs(res.jac).max()) <= 1e-6) and bool(np.all(np.isfinite(res.x)))
    return res.x, float(res.fun), ok


def _usable(x) -> bool:
    return bool(x[2] > 0 and x[3] > 0)


def fit_kaplan(N, D, loss, *, bootstrap: int = 0, seed: int = 0, level: float = 0.95) -> KaplanFit:
    """Fit L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (Kaplan et al. 2020, eq. 1.5) by least squares
    on log L, from a grid of 192 starts (batched L-BFGS, then scipy's L-BFGS-B from the best).

    With bootstrap > 0, resamples of the points (with replacement) are refitted from the full fit's optimum for
    percentile intervals at `level` on N_c, D_c, alpha_N, alpha_D and the compute-optimal exponents a, b.
    """
    loss = positive_array("loss", loss)
    count = len(loss)
    N, D = positive_array("N", N, count), positive_array("D", D, count)
    if count <= 4:
        raise ScalingError(f"fit_kaplan needs more points than its 4 parameters, got {count}")
    check_bootstrap(bootstrap, level)
    log_n, log_d, log_loss = np.log(N), np.log(D), np.log(loss)
    x, f, _ = batched_lbfgs(lambda p, rows: _joint_objective(p, log_n, log_d, log_loss, None), _joint_starts())
    order = [i for i in np.argsort(f) if np.isfinite(f[i])][:5]
    polished = [_polish_joint(log_n, log_d, log_loss, None, x[i]) for i in order]
    good = [(px, pf) for px, pf, ok in polished if ok and _usable(px)]
    if not good:
        raise ScalingError(
            "the L(N, D) fit found no minimum with positive exponents: check that loss falls with both N and D"
        )
    best, objective = min(good, key=lambda g: g[1])
    samples, intervals, stderrs, failed = {}, {}, {}, 0
    if bootstrap:
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, count, count), minlength=count) for _ in range(bootstrap)])
        counts = counts.astype(np.float64)
        bx, _, _ = batched_lbfgs(
            lambda p, rows: _joint_objective(p, log_n, log_d, log_loss, counts[rows]),
            np.tile(best, (bootstrap, 1)), gtol=1e-9, ftol=1e-15,
        )
        draws = []
        for i in range(bootstrap):
            px, _, ok = _polish_joint(log_n, log_d, log_loss, counts[i], bx[i])
            if not (ok and _usable(px)):
                failed += 1
                continue
            n_, d_, r_, alpha_d = px
            alpha_n = r_ * alpha_d
            draws.append((np.exp(n_), np.exp(d_), alpha_n, alpha_d, 1 / (1 + r_), r_ / (1 + r_)))
        too_many_failures("fit_kaplan", failed, bootstrap)
        table = np.array(draws)
        samples = {name: table[:, i] for i, name in enumerate(_JOINT_NAMES)}
        intervals, stderrs = summarise(samples, level)
    n_, d_, r_, alpha_d = best
    return KaplanFit(
        N_c=float(np.exp(n_)), D_c=float(np.exp(d_)), alpha_N=float(r_ * alpha_d), alpha_D=float(alpha_d),
        objective=objective, n_points=count, samples=samples, intervals=intervals, stderrs=stderrs,
        bootstrap_failed=failed,
    )


def lower_envelope(x, loss) -> np.ndarray:
    """Indices of the runs that no run with at most as much x beats: the points where x alone limits the loss.

    Applied to N (or D) of a sweep, these are the runs that stand for L(N) (or L(D)), the loss each size (or
    token count) reaches when the other is not the limit, as closely as the sweep can say.
    """
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    order = np.lexsort((loss, x))
    kept, best = [], np.inf
    for i in order:
        if loss[i] < best:
            kept.append(int(i))
            best = loss[i]
    return np.array(kept, dtype=int)
