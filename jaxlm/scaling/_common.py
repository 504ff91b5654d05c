"""The scaling package's error and the checks and summaries its fits share: positive finite inputs, bootstrap
settings, percentile intervals and least-squares power laws."""

from __future__ import annotations

import numpy as np

from jaxlm.errors import JaxlmError


class ScalingError(JaxlmError, ValueError):
    """Scaling data that cannot be fitted, or a fit that failed."""


def positive_array(name: str, values, n: int | None = None) -> np.ndarray:
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


def summarise(samples: dict[str, np.ndarray], level: float) -> tuple[dict, dict]:
    """Percentile intervals at `level` and standard deviations of bootstrap samples."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()}
    stderrs = {k: float(np.std(v, ddof=1)) for k, v in samples.items()}
    return intervals, stderrs


def check_bootstrap(bootstrap: int, level: float) -> None:
    if bootstrap < 0 or (0 < bootstrap < 2):
        raise ScalingError(f"bootstrap={bootstrap}: use 0 (no intervals) or at least 2 resamples")
    if not 0 < level < 1:
        raise ScalingError(f"level={level} must be in (0, 1), e.g. 0.95")


def too_many_failures(what: str, failed: int, total: int) -> None:
    if failed * 2 > total:
        raise ScalingError(
            f"{what}: {failed} of {total} bootstrap resamples could not be fitted; add points (more sizes per "
            "budget or more runs) before asking for intervals"
        )


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of log y = log k + p log x; returns (p, k)."""
    p, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(p), float(np.exp(logk))


class ComputeOptimal:
    """N_opt = k_n C^a and D_opt = k_d C^b: what approaches 1 and 2 fit (their fits hold `a`, `b`, `k_n`, `k_d`)."""

    a: float
    b: float
    k_n: float
    k_d: float

    def n_opt_at(self, C):
        return self.k_n * np.asarray(C, dtype=np.float64) ** self.a

    def d_opt_at(self, C):
        return self.k_d * np.asarray(C, dtype=np.float64) ** self.b

    def values(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "k_n": self.k_n, "k_d": self.k_d}


class JointLaw:
    """The compute-optimal exponents of a law L(N, D) whose frontier under C = 6ND has N_opt ~ C^a, D_opt ~ C^b with
    a = e_D / (e_N + e_D): e_N and e_D are the law's own exponents of N and D (`exponents`)."""

    exponents: tuple[float, float]

    @property
    def a(self) -> float:
        e_n, e_d = self.exponents
        return e_d / (e_n + e_d)

    @property
    def b(self) -> float:
        e_n, e_d = self.exponents
        return e_n / (e_n + e_d)
