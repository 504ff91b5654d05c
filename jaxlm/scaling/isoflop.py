"""Approach 2: IsoFLOP profiles, a parabola of loss in ln N per compute budget and power laws of the optima."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxlm.scaling._common import (
    ComputeOptimal,
    ScalingError,
    check_bootstrap,
    positive_array,
    power_law,
    summarise,
    too_many_failures,
)


def group_budgets(C, rtol: float = 0.05) -> np.ndarray:
    """Label each point with its compute budget: sorted budgets within a factor (1 + rtol) of a group's first
    member share a label. Members of one sweep budget differ a little because steps are whole numbers."""
    C = positive_array("C", C)
    order = np.argsort(C, kind="stable")
    labels = np.empty(len(C), dtype=int)
    label, first = -1, 0.0
    for i in order:
        if label < 0 or C[i] > first * (1 + rtol):
            label, first = label + 1, C[i]
        labels[i] = label
    return labels


@dataclass(frozen=True, eq=False)
class IsoflopFit(ComputeOptimal):
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
    a, k_n = power_law(budgets, n_opt)
    b, k_d = power_law(budgets, budgets / (6.0 * n_opt))
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
    loss = positive_array("loss", loss)
    N, C = positive_array("N", N, len(loss)), positive_array("C", C, len(loss))
    check_bootstrap(bootstrap, level)
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
        too_many_failures("fit_isoflop", failed, bootstrap)
        table = np.array(draws)
        names = ["a", "k_n", "b", "k_d"] + [f"n_opt[{i}]" for i in range(len(kept))]
        samples = {name: table[:, i][np.isfinite(table[:, i])] for i, name in enumerate(names)}
        intervals, stderrs = summarise({k: v for k, v in samples.items() if len(v) >= 2}, level)
    return IsoflopFit(
        budgets=budgets, n_opt=n_opt, d_opt=budgets / (6.0 * n_opt), loss_opt=loss_opt, parabolas=parabolas,
        labels=labels, a=a, k_n=k_n, b=b, k_d=k_d, skipped=tuple(str(e) for e in errors), samples=samples,
        intervals=intervals, stderrs=stderrs, bootstrap_failed=failed, bootstrap_dropped=dropped,
    )
