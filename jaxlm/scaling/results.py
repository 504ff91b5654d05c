"""Sweep results: reading run directories (`read_run`, `collect_results`, `collect_curves`) and results tables in
jaxlm's or Epoch AI's CSV layout (`write_csv`, `read_csv`)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence

import numpy as np

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.flops import count_nonembedding_params, count_params, flops_per_token
from jaxlm.logging import read_metrics
from jaxlm.scaling._common import ScalingError
from jaxlm.scaling.envelope import Curve


COLUMNS = ("name", "N", "N_nonembed", "D", "C", "train_loss", "val_loss")
EPOCH_COLUMNS = ("Model Size", "Training FLOP", "loss")


def read_run(run_dir: str) -> tuple[Experiment, list[dict], list[dict]]:
    """A run directory's experiment (config.json), and its logged train rows and evaluations (metrics.jsonl), each
    by step; a step logged twice (a run resumed past it) keeps its last row."""
    config_path = storage.join(run_dir, "config.json")
    if not storage.exists(config_path):
        raise ScalingError(f"{run_dir} has no config.json: give the directory of a jaxlm run (such as runs/quickstart)")
    try:
        experiment = Experiment.from_dict(json.loads(storage.read_text(config_path)))
    except (json.JSONDecodeError, TypeError) as e:
        raise ScalingError(f"{run_dir}/config.json is not a jaxlm config ({e})") from None
    rows = read_metrics(storage.join(run_dir, "metrics.jsonl"))
    train = {r["step"]: r for r in rows if "loss" in r and "tokens" in r}
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    return experiment, [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def _run_dirs(sweep_dir: str) -> list[str]:
    if not storage.isdir(sweep_dir):
        raise ScalingError(f"{sweep_dir} is not a directory: give a sweep's run directory or a results CSV")
    names = storage.listdir(sweep_dir)
    dirs = [storage.join(sweep_dir, d) for d in names if storage.exists(storage.join(sweep_dir, d, "config.json"))]
    if not dirs:
        raise ScalingError(f"{sweep_dir} holds no run directories (subdirectories with config.json)")
    return dirs


def collect_results(sweep_dir: str, *, allow_unfinished: bool = False) -> list[dict]:
    """One row per run directory under `sweep_dir`: name, N, N_nonembed, D (tokens trained), C (FLOPs by
    jaxlm.flops.flops_per_token x D, so the members of one IsoFLOP budget share it), final train and validation
    loss. An unfinished run raises, naming it, unless `allow_unfinished` (then it is left out)."""
    results = []
    for run_dir in _run_dirs(sweep_dir):
        experiment, train, evals = read_run(run_dir)
        steps = experiment.train.steps
        finished = bool(train) and train[-1]["step"] >= steps and bool(evals) and evals[-1]["step"] >= steps
        if not finished:
            if allow_unfinished:
                continue
            last = train[-1]["step"] if train else 0
            raise ScalingError(
                f"run {run_dir} is unfinished (step {last} of {steps}, or no final evaluation): finish it, or pass "
                "allow_unfinished=True (--allow-unfinished) to leave it out"
            )
        D = float(train[-1]["tokens"])
        results.append(
            {
                "name": experiment.name,
                "N": count_params(experiment.model),
                "N_nonembed": count_nonembedding_params(experiment.model),
                "D": D,
                "C": flops_per_token(experiment.model, experiment.data.seq_len) * D,
                "train_loss": float(train[-1]["loss"]),
                "val_loss": float(evals[-1]["val_loss"]),
            }
        )
    if not results:
        raise ScalingError(f"{sweep_dir} has no finished runs yet")
    _validate(results, COLUMNS, sweep_dir)
    return results


def collect_curves(sweep_dir: str, *, allow_unfinished: bool = True, loss: str = "loss") -> list[Curve]:
    """The training curves (tokens, train loss; or `loss="val_loss"` for the evaluations) of the runs under
    `sweep_dir`, for `fit_envelope`. Runs with fewer than two points are left out."""
    curves = []
    for run_dir in _run_dirs(sweep_dir):
        experiment, train, evals = read_run(run_dir)
        finished = bool(train) and train[-1]["step"] >= experiment.train.steps
        if not (finished or allow_unfinished):
            continue
        tokens_per_step = experiment.data.batch_size * experiment.data.seq_len
        if loss == "val_loss":
            points = [(r["step"] * tokens_per_step, r["val_loss"]) for r in evals if r["step"] > 0]
        else:
            points = [(r["tokens"], r["loss"]) for r in train if r["tokens"] > 0]
        if len(points) >= 2:
            t, losses = np.array(points, dtype=np.float64).T
            curves.append(Curve(N=float(count_params(experiment.model)), tokens=t, loss=losses, name=experiment.name))
    return curves


def _validate(rows: list[dict], columns: Sequence[str], source: str, first_line: int = 2) -> None:
    for i, row in enumerate(rows):
        for column in columns:
            if column == "name":
                continue
            value = row.get(column)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            if not ok:
                label = f"line {first_line + i}" + (f" ({row['name']})" if row.get("name") else "")
                raise ScalingError(f"{source} {label}: {column} = {value!r} is not a positive number")


def write_csv(rows: Sequence[dict], path: str) -> None:
    """Write a results table with the columns `COLUMNS`, after checking every value."""
    rows = list(rows)
    _validate(rows, COLUMNS, path)
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ScalingError(f"results rows lack column(s) {', '.join(missing)}")
    storage.makedirs(storage.dirname(storage.abspath(path)))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(row[k])) if k != "name" else row[k]) for k in COLUMNS})
    storage.write_text_atomic(path, text.getvalue())


def read_csv(path: str) -> list[dict]:
    """Read a results table: jaxlm's layout (`COLUMNS`), or Epoch AI's Chinchilla data (`Model Size`, `Training
    FLOP`, `loss`; there D = C / 6N and the single loss column is `loss`). Missing columns or values that are not
    positive numbers raise, naming the column and line."""
    if not storage.exists(path):
        raise ScalingError(f"{path} does not exist: give a results CSV or a sweep's run directory")
    if not storage.isfile(path):
        raise ScalingError(f"{path} is not a file: give a results CSV or a sweep's run directory")
    reader = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
    header = reader.fieldnames or []
    raw = list(reader)
    epoch = all(c in header for c in EPOCH_COLUMNS) and "N" not in header
    needed = EPOCH_COLUMNS if epoch else COLUMNS
    missing = [c for c in needed if c not in header]
    if missing:
        raise ScalingError(
            f"{path} lacks column(s) {', '.join(missing)}: expected {', '.join(COLUMNS)} "
            f"(or Epoch AI's {', '.join(EPOCH_COLUMNS)})"
        )
    if not raw:
        raise ScalingError(f"{path} has a header but no rows")
    rows = []
    for i, r in enumerate(raw):
        row: dict = {}
        for column in needed:
            text = (r.get(column) or "").strip()
            try:
                row[column] = text if column == "name" else float(text)
            except ValueError:
                raise ScalingError(f"{path} line {i + 2}: {column} = {text!r} is not a number") from None
        if epoch:
            row = {"name": f"row{i + 2}", "N": row["Model Size"], "C": row["Training FLOP"], "loss": row["loss"]}
        rows.append(row)
    _validate(rows, ("N", "C", "loss") if epoch else COLUMNS, path)
    if epoch:
        for row in rows:
            row["D"] = row["C"] / (6.0 * row["N"])
    return rows
