"""Scaling laws: Chinchilla's three approaches to the compute-optimal frontier, with bootstrap intervals.

Approach 1 (`fit_envelope`): the envelope of minimum loss over training curves against compute C = 6ND.
Approach 2 (`fit_isoflop`): a parabola in log N per compute budget; the optima follow N_opt = k C^a.
Approach 3 (`fit_parametric`): L(N, D) = E + A / N^alpha + B / D^beta, fitted as Besiroglu et al. 2024 (Epoch AI)
refitted Hoffmann et al. 2022: a Huber loss on log L, summed over points, minimised by L-BFGS from a grid of starts.

Every fit validates its input and raises `ScalingError` (a `JaxlmError`) naming the budget, column or row at fault;
a fit that does not converge raises rather than returning numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from jaxlm.errors import JaxlmError


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
    a, b, e, alpha, beta = (params[:, i : i + 1] for i in range(5))
    # The LSE without the usual max shift: the terms are the model's own A/N^alpha, B/D^beta and E, which stay
    # far from overflow at any sensible point; an overflowing trial step comes out non-finite and is rejected.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e1 = np.exp(a - alpha * log_n)
        e2 = np.exp(b - beta * log_d)
        e3 = np.exp(e)
        total = e1 + e2
        total += e3
        r = log_loss - np.log(total)
        # Huber as c (|r| - c / 2) with c = min(|r|, delta); its derivative in r is clip(r, -delta, delta).
        abs_r = np.abs(r)
        c = np.minimum(abs_r, delta)
        abs_r -= 0.5 * c
        abs_r *= c
        psi = np.clip(r, -delta, delta, out=r)
        if weights is not None:
            abs_r *= weights
            psi *= weights
        value = abs_r.sum(axis=1)
        # d huber / d param = -psi * d LSE / d param; the LSE's derivatives are the softmax weights of its terms.
        q = np.divide(psi, total, out=psi)
        q1 = e1 * q
        q2 = np.multiply(e2, q, out=e2)
        grad = np.stack([-q1.sum(1), -q2.sum(1), -e3[:, 0] * q.sum(1), q1 @ log_n, q2 @ log_d], axis=1)
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
    best = None
    for i in _distinct_best(x, f, converged, polish_count):
        px, pf, ok = _polish(log_n, log_d, log_loss, weights, delta, x[i])
        if ok and (best is None or pf < best[1]):
            best = (px, pf)
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
            f"the parametric fit did not converge from any of its {len(x)} starts: check that loss falls with N and D"
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

    def n_opt_at(self, C):
        return self.k_n * np.asarray(C, dtype=np.float64) ** self.a

    def d_opt_at(self, C):
        return self.k_d * np.asarray(C, dtype=np.float64) ** self.b

    def values(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "k_n": self.k_n, "k_d": self.k_d}


def _budget_optimum(budget: float, N: np.ndarray, loss: np.ndarray) -> tuple[float, float, np.ndarray]:
    """The parabola in ln N through one budget's runs and its minimum (N_opt, loss at N_opt, coefficients)."""
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
    if not sizes[0] <= n_opt <= sizes[-1]:
        raise ScalingError(
            f"budget C={budget:.3g}: the fitted optimum N={n_opt:.3g} lies outside the sizes tried "
            f"({sizes[0]:.3g} to {sizes[-1]:.3g}); add sizes beyond it"
        )
    loss_opt = float(p0 - p1 * p1 / (4 * p2))
    coeffs = np.array([p2, p1 - 2 * p2 * centre, p0 - p1 * centre + p2 * centre * centre])
    return n_opt, loss_opt, coeffs


def _isoflop_core(N, C, loss, labels, skip_unfittable):
    budgets, n_opt, loss_opt, parabolas, skipped, kept = [], [], [], [], [], []
    for g in range(labels.max() + 1):
        idx = np.flatnonzero(labels == g)
        budget = float(np.exp(np.log(C[idx]).mean()))
        try:
            nopt, lopt, coeffs = _budget_optimum(budget, N[idx], loss[idx])
        except ScalingError as e:
            if not skip_unfittable:
                raise
            skipped.append(str(e))
            continue
        budgets.append(budget)
        n_opt.append(nopt)
        loss_opt.append(lopt)
        parabolas.append(coeffs)
        kept.append(g)
    if len(budgets) < 2:
        raise ScalingError(
            f"fit_isoflop needs at least 2 budgets with a fitted optimum to fit N_opt = k C^a, got {len(budgets)}"
            + (f" ({len(skipped)} skipped: {skipped[0]})" if skipped else "")
        )
    budgets, n_opt = np.array(budgets), np.array(n_opt)
    d_opt = budgets / (6.0 * n_opt)
    a, k_n = _power_law(budgets, n_opt)
    b, k_d = _power_law(budgets, d_opt)
    relabel = np.full(labels.max() + 1, -1)
    relabel[kept] = np.arange(len(kept))
    return dict(
        budgets=budgets, n_opt=n_opt, d_opt=d_opt, loss_opt=np.array(loss_opt), parabolas=np.array(parabolas),
        labels=relabel[labels], a=a, k_n=k_n, b=b, k_d=k_d, skipped=tuple(skipped),
    )


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
    points are resampled within each budget; resamples that cannot be fitted are counted in `bootstrap_failed`.
    """
    loss = _positive_array("loss", loss)
    N, C = _positive_array("N", N, len(loss)), _positive_array("C", C, len(loss))
    _check_bootstrap(bootstrap, level)
    labels = group_budgets(C, budget_rtol)
    core = _isoflop_core(N, C, loss, labels, skip_unfittable)
    samples: dict[str, np.ndarray] = {}
    intervals, stderrs, failed = {}, {}, 0
    if bootstrap:
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(core["labels"] == g) for g in range(len(core["budgets"]))]
        draws = []
        for _ in range(bootstrap):
            idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
            try:
                res = _isoflop_core(N[idx], C[idx], loss[idx], core["labels"][idx], False)
            except ScalingError:
                failed += 1
                continue
            draws.append([res["a"], res["b"], res["k_n"], res["k_d"], *res["n_opt"]])
        _too_many_failures("fit_isoflop", failed, bootstrap)
        table = np.array(draws)
        names = ["a", "b", "k_n", "k_d"] + [f"n_opt[{i}]" for i in range(len(groups))]
        samples = {name: table[:, i] for i, name in enumerate(names)}
        intervals, stderrs = _summarise(samples, level)
    return IsoflopFit(**core, samples=samples, intervals=intervals, stderrs=stderrs, bootstrap_failed=failed)


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
    for n, t, l in curves:
        want = np.log(grid / (6 * n))
        inside = (want >= np.log(t[0])) & (want <= np.log(t[-1]))
        at = np.full(n_points, np.inf)
        at[inside] = np.interp(want[inside], np.log(t), l)
        better = at < best
        best[better], best_n[better] = at[better], n
    covered = np.isfinite(best)  # a gap between runs of every size leaves no loss to compare
    grid, best, best_n = grid[covered], best[covered], best_n[covered]
    if len(np.unique(best_n)) < 2:
        raise ScalingError(
            f"one model size (N={best_n[0]:.3g}) is optimal over the whole compute range; add smaller and larger runs"
        )
    d_opt = grid / (6 * best_n)
    a, k_n = _power_law(grid, best_n)
    b, k_d = _power_law(grid, d_opt)
    return dict(C=grid, n_opt=best_n, d_opt=d_opt, loss=best, a=a, k_n=k_n, b=b, k_d=k_d)


def fit_envelope(
    curves: Sequence[Curve], *, n_points: int = 200, bootstrap: int = 0, seed: int = 0, level: float = 0.95
) -> EnvelopeFit:
    """Approach 1: at each of `n_points` log-spaced compute values C = 6ND, the run with the lowest loss
    (curves interpolated linearly in log tokens) gives N_opt and D_opt; power laws are fitted to them.

    The range is where at least two model sizes have data. With bootstrap > 0, whole runs are resampled.
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
