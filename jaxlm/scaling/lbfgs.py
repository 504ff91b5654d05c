"""L-BFGS for many small independent problems at once, vectorised over the problems with numpy: what the
parametric fits use to run every start of their grid (and every bootstrap resample) together."""

from __future__ import annotations

import numpy as np


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


def batched_lbfgs(fun, x0, *, memory=10, max_iter=500, gtol=1e-5, ftol=1e7 * np.finfo(float).eps, max_ls=40):
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
