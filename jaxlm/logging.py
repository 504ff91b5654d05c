"""What a run records as it goes: metrics.jsonl (one writer for every task), its reader, loss plots and tables.

metrics.jsonl holds one JSON object per line, each with a `step`: train rows (`loss`, `lr`, `grad_norm`, ...)
and evaluation rows (`val_loss`, ...). Only process 0 writes it. A resumed run first drops the rows of steps
after its checkpoint (they belong to the part of the run that was lost), rewriting the file atomically.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import jax

from jaxlm import storage
from jaxlm.errors import DataError

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str, *, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics file ([] if it does not exist). A damaged line is a `DataError` naming it; with
    `drop_torn_tail` a damaged last line (what a crash in the middle of a write leaves) is dropped instead."""
    if not storage.exists(path):
        return []
    text = storage.read_bytes(path).decode("utf-8", errors="replace")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "step" not in row:
            if drop_torn_tail and i == len(lines) - 1:
                print(f"{path}: its last line ({number}) was cut short, by a crash while it was written; "
                      "reading the rows before it", file=sys.stderr)
                break
            if row is None:
                raise DataError(f"{path} line {number} is not JSON: the file is damaged; delete that line")
            raise DataError(f"{path} line {number} has no 'step': not a jaxlm metrics file")
        rows.append(row)
    return rows


class MetricsWriter:
    """Appends rows to `<run_dir>/metrics.jsonl` (process 0 only), after dropping rows beyond `resume_step`."""

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.path = storage.join(run_dir, METRICS_FILE)
        self.primary = jax.process_index() == 0
        if self.primary and storage.exists(self.path):
            kept = [r for r in read_metrics(self.path, drop_torn_tail=True) if r["step"] <= resume_step]
            storage.write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        if self.primary:
            storage.append_line(self.path, json.dumps(row))


def format_grid(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: right-aligned columns under a header and a rule."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_grid(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(format_grid(header, rows))


def plot_losses(metrics_path: str, png_path: str, title: str) -> None:
    """Train and validation loss against tokens seen (against steps for runs that log no token counts)."""
    rows = read_metrics(metrics_path, drop_torn_tail=True)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    by_tokens = bool(train_rows) and "tokens" in train_rows[0]
    per_step = train_rows[0]["tokens"] / train_rows[0]["step"] if by_tokens else 1
    curve = {
        "label": "", "train_x": [r["step"] * per_step for r in train_rows], "train_loss": [r["loss"] for r in train_rows],
        "val_x": [r["step"] * per_step for r in val_rows], "val_loss": [r["val_loss"] for r in val_rows],
    }
    plot_curves([curve], png_path, xlabel="tokens" if by_tokens else "step", title=title)


def plot_curves(runs: Sequence[dict[str, Any]], png_path: str, xlabel: str, title: str = "", log_x: bool = False):
    """Each run's train loss (thin) and validation loss (markers), one colour per run. A run is a dict with
    `label` ("" for a plot of one run), `train_x`, `train_loss`, `val_x` and `val_loss`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5) if len(runs) == 1 else (8, 5))
    for i, run in enumerate(runs):
        prefix = f"{run['label']} " if run["label"] else ""
        colour = f"C{i % 10}"
        ax.plot(run["train_x"], run["train_loss"], color=colour, lw=0.8, alpha=0.6, label=f"{prefix}train")
        if run["val_x"]:
            ax.plot(run["val_x"], run["val_loss"], "o-", color=colour, ms=4, label=f"{prefix}validation")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with storage.local_copy(png_path, "w") as local:  # matplotlib writes local files only
        fig.savefig(local, dpi=110, format="png")
    plt.close(fig)
