"""Compare training runs: their loss curves on one plot, and a table of their figures.

    python -m tools.plot_runs runs/quickstart runs/quickstart_gpt2 [--x tokens|flops|step] [--out compare.png]

Each argument is a run directory (its config.json and metrics.jsonl; finished or not). The plot draws each run's
train loss as a thin line and its validation loss with markers, in one colour per run, against tokens seen, the
training FLOPs spent (`jaxlm.flops.flops_per_token` per token, as the scaling tools count them) or steps. The table
gives each run's parameters, steps, tokens, last train loss, last and best validation loss and median tokens/s.
Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from jaxlm import storage
from jaxlm.errors import JaxlmError

USAGE_ERROR = 2
AXES = {"tokens": "tokens seen", "flops": "training FLOPs", "step": "step"}


def load_run(run_dir: str, x: str = "tokens") -> dict[str, Any]:
    """One run's curves (x values for the train and the validation points) and summary figures."""
    from jaxlm import flops, scaling

    experiment, train, evals = scaling.read_run(run_dir)
    if not train and not evals:
        raise JaxlmError(f"{run_dir}/metrics.jsonl has no logged steps yet: let the run log at least once")
    tokens_per_step = experiment.data.batch_size * experiment.data.seq_len
    per_token = flops.flops_per_token(experiment.model, experiment.data.seq_len)
    scale = {"tokens": tokens_per_step, "flops": tokens_per_step * per_token, "step": 1}[x]
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    val = [r["val_loss"] for r in evals]
    return {
        "label": storage.basename(run_dir if storage.is_uri(run_dir) else os.path.normpath(run_dir)),
        "architecture": experiment.model.architecture,
        "params": flops.count_params(experiment.model),
        "steps": max([r["step"] for r in train + evals]),
        "planned_steps": experiment.train.steps,
        "train_x": [r["step"] * scale for r in train], "train_loss": [r["loss"] for r in train],
        "val_x": [r["step"] * scale for r in evals], "val_loss": val,
        "last_loss": train[-1]["loss"] if train else None,
        "last_val": val[-1] if val else None, "best_val": min(val) if val else None,
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
        "tokens_per_step": tokens_per_step,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: Sequence[dict[str, Any]]) -> None:
    from jaxlm.logging import print_grid

    rows = [[r["label"], r["architecture"], f"{r['params']:,}", f"{r['steps']}/{r['planned_steps']}",
             f"{r['steps'] * r['tokens_per_step']:,}", _fmt(r["last_loss"], ".4f"), _fmt(r["last_val"], ".4f"),
             _fmt(r["best_val"], ".4f"), _fmt(r["tokens_per_sec"], ",.0f")] for r in runs]
    print_grid(["run", "architecture", "params", "steps", "tokens", "train loss", "val loss", "best val", "tokens/s"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxlm.logging import plot_curves

    parser = argparse.ArgumentParser(prog="python -m tools.plot_runs", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("runs", nargs="+", help="run directories (each with config.json and metrics.jsonl)")
    parser.add_argument("--x", choices=tuple(AXES), default="tokens", help="the horizontal axis (default: tokens)")
    parser.add_argument("--out", default="runs_compared.png", help="where the plot goes (default: runs_compared.png)")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.runs:
            if not storage.isdir(run_dir):
                raise JaxlmError(f"{run_dir} is not a directory: give run directories such as runs/quickstart")
        runs = [load_run(run_dir, args.x) for run_dir in args.runs]
        if storage.dirname(args.out):
            storage.makedirs(storage.dirname(args.out))
        plot_curves(runs, args.out, xlabel=AXES[args.x], log_x=args.x == "flops")
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    print_table(runs)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
