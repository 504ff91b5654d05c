"""Approach 1: the minimum-loss envelope of training curves against compute C = 6ND, and power laws fitted to it."""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True, eq=False)
class Curve:
    """One run's training curve: its size N and the loss after each number of tokens."""

    N: float
    tokens: np.ndarray
    loss: np.ndarray
    name: str = ""


@dataclass(frozen=True, eq=False)
class EnvelopeFit(ComputeOptimal):
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


def _checked_curve(i: int, curve: Curve) -> tuple[float, np.ndarray, np.ndarray]:
    label = f"curve {i}" + (f" ({curve.name})" if curve.name else "")
    if not (np.isfinite(curve.N) and curve.N > 0):
        raise ScalingError(f"{label}: N = {curve.N!r} is not a positive number")
    try:
        tokens = positive_array("tokens", curve.tokens)
        loss = positive_array("loss", curve.loss, len(tokens))
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
    for n, t, losses in curves:
        want = np.log(grid / (6 * n))
        inside = (want >= np.log(t[0])) & (want <= np.log(t[-1]))
        at = np.full(n_points, np.inf)
        at[inside] = np.interp(want[inside], np.log(t), losses)
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
    a, k_n = power_law(grid, best_n)
    b, k_d = power_law(grid, d_opt)
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
    check_bootstrap(bootstrap, level)
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
        too_many_failures("fit_envelope", failed, bootstrap)
        table = np.array(draws)
        samples = {name: table[:, i] for i, name in enumerate(["a", "b", "k_n", "k_d"])}
        intervals, stderrs = summarise(samples, level)
    return EnvelopeFit(**core, samples=samples, intervals=intervals, stderrs=stderrs, bootstrap_failed=failed)
