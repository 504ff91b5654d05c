"""Fit scaling laws to a sweep and plot them: `python -m tools.fit_scaling <sweep dir or CSV> [--out DIR]`.

Input: a sweep's run directory (each member's config.json and metrics.jsonl), a results CSV written by
`jaxlm.scaling.write_csv`, or Epoch AI's Chinchilla data (`Model Size`, `Training FLOP`, `loss`; D = C / 6N).
Prints Chinchilla's approaches 1 (training-curve envelope, when curves are available), 2 (IsoFLOP parabolas) and
3 (parametric L(N, D)) with bootstrap intervals, and writes PNG plots and fits.json to --out. Bad input or a fit
that fails prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from jaxlm import scaling
from jaxlm.errors import JaxlmError

USAGE_ERROR = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.fit_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a sweep's run directory, or a results CSV")
    p.add_argument("--out", default="", help="where plots and fits.json go (default: <source>_fits)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for intervals (0: none)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=("auto", "val", "train"), default="auto",
                   help="which final loss to fit (auto: validation when the table has it)")
    p.add_argument("--drop-highest", type=int, default=0, metavar="K",
                   help="leave out the K runs with the highest loss (Epoch AI drop 5 of Chinchilla's)")
    p.add_argument("--budget-rtol", type=float, default=0.05,
                   help="runs whose compute agrees within this fraction share an IsoFLOP budget")
    p.add_argument("--unfittable", choices=("error", "skip"), default=None,
                   help="an IsoFLOP budget without a bracketed optimum: fail, or leave it out (default: error, "
                        "but skip for Epoch's layout, whose runs are not one clean IsoFLOP grid)")
    p.add_argument("--allow-unfinished", action="store_true", help="leave unfinished runs out instead of failing")
    p.add_argument("--approaches", default="1,2,3", help="which approaches to fit, e.g. 2,3")
    return p.parse_args(argv)


def load(args):
    """(rows, loss column, curves or None, is_epoch_layout)."""
    if os.path.isdir(args.source):
        rows = scaling.collect_results(args.source, allow_unfinished=args.allow_unfinished)
        curves = scaling.collect_curves(args.source, allow_unfinished=False)
        epoch = False
    else:
        rows = scaling.read_csv(args.source)
        curves = None
        epoch = "loss" in rows[0] and "val_loss" not in rows[0]
    if epoch:
        column = "loss"
    else:
        column = "train_loss" if args.loss == "train" else "val_loss"
    if args.drop_highest:
        if not 0 <= args.drop_highest < len(rows) - 5:
            raise scaling.ScalingError(f"--drop-highest {args.drop_highest} leaves too few of the {len(rows)} runs")
        rows = sorted(rows, key=lambda r: r[column])[: len(rows) - args.drop_highest]
        if curves is not None:
            kept = {r["name"] for r in rows}
            curves = [c for c in curves if c.name in kept]
    return rows, column, curves, epoch


def fmt_interval(fit, name, value, digits=4):
    if name in fit.intervals:
        lo, hi = fit.intervals[name]
        return f"{value:.{digits}g}  [{lo:.{digits}g}, {hi:.{digits}g}]  (se {fit.stderrs[name]:.2g})"
    return f"{value:.{digits}g}"


def print_power_laws(title, fit):
    print(title)
    print(f"  N_opt = {fit.k_n:.3g} C^a   a = {fmt_interval(fit, 'a', fit.a)}")
    print(f"  D_opt = {fit.k_d:.3g} C^b   b = {fmt_interval(fit, 'b', fit.b)}")


def fit_all(args, rows, column, curves, epoch):
    wanted = {s.strip() for s in args.approaches.split(",") if s.strip()}
    if not wanted <= {"1", "2", "3"}:
        raise scaling.ScalingError(f"--approaches {args.approaches!r}: choose from 1, 2, 3 (e.g. 2,3)")
    N = np.array([r["N"] for r in rows], dtype=float)
    D = np.array([r["D"] for r in rows], dtype=float)
    C = np.array([r["C"] for r in rows], dtype=float)
    loss = np.array([r[column] for r in rows], dtype=float)
    common = dict(bootstrap=args.bootstrap, seed=args.seed, level=args.level)
    fits: dict = {}
    pct = f"{100 * args.level:g}%"
    intervals = f"; intervals: {pct} bootstrap percentiles ({args.bootstrap} resamples)" if args.bootstrap else ""
    print(f"{len(rows)} runs from {args.source}; fitting {column}{intervals}")
    if "1" in wanted and curves:
        fits["1"] = scaling.fit_envelope(curves, **common)
        print_power_laws(f"Approach 1 (envelope of {len(curves)} training curves, C = 6ND):", fits["1"])
    if "2" in wanted:
        skip = (args.unfittable or ("skip" if epoch else "error")) == "skip"
        fit = scaling.fit_isoflop(N, C, loss, budget_rtol=args.budget_rtol, skip_unfittable=skip, **common)
        fits["2"] = fit
        print_power_laws(f"Approach 2 (IsoFLOP parabolas, {len(fit.budgets)} budgets, D_opt = C / 6 N_opt):", fit)
        for i, (c, n, d, loss_opt) in enumerate(zip(fit.budgets, fit.n_opt, fit.d_opt, fit.loss_opt)):
            print(f"    C={c:9.3g}  N_opt={fmt_interval(fit, f'n_opt[{i}]', n, 3)}  D_opt={d:.3g}  loss={loss_opt:.4f}")
        if fit.skipped:
            print(f"  skipped {len(fit.skipped)} budgets, e.g. {fit.skipped[0]}")
        if fit.bootstrap_dropped or fit.bootstrap_failed:
            print(f"  bootstrap: {fit.bootstrap_dropped} budget fits left out of their resamples (no bracketed "
                  f"optimum); {fit.bootstrap_failed} of {args.bootstrap} resamples unusable")
    if "3" in wanted:
        started = time.perf_counter()
        fit = scaling.fit_parametric(N, D, loss, **common)
        seconds = time.perf_counter() - started
        fits["3"] = fit
        print(f"Approach 3 (L = E + A/N^alpha + B/D^beta, Huber on log L, 4500 L-BFGS starts; {seconds:.1f} s "
              f"with {args.bootstrap} resamples):")
        for name in ("E", "A", "B", "alpha", "beta"):
            print(f"  {name:5s} = {fmt_interval(fit, name, getattr(fit, name))}")
        print(f"  N_opt ~ C^a  a = {fmt_interval(fit, 'a', fit.a)}")
        print(f"  D_opt ~ C^b  b = {fmt_interval(fit, 'b', fit.b)}")
        lo, hi = np.log10(C.min()), np.log10(C.max())
        for c in 10.0 ** np.arange(np.floor(lo), np.ceil(hi) + 1):
            n, d = fit.compute_optimal(c)
            print(f"    C={c:9.3g}  N_opt={n:.3g}  D_opt={d:.3g}  D/N={d / n:.1f}  loss={float(fit.loss(n, d)):.4f}")
        if fit.bootstrap_failed:
            print(f"  {fit.bootstrap_failed} of {args.bootstrap} resamples did not converge and are left out")
    return fits, (N, D, C, loss)


def to_json(fits) -> dict:
    out = {}
    for key, fit in fits.items():
        entry = {"values": fit.values(), "intervals": fit.intervals, "stderrs": fit.stderrs}
        if key == "2":
            entry["budgets"] = fit.budgets.tolist()
            entry["n_opt"] = fit.n_opt.tolist()
            entry["d_opt"] = fit.d_opt.tolist()
            entry["skipped"] = list(fit.skipped)
        out[f"approach{key}"] = entry
    return out


EPOCH_CREDIT = "data: Besiroglu et al. 2024 (Epoch AI), extracted from Hoffmann et al. 2022, Fig. 4"


def finish(fig, path, credit):
    if credit:
        fig.text(0.99, 0.005, credit, ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1) if credit else None)
    fig.savefig(path, dpi=120)


def label_with_interval(fit, name, value):
    if name in fit.intervals:
        lo, hi = fit.intervals[name]
        return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{value:.3f}"


def plot_isoflop(fit, N, loss, path, credit=""):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator

    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(fit.budgets)))
    for i, (c, colour) in enumerate(zip(fit.budgets, colours)):
        at = fit.labels == i
        ax.scatter(N[at], loss[at], color=colour, s=18, label=f"C = {c:.2g}")
        x = np.linspace(np.log(N[at].min()), np.log(N[at].max()), 100)
        ax.plot(np.exp(x), np.polyval(fit.parabolas[i], x), color=colour, lw=1)
        ax.plot(fit.n_opt[i], fit.loss_opt[i], marker="*", color=colour, ms=12, mec="black", mew=0.6)
    ax.set_xscale("log")
    # Minor ticks at 2 and 5 only: labelled ticks at every integer crowd a range under a decade or two.
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles: parabolas in log N and their minima (*)")
    ax.legend(fontsize=7, ncol=2 if len(fit.budgets) > 6 else 1)
    ax.grid(alpha=0.3)
    finish(fig, path, credit)
    plt.close(fig)


def plot_optimal(fits, C, path, credit=""):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    lo, hi = np.log10(C.min()) - 0.5, np.log10(C.max()) + 0.5
    grid = np.logspace(lo, hi, 100)
    styles = {"1": ("tab:green", "approach 1"), "2": ("tab:blue", "approach 2"), "3": ("tab:red", "approach 3")}
    for panel, (ax, which) in enumerate(zip(axes, ("N", "D"))):
        for key, fit in fits.items():
            colour, label = styles[key]
            if key == "3":
                line = fit.compute_optimal(grid)[panel]
            else:
                line = fit.n_opt_at(grid) if which == "N" else fit.d_opt_at(grid)
            name = "a" if which == "N" else "b"
            exponent = label_with_interval(fit, name, getattr(fit, name))
            ax.plot(grid, line, color=colour, label=f"{label}: {which}_opt ~ C^{name}, {name} = {exponent}")
            if key == "1":
                pts = fit.n_opt if which == "N" else fit.d_opt
                ax.scatter(fit.C[::5], pts[::5], color=colour, s=6, alpha=0.5)
            if key == "2":
                pts = fit.n_opt if which == "N" else fit.d_opt
                ax.scatter(fit.budgets, pts, color=colour, s=25, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel("parameters N_opt" if which == "N" else "tokens D_opt")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Compute-optimal model size and tokens (points: per-budget or envelope optima)")
    finish(fig, path, credit)
    plt.close(fig)


def plot_parametric(fit, N, C, loss, path, credit=""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    c_grid = np.logspace(np.log10(C.min()) - 0.5, np.log10(C.max()) + 0.5, 200)
    n_grid = np.logspace(np.log10(N.min()) - 0.5, np.log10(N.max()) + 0.5, 200)
    cc, nn = np.meshgrid(c_grid, n_grid)
    surface = fit.loss(nn, cc / (6 * nn))
    # Contours over the losses the runs reached, where they can be compared with the points.
    spread = loss.max() - loss.min()
    levels = np.unique(np.round(np.linspace(loss.min() - 0.1 * spread, loss.max(), 10), 3))
    contours = ax.contour(cc, nn, surface, levels=levels, cmap="magma", linewidths=0.8)
    ax.clabel(contours, fontsize=7, fmt="%.2f")
    points = ax.scatter(C, N, c=loss, cmap="magma", s=14, vmin=levels[0], vmax=levels[-1], edgecolors="none")
    fig.colorbar(points, ax=ax, label="loss of each run")
    n_opt, _ = fit.compute_optimal(c_grid)
    ax.plot(c_grid, n_opt, color="tab:blue", lw=2, label=f"efficient frontier N_opt ~ C^{fit.a:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(c_grid[0], c_grid[-1])
    ax.set_ylim(n_grid[0], n_grid[-1])
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("parameters N")
    ax.set_title(f"L = {fit.E:.3f} + {fit.A:.4g}/N^{fit.alpha:.3f} + {fit.B:.4g}/D^{fit.beta:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    finish(fig, path, credit)
    plt.close(fig)


def plot_envelope(fit, curves, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    sizes = sorted({c.N for c in curves})
    colours = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))))
    for c in curves:
        ax.plot(6 * c.N * c.tokens, c.loss, color=colours[c.N], lw=0.8, alpha=0.7)
    ax.plot(fit.C, fit.loss, color="black", lw=2, label="minimum-loss envelope")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Approach 1: {len(curves)} training curves (colour: N from {sizes[0]:.2g} to {sizes[-1]:.2g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    finish(fig, path, "")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.bootstrap < 0:
            raise scaling.ScalingError(f"--bootstrap {args.bootstrap}: use 0 (no intervals) or a positive count")
        rows, column, curves, epoch = load(args)
        fits, (N, D, C, loss) = fit_all(args, rows, column, curves, epoch)
        if not fits:
            raise scaling.ScalingError("nothing was fitted: approach 1 needs a sweep directory's training curves")
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    out = args.out or os.path.splitext(os.path.normpath(args.source))[0] + "_fits"
    os.makedirs(out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    written = []
    credit = EPOCH_CREDIT if epoch else ""
    if "2" in fits:
        plot_isoflop(fits["2"], N, loss, os.path.join(out, "isoflop.png"), credit)
        written.append("isoflop.png")
    if fits:
        plot_optimal(fits, C, os.path.join(out, "optimal.png"), credit)
        written.append("optimal.png")
    if "3" in fits:
        plot_parametric(fits["3"], N, C, loss, os.path.join(out, "parametric.png"), credit)
        written.append("parametric.png")
    if "1" in fits:
        plot_envelope(fits["1"], curves, os.path.join(out, "envelope.png"))
        written.append("envelope.png")
    if os.path.isdir(args.source):
        scaling.write_csv(rows, os.path.join(out, "results.csv"))
        written.append("results.csv")
    with open(os.path.join(out, "fits.json"), "w") as f:
        json.dump(to_json(fits), f, indent=2)
    written.append("fits.json")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
