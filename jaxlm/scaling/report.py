"""Fit a sweep's results and plot them (`fit_and_plot`): what `python -m tools.fit_scaling` does once its command
line is parsed, and what `jaxlm.cli.run_isoflop_sweep` does once every member of a sweep is finished.

The source is a sweep's run directory (each member's config.json and metrics.jsonl), a results CSV written by
`write_csv`, or Epoch AI's Chinchilla data (`Model Size`, `Training FLOP`, `loss`; D = C / 6N). Chinchilla's
approaches 1 (training-curve envelope, when curves are available), 2 (IsoFLOP parabolas) and 3 (parametric
L(N, D)) are printed with bootstrap intervals, and PNG plots and fits.json are written to the output directory.
matplotlib is imported only to plot, after the fits.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Iterable

import numpy as np

from jaxlm import storage
from jaxlm.scaling._common import ScalingError
from jaxlm.scaling.envelope import fit_envelope
from jaxlm.scaling.isoflop import fit_isoflop
from jaxlm.scaling.kaplan import fit_kaplan, fit_power_law, lower_envelope
from jaxlm.scaling.parametric import fit_parametric
from jaxlm.scaling.results import collect_curves, collect_results, read_csv, write_csv

EPOCH_CREDIT = "data: Besiroglu et al. 2024 (Epoch AI), extracted from Hoffmann et al. 2022, Fig. 4"


def default_out_dir(source: str) -> str:
    """Where `fit_and_plot` writes when no directory is given: <source without extension>_fits."""
    if storage.is_uri(source):
        return posixpath.splitext(source.rstrip("/"))[0] + "_fits"
    return os.path.splitext(os.path.normpath(source))[0] + "_fits"


def fit_and_plot(
    source: str,
    out: str = "",
    *,
    bootstrap: int = 100,
    level: float = 0.95,
    seed: int = 0,
    loss: str = "auto",
    drop_highest: int = 0,
    budget_rtol: float = 0.05,
    unfittable: str | None = None,
    allow_unfinished: bool = False,
    approaches: str | Iterable[int | str] = "1,2,3",
    law: str = "chinchilla",
) -> dict:
    """Fit Chinchilla's approaches (and Kaplan's laws) to `source`, print them, write plots and fits.json to `out`.

    `out` defaults to `default_out_dir(source)`. The options are tools.fit_scaling's flags (`drop_highest` is
    `--drop-highest`, ...), and errors name them as flags: `bootstrap` resamples per interval (0: none) at
    coverage `level`; `loss` is "auto" (validation when the table has it), "val" or "train"; `drop_highest` leaves
    out that many runs with the highest loss (Epoch AI drop 5 of Chinchilla's); runs whose compute agrees within
    `budget_rtol` share an IsoFLOP budget; `unfittable` says what to do with an IsoFLOP budget without a bracketed
    optimum, "error" or "skip" (None: error, but skip for Epoch's layout, whose runs are not one clean IsoFLOP
    grid); `allow_unfinished` leaves unfinished runs of a sweep directory out instead of failing; `approaches`
    picks approaches, as "2,3" or (2, 3); `law` is "chinchilla", "kaplan" or "chinchilla,kaplan". Kaplan's laws are
    L(N, D) over all runs and L(N), L(D) over each variable's `lower_envelope`; with both laws, frontiers.png puts
    their compute-optimal frontiers side by side. A sweep directory's results table is also written, as results.csv.

    Returns the fits by approach ("1", "2", "3": EnvelopeFit, IsoflopFit, ParametricFit) and by Kaplan law ("L(N)",
    "L(D)": PowerLawFit; "L(N,D)": KaplanFit). Bad input or a fit that
    fails raises ScalingError, before anything is written.
    """
    if bootstrap < 0:
        raise ScalingError(f"--bootstrap {bootstrap}: use 0 (no intervals) or a positive count")
    if loss not in ("auto", "val", "train"):
        raise ScalingError(f"--loss {loss!r}: choose auto, val or train")
    if unfittable not in (None, "error", "skip"):
        raise ScalingError(f"--unfittable {unfittable!r}: choose error or skip")
    laws = _laws(law)
    rows, column, curves, epoch = _load(source, loss, drop_highest, allow_unfinished)
    fits, kaplan, (N, D, C, losses) = {}, {}, _columns(rows, column)
    common = dict(bootstrap=bootstrap, level=level, seed=seed)
    if "chinchilla" in laws:
        fits = _fit_all(
            source, rows, column, curves, epoch, budget_rtol=budget_rtol, unfittable=unfittable,
            approaches=approaches, **common,
        )
    if "kaplan" in laws:
        kaplan = _fit_kaplan_laws(N, D, losses, **common)
    if not fits and not kaplan:
        raise ScalingError("nothing was fitted: approach 1 needs a sweep directory's training curves")
    out = out or default_out_dir(source)
    storage.makedirs(out)
    import matplotlib

    matplotlib.use("Agg")
    written = []
    credit = EPOCH_CREDIT if epoch else ""
    if "2" in fits:
        _plot_isoflop(fits["2"], N, losses, storage.join(out, "isoflop.png"), credit)
        written.append("isoflop.png")
    if fits:
        _plot_optimal(fits, C, storage.join(out, "optimal.png"), credit)
        written.append("optimal.png")
    if kaplan:
        _plot_kaplan(kaplan, N, D, losses, storage.join(out, "kaplan.png"), credit)
        _plot_frontiers(kaplan["L(N,D)"], fits.get("3"), fits.get("2"), C, storage.join(out, "frontiers.png"), credit)
        written += ["kaplan.png", "frontiers.png"]
    if "3" in fits:
        _plot_parametric(fits["3"], N, C, losses, storage.join(out, "parametric.png"), credit)
        written.append("parametric.png")
    if "1" in fits:
        _plot_envelope(fits["1"], curves, storage.join(out, "envelope.png"))
        written.append("envelope.png")
    if storage.isdir(source):
        write_csv(rows, storage.join(out, "results.csv"))
        written.append("results.csv")
    storage.write_text_atomic(storage.join(out, "fits.json"), json.dumps(_to_json(fits, kaplan), indent=2))
    written.append("fits.json")
    print(f"wrote {', '.join(written)} to {out}")
    return {**fits, **kaplan}


def _laws(law: str) -> set[str]:
    laws = {s.strip() for s in law.split(",") if s.strip()}
    if not laws or not laws <= {"chinchilla", "kaplan"}:
        raise ScalingError(f"--law {law!r}: choose chinchilla, kaplan or chinchilla,kaplan")
    return laws


def _columns(rows, column):
    """N, D, C and the loss column of the rows as float arrays."""
    return tuple(np.array([r[key] for r in rows], dtype=float) for key in ("N", "D", "C", column))


def _load(source, loss, drop_highest, allow_unfinished):
    """(rows, loss column, curves or None, is_epoch_layout)."""
    if storage.isdir(source):
        rows = collect_results(source, allow_unfinished=allow_unfinished)
        curves = collect_curves(source, allow_unfinished=False)
        epoch = False
    else:
        rows = read_csv(source)
        curves = None
        epoch = "loss" in rows[0] and "val_loss" not in rows[0]
    if epoch:
        column = "loss"
    else:
        column = "train_loss" if loss == "train" else "val_loss"
    if drop_highest:
        if not 0 <= drop_highest < len(rows) - 5:
            raise ScalingError(f"--drop-highest {drop_highest} leaves too few of the {len(rows)} runs")
        rows = sorted(rows, key=lambda r: r[column])[: len(rows) - drop_highest]
        if curves is not None:
            kept = {r["name"] for r in rows}
            curves = [c for c in curves if c.name in kept]
    return rows, column, curves, epoch


def _fmt_interval(fit, name, value, digits=4):
    if name in fit.intervals:
        lo, hi = fit.intervals[name]
        return f"{value:.{digits}g}  [{lo:.{digits}g}, {hi:.{digits}g}]  (se {fit.stderrs[name]:.2g})"
    return f"{value:.{digits}g}"


def _print_power_laws(title, fit):
    print(title)
    print(f"  N_opt = {fit.k_n:.3g} C^a   a = {_fmt_interval(fit, 'a', fit.a)}")
    print(f"  D_opt = {fit.k_d:.3g} C^b   b = {_fmt_interval(fit, 'b', fit.b)}")


def _wanted(approaches) -> set[str]:
    if isinstance(approaches, str):
        wanted = {s.strip() for s in approaches.split(",") if s.strip()}
    else:
        wanted = {str(a).strip() for a in approaches}
    if not wanted <= {"1", "2", "3"}:
        raise ScalingError(f"--approaches {approaches!r}: choose from 1, 2, 3 (e.g. 2,3)")
    return wanted


def _fit_all(source, rows, column, curves, epoch, *, bootstrap, level, seed, budget_rtol, unfittable, approaches):
    wanted = _wanted(approaches)
    N, D, C, loss = _columns(rows, column)
    common = dict(bootstrap=bootstrap, seed=seed, level=level)
    fits: dict = {}
    pct = f"{100 * level:g}%"
    intervals = f"; intervals: {pct} bootstrap percentiles ({bootstrap} resamples)" if bootstrap else ""
    print(f"{len(rows)} runs from {source}; fitting {column}{intervals}")
    if "1" in wanted and curves:
        fits["1"] = fit_envelope(curves, **common)
        _print_power_laws(f"Approach 1 (envelope of {len(curves)} training curves, C = 6ND):", fits["1"])
    if "2" in wanted:
        skip = (unfittable or ("skip" if epoch else "error")) == "skip"
        fit = fit_isoflop(N, C, loss, budget_rtol=budget_rtol, skip_unfittable=skip, **common)
        fits["2"] = fit
        _print_power_laws(f"Approach 2 (IsoFLOP parabolas, {len(fit.budgets)} budgets, D_opt = C / 6 N_opt):", fit)
        for i, (c, n, d, loss_opt) in enumerate(zip(fit.budgets, fit.n_opt, fit.d_opt, fit.loss_opt)):
            n_opt = _fmt_interval(fit, f"n_opt[{i}]", n, 3)
            print(f"    C={c:9.3g}  N_opt={n_opt}  D_opt={d:.3g}  loss={loss_opt:.4f}")
        if fit.skipped:
            print(f"  skipped {len(fit.skipped)} budgets, e.g. {fit.skipped[0]}")
        if fit.bootstrap_dropped or fit.bootstrap_failed:
            print(f"  bootstrap: {fit.bootstrap_dropped} budget fits left out of their resamples (no bracketed "
                  f"optimum); {fit.bootstrap_failed} of {bootstrap} resamples unusable")
    if "3" in wanted:
        started = time.perf_counter()
        fit = fit_parametric(N, D, loss, **common)
        seconds = time.perf_counter() - started
        fits["3"] = fit
        print(f"Approach 3 (L = E + A/N^alpha + B/D^beta, Huber on log L, 4500 L-BFGS starts; {seconds:.1f} s "
              f"with {bootstrap} resamples):")
        for name in ("E", "A", "B", "alpha", "beta"):
            print(f"  {name:5s} = {_fmt_interval(fit, name, getattr(fit, name))}")
        print(f"  N_opt ~ C^a  a = {_fmt_interval(fit, 'a', fit.a)}")
        print(f"  D_opt ~ C^b  b = {_fmt_interval(fit, 'b', fit.b)}")
        lo, hi = np.log10(C.min()), np.log10(C.max())
        for c in 10.0 ** np.arange(np.floor(lo), np.ceil(hi) + 1):
            n, d = fit.compute_optimal(c)
            print(f"    C={c:9.3g}  N_opt={n:.3g}  D_opt={d:.3g}  D/N={d / n:.1f}  loss={float(fit.loss(n, d)):.4f}")
        if fit.bootstrap_failed:
            print(f"  {fit.bootstrap_failed} of {bootstrap} resamples did not converge and are left out")
    return fits


def _fit_kaplan_laws(N, D, loss, *, bootstrap, level, seed) -> dict:
    """Kaplan et al. 2020's L(N) and L(D) on each variable's lower envelope, and L(N, D) on every run; printed."""
    common = dict(bootstrap=bootstrap, level=level, seed=seed)
    fits = {}
    print("Kaplan et al. 2020 (least squares on log L):")
    for variable, x in (("N", N), ("D", D)):
        on = lower_envelope(x, loss)
        fit = fit_power_law(x[on], loss[on], variable=variable, **common)
        fits[f"L({variable})"] = fit
        c, alpha = f"{variable}_c", f"alpha_{variable}"
        print(f"  L({variable}) = ({c}/{variable})^{alpha}, on the {len(on)} runs no run with less {variable} beats:")
        print(f"    {c:7s} = {_fmt_interval(fit, c, fit.x_c)}")
        print(f"    {alpha:7s} = {_fmt_interval(fit, alpha, fit.alpha)}")
    fit = fit_kaplan(N, D, loss, **common)
    fits["L(N,D)"] = fit
    print(f"  L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D, on all {len(loss)} runs:")
    for name in ("N_c", "D_c", "alpha_N", "alpha_D"):
        print(f"    {name:7s} = {_fmt_interval(fit, name, getattr(fit, name))}")
    print(f"    N_opt ~ C^a  a = {_fmt_interval(fit, 'a', fit.a)}")
    if fit.bootstrap_failed:
        print(f"    {fit.bootstrap_failed} of {bootstrap} resamples did not converge and are left out")
    return fits


def _to_json(fits, kaplan) -> dict:
    out = {}
    for key, fit in fits.items():
        entry = {"values": fit.values(), "intervals": fit.intervals, "stderrs": fit.stderrs}
        if key == "2":
            entry["budgets"] = fit.budgets.tolist()
            entry["n_opt"] = fit.n_opt.tolist()
            entry["d_opt"] = fit.d_opt.tolist()
            entry["skipped"] = list(fit.skipped)
        out[f"approach{key}"] = entry
    for key, fit in kaplan.items():
        name = "kaplan_" + key[2:-1].replace(",", "")
        out[name] = {"values": fit.values(), "intervals": fit.intervals, "stderrs": fit.stderrs}
    return out


def _finish(fig, path, credit):
    if credit:
        fig.text(0.99, 0.005, credit, ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1) if credit else None)
    with storage.local_copy(path, "w") as local:  # matplotlib writes local files only
        fig.savefig(local, dpi=120, format="png")


def _label_with_interval(fit, name, value):
    if name in fit.intervals:
        lo, hi = fit.intervals[name]
        return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{value:.3f}"


def _plot_isoflop(fit, N, loss, path, credit=""):
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
    _finish(fig, path, credit)
    plt.close(fig)


def _plot_optimal(fits, C, path, credit=""):
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
            exponent = _label_with_interval(fit, name, getattr(fit, name))
            ax.plot(grid, line, color=colour, label=f"{label}: {which}_opt ~ C^{name}, {name} = {exponent}")
            if key == "1":
                pts = fit.n_opt if which == "N" else fit.d_opt
                ax.scatter(fit.C[::5], pts[::5], color=colour, s=6, alpha=0.5)
            if key == "2":
                pts = fit.n_opt if which == "N" else fit.d_opt
                ax.scatter(fit.budgets, pts, color=colour, s=25, zorder=3)
        _frontier_axes(ax, which)
    fig.suptitle("Compute-optimal model size and tokens (points: per-budget or envelope optima)")
    _finish(fig, path, credit)
    plt.close(fig)


def _frontier_axes(ax, which):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("parameters N_opt" if which == "N" else "tokens D_opt")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_parametric(fit, N, C, loss, path, credit=""):
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
    _finish(fig, path, credit)
    plt.close(fig)


def _plot_envelope(fit, curves, path):
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
    _finish(fig, path, "")
    plt.close(fig)


def _plot_kaplan(fits, N, D, loss, path, credit=""):
    """Kaplan's L(N) and L(D) against their envelope points, and L(N, D) against every run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (variable, x) in zip(axes[:2], (("N", N), ("D", D))):
        fit = fits[f"L({variable})"]
        on = lower_envelope(x, loss)
        ax.scatter(x, loss, color="0.7", s=12, label="runs")
        ax.scatter(x[on], loss[on], color="tab:red", s=18, label="lower envelope (fitted)")
        grid = np.geomspace(x.min(), x.max(), 100)
        ax.plot(grid, fit.loss(grid), color="tab:red",
                label=f"({fit.x_c:.3g}/{variable})^{_label_with_interval(fit, f'alpha_{variable}', fit.alpha)}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters N" if variable == "N" else "tokens D")
        ax.set_ylabel("loss")
        ax.set_title(f"L({variable}) = ({variable}_c/{variable})^alpha_{variable}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fit = fits["L(N,D)"]
    ax = axes[2]
    predicted = fit.loss(N, D)
    ax.scatter(predicted, loss, c=np.log10(N), cmap="viridis", s=16)
    lo, hi = min(predicted.min(), loss.min()), max(predicted.max(), loss.max())
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.set_xlabel("L(N, D) fitted")
    ax.set_ylabel("loss of each run (colour: log10 N)")
    ax.set_title(f"L(N, D): alpha_N {fit.alpha_N:.3f}, alpha_D {fit.alpha_D:.3f}, N_c {fit.N_c:.2g}, "
                 f"D_c {fit.D_c:.2g}", fontsize=8)
    ax.grid(alpha=0.3)
    _finish(fig, path, credit)
    plt.close(fig)


def _plot_frontiers(kaplan, chinchilla, isoflop, C, path, credit=""):
    """N_opt(C) and D_opt(C) of Kaplan's L(N, D) beside Chinchilla's parametric law (when fitted), with the
    IsoFLOP optima (when fitted) as points."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    grid = np.logspace(np.log10(C.min()) - 0.5, np.log10(C.max()) + 0.5, 100)
    laws = [("tab:purple", "Kaplan L(N, D)", kaplan)]
    if chinchilla is not None:
        laws.append(("tab:red", "Chinchilla L(N, D)", chinchilla))
    for panel, (ax, which) in enumerate(zip(axes, ("N", "D"))):
        name = "a" if which == "N" else "b"
        for colour, label, fit in laws:
            exponent = _label_with_interval(fit, name, getattr(fit, name))
            ax.plot(grid, fit.compute_optimal(grid)[panel], color=colour,
                    label=f"{label}: {which}_opt ~ C^{name}, {name} = {exponent}")
        if isoflop is not None:
            ax.scatter(isoflop.budgets, isoflop.n_opt if which == "N" else isoflop.d_opt, color="tab:blue", s=25,
                       zorder=3, label="IsoFLOP optima (approach 2)")
        _frontier_axes(ax, which)
    fig.suptitle("Compute-optimal frontiers of Kaplan's and Chinchilla's laws fitted to the same runs")
    _finish(fig, path, credit)
    plt.close(fig)
