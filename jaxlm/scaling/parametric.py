"""Approach 3: L(N, D) = E + A / N^alpha + B / D^beta fitted as Epoch AI did, a Huber loss on log L minimised by a
batched L-BFGS from a grid of starts and polished with scipy's L-BFGS-B."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from jaxlm.scaling._common import JointLaw, ScalingError, check_bootstrap, positive_array, summarise, too_many_failures
from jaxlm.scaling.lbfgs import batched_lbfgs


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


@dataclass(frozen=True, eq=False)
class ParametricFit(JointLaw):
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
    def exponents(self) -> tuple[float, float]:
        return self.alpha, self.beta

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

    x, f, converged = batched_lbfgs(fun, starts)
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
    loss = positive_array("loss", loss)
    n = len(loss)
    N, D = positive_array("N", N, n), positive_array("D", D, n)
    if n <= 5:
        raise ScalingError(f"fit_parametric needs more points than its 5 parameters, got {n}")
    if not delta > 0:
        raise ScalingError(f"delta={delta} must be positive")
    check_bootstrap(bootstrap, level)
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
        bx, bf, bconv = batched_lbfgs(
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
        too_many_failures("fit_parametric", failed, bootstrap)
        table = np.array(draws)
        samples = {name: table[:, i] for i, name in enumerate(_NAMES)}
        intervals, stderrs = summarise(samples, level)
    return ParametricFit(
        **{k: float(v) for k, v in fit.items()},
        objective=objective,
        n_points=n,
        samples=samples,
        intervals=intervals,
        stderrs=stderrs,
        bootstrap_failed=failed,
    )
