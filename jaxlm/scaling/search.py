"""Hyperparameter searches over any config fields: members built from a base experiment by a grid
(`grid_search`) or by seeded random draws (`random_search`, from `LogUniform`, `Uniform` and `Choice`), and their
report: finished members sorted by final validation loss (`search_rows`) and validation loss against each searched
field (`plot_search`).

Fields are named by their path, `"optim.lr"`, `"model.d_model"`, `"data.batch_size"`. A model field that others
derive from (d_model, from which d_ff follows by rule) changes them too, as an override on the command line does.
Each member trains in <base run dir>/<member name>, so the base's run directory is the sweep's.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlm import storage
from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.logging import read_metrics
from jaxlm.scaling.sweeps import member_train

SECTIONS = ("model", "data", "optim", "train", "mesh")


@dataclass(frozen=True)
class LogUniform:
    """Values whose logarithm is uniform on [log low, log high] (learning rates, weight decays)."""

    low: float
    high: float

    def __post_init__(self):
        if not 0 < self.low < self.high:
            raise ConfigError(f"LogUniform({self.low}, {self.high}): needs 0 < low < high")

    def draw(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclass(frozen=True)
class Uniform:
    """Values uniform on [low, high]."""

    low: float
    high: float

    def __post_init__(self):
        if not self.low < self.high:
            raise ConfigError(f"Uniform({self.low}, {self.high}): needs low < high")

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class Choice:
    """One of the given values, each as likely (batch sizes, widths, schedules)."""

    values: tuple

    def __post_init__(self):
        if not isinstance(self.values, tuple) or not self.values:
            raise ConfigError(f"Choice({self.values!r}): give a non-empty tuple of values")

    def draw(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]


def _split(path: str) -> tuple[str, str]:
    section, _, field = path.partition(".")
    if section not in SECTIONS or not field:
        raise ConfigError(f"{path!r} is not a config field: name one as section.field, e.g. optim.lr or model.d_model")
    return section, field


def with_fields(base: Experiment, values: Mapping[str, Any]) -> Experiment:
    """`base` with each field at `values[path]` ("optim.lr": 1e-3); model fields derived by rule follow."""
    changes: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        section, field = _split(path)
        known = {f.name for f in dataclasses.fields(getattr(base, section))}
        if field not in known:
            raise ConfigError(f"{path!r}: {section} has no field {field!r} (it has {', '.join(sorted(known))})")
        changes.setdefault(section, {})[field] = value
    sections = {}
    for section, fields in changes.items():
        config = getattr(base, section)
        if isinstance(config, ModelConfig):
            sections[section] = config.replace(**fields)
        else:
            sections[section] = dataclasses.replace(config, **fields)
    return dataclasses.replace(base, **sections)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _labels(paths: Sequence[str]) -> dict[str, str]:
    """Each field's label in member names: its own name where that is unique among the searched fields."""
    fields = [p.partition(".")[2] for p in paths]
    return {p: f if fields.count(f) == 1 else p.replace(".", "_") for p, f in zip(paths, fields)}


def _member(base: Experiment, values: Mapping[str, Any], name: str) -> Experiment:
    member = with_fields(base, values)
    return dataclasses.replace(member, name=name, train=member_train(member, name, member.train.steps))


def grid_search(base: Experiment, grid: Mapping[str, Sequence[Any]]) -> tuple[Experiment, ...]:
    """Every combination of the values given per field, the first field varying slowest; members are named
    f"{base.name}-{field}{value}-..." (e.g. lr_search-lr0.003-d_model64)."""
    if not grid or any(len(values) == 0 for values in grid.values()):
        raise ConfigError("grid_search needs at least one field, each with at least one value")
    labels = _labels(list(grid))
    members = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        name = "-".join([base.name, *(f"{labels[p]}{_short(v)}" for p, v in values.items())])
        members.append(_member(base, values, name))
    return tuple(members)


def random_search(
    base: Experiment, space: Mapping[str, LogUniform | Uniform | Choice], n: int, seed: int
) -> tuple[Experiment, ...]:
    """`n` members whose fields are drawn from `space` by a generator seeded with `seed`: the same seed gives the
    same members. Members are named f"{base.name}-{i}-{field}{value}-..."."""
    if n < 1 or not space:
        raise ConfigError(f"random_search needs n >= 1 (got {n}) and at least one field")
    for path, distribution in space.items():
        _split(path)
        if not isinstance(distribution, (LogUniform, Uniform, Choice)):
            raise ConfigError(f"{path}: {distribution!r} is not a LogUniform, Uniform or Choice")
    rng = np.random.default_rng(seed)
    labels = _labels(list(space))
    members = []
    for i in range(n):
        values = {path: distribution.draw(rng) for path, distribution in space.items()}
        name = "-".join([base.name, str(i), *(f"{labels[p]}{_short(v)}" for p, v in values.items())])
        members.append(_member(base, values, name))
    return tuple(members)


def field_value(experiment: Experiment, path: str) -> Any:
    section, field = _split(path)
    return getattr(getattr(experiment, section), field)


def search_rows(members: Sequence[Experiment], fields: Sequence[str]) -> list[dict[str, Any]]:
    """The finished members (summary.json present), each as its name, searched field values, final train loss
    and final validation loss, sorted by validation loss (a non-finite one last)."""
    rows = []
    for member in members:
        if not storage.exists(storage.join(member.run_dir, "summary.json")):
            continue
        logged = read_metrics(storage.join(member.run_dir, "metrics.jsonl"), drop_torn_tail=True)
        train = [r["loss"] for r in logged if "loss" in r]
        evals = [r["val_loss"] for r in logged if "val_loss" in r]
        rows.append({
            "name": member.name, **{path: field_value(member, path) for path in fields},
            "train_loss": train[-1] if train else math.nan, "val_loss": evals[-1] if evals else math.nan,
        })
    return sorted(rows, key=lambda r: (not math.isfinite(r["val_loss"]), r["val_loss"]))


def rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def plot_search(rows: Sequence[dict[str, Any]], fields: Sequence[str], png_path: str, title: str = "") -> None:
    """One panel per searched field: final validation loss against its values, one line per combination of the
    other fields' values (a log axis for a field whose positive values span a factor of 10 or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 4), squeeze=False)
    for ax, path in zip(axes[0], fields):
        others = [f for f in fields if f != path]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row[o] for o in others), []).append(row)
        for key, group in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
            group = sorted(group, key=lambda r: r[path])
            label = ", ".join(f"{o.partition('.')[2]}={_short(v)}" for o, v in zip(others, key))
            ax.plot([r[path] for r in group], [r["val_loss"] for r in group], marker="o", label=label or None)
        values = [r[path] for r in rows if isinstance(r[path], (int, float))]
        if values and min(values) > 0 and max(values) >= 10 * min(values):
            ax.set_xscale("log")
        ax.set_xlabel(path)
        ax.set_ylabel("final validation loss")
        if others and len(groups) <= 12:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with storage.local_copy(png_path, "w") as local:  # matplotlib writes local files only
        fig.savefig(local, dpi=110, format="png")
    plt.close(fig)
