"""What a run records as it goes: metrics.jsonl, TensorBoard events and W&B (one writer for every task), the
profiler window, the metrics reader, loss plots and tables.

metrics.jsonl holds one JSON object per line, each with a `step`: train rows (`loss`, `lr`, `grad_norm`, ...)
and evaluation rows (`val_loss`, ...). Only process 0 writes it. A resumed run first drops the rows of steps
after its checkpoint (they belong to the part of the run that was lost), rewriting the file atomically. The same
rows go to TensorBoard event files in the run directory (scalars against steps, and in `by_tokens/` against
tokens seen; the config as text and hparams) and, with `--train.wandb-project`, to Weights & Biases.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import jax

from jaxlm import storage
from jaxlm.config import Experiment, TrainConfig
from jaxlm.errors import ConfigError, DataError, StorageError

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
    """Records a run's rows: metrics.jsonl, TensorBoard event files and (if asked) W&B. Process 0 only.

    A resumed run first drops the rows beyond `resume_step`: from metrics.jsonl, and from TensorBoard's view of
    the event files (a purge marker at the next step). `experiment` (None: metrics.jsonl only) says what else to
    write: TensorBoard unless `--train.tensorboard false`, W&B with `--train.wandb-project`.
    """

    def __init__(self, run_dir: str, resume_step: int = 0, experiment: Experiment | None = None):
        self.path = storage.join(run_dir, METRICS_FILE)
        self.run_dir = run_dir
        self.primary = jax.process_index() == 0
        self.tensorboard: _TensorBoard | None = None
        self.wandb = None
        if not self.primary:
            return
        kept: list[dict[str, Any]] = []
        if storage.exists(self.path):
            kept = [r for r in read_metrics(self.path, drop_torn_tail=True) if r["step"] <= resume_step]
            storage.write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        if experiment is None:
            return
        if experiment.train.tensorboard:
            last_tokens = max((r["tokens"] for r in kept if "tokens" in r), default=None)
            self.tensorboard = _TensorBoard(run_dir, experiment, resume_step, last_tokens)
        if experiment.train.wandb_project:
            self.wandb = _start_wandb(run_dir, experiment)

    def write(self, row: dict[str, Any]) -> None:
        if not self.primary:
            return
        storage.append_line(self.path, json.dumps(row))
        scalars = scalar_tags(row)
        if self.tensorboard is not None:
            with storage.io_errors(self.run_dir, "write TensorBoard events to"):
                self.tensorboard.write(row["step"], row.get("tokens"), scalars)
        if self.wandb is not None:
            x_axes = {k: row[k] for k in ("step", "tokens") if row.get(k) is not None}
            self.wandb.log({**x_axes, **scalars})

    def flush(self) -> None:
        """Make what was written so far visible (event files of a gs:// run are uploaded)."""
        if self.tensorboard is not None:
            with storage.io_errors(self.run_dir, "write TensorBoard events to"):
                self.tensorboard.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close; `failed` marks the W&B run as ended by an error (a rerun resumes it), and keeps a
        storage error of the closing (the same full disk, often) from being raised over that error."""
        tensorboard, self.tensorboard = self.tensorboard, None
        try:
            if tensorboard is not None:
                with storage.io_errors(self.run_dir, "write TensorBoard events to"):
                    tensorboard.close()
        except StorageError:
            if not failed:
                raise
        finally:
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else 0)
                self.wandb = None


def scalar_tags(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers by their TensorBoard and W&B name: `eval/<key>` for evaluation figures (`val_*`),
    `train/<key>` for the others. `step` and `tokens` are the axes, not scalars; absent figures (None) are left out."""
    scalars = {}
    for key, value in row.items():
        if key in ("step", "tokens") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        scalars[f"{'eval' if key.startswith('val_') else 'train'}/{key}"] = float(value)
    return scalars


def flat_config(experiment: Experiment) -> dict[str, bool | int | float | str]:
    """The experiment's fields as `section.field` -> a number, bool or string (TensorBoard's hparams, W&B's config)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in experiment.to_dict().items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for field_name, v in items:
            name = f"{key}.{field_name}" if field_name else key
            flat[name] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return flat


TENSORBOARD_BY_TOKENS = "by_tokens"  # a TensorBoard run inside the run directory: the same scalars against tokens


def _tensorboardx() -> tuple[Any, Any]:
    """tensorboardX's SummaryWriter and hparams, imported without PyTorch: where torch is installed, tensorboardX
    imports it (2 s per process) only to accept torch tensors, which jaxlm never passes."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]  # meanwhile `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter, hparams


class _TensorBoard:
    """Two event-file writers (tensorboardX, no TensorFlow): the scalars against steps in the run directory, and
    against tokens seen in its `by_tokens/` folder (a second TensorBoard run, since one run has one step axis).

    A gs:// run's files are written in a local folder and copied into the run directory on every `flush` (at each
    checkpoint and at the end), each file whole: a crash loses what was logged since the last checkpoint."""

    def __init__(self, run_dir: str, experiment: Experiment, resume_step: int, last_tokens: int | None):
        SummaryWriter, hparams = _tensorboardx()
        self.run_dir = run_dir
        self.local_dir = tempfile.mkdtemp(prefix="jaxlm-events-") if storage.is_uri(run_dir) else run_dir
        resumed = resume_step > 0
        self.by_step = SummaryWriter(self.local_dir, purge_step=resume_step + 1 if resumed else None, flush_secs=30)
        self.by_tokens = SummaryWriter(
            os.path.join(self.local_dir, TENSORBOARD_BY_TOKENS),
            purge_step=(last_tokens or 0) + 1 if resumed else None, flush_secs=30,
        )
        if not resumed:
            self.by_step.add_text("config", "    " + experiment.to_json().replace("\n", "\n    "), 0)
            for summary in hparams(flat_config(experiment), {"eval/val_loss": 0.0, "train/loss": 0.0}):
                self.by_step.file_writer.add_summary(summary)
        self.flush()

    def write(self, step: int, tokens: int | None, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.by_step.add_scalar(tag, value, step)
            if tokens is not None:
                self.by_tokens.add_scalar(tag, value, tokens)

    def flush(self) -> None:
        self.by_step.flush()
        self.by_tokens.flush()
        if self.local_dir != self.run_dir:
            _copy_tree(self.local_dir, self.run_dir)

    def close(self) -> None:
        self.flush()
        self.by_step.close()
        self.by_tokens.close()
        if self.local_dir != self.run_dir:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def _copy_tree(local_dir: str, run_dir: str) -> None:
    """Every file under `local_dir` copied, whole, to the same relative path under `run_dir` (a gs:// URI)."""
    for folder, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(run_dir, os.path.relpath(path, local_dir)), f.read())


class ProfileWindow:
    """`--train.profile-steps a:b`: a `jax.profiler` trace of steps a to b-1 (of those this run takes), written to
    `<run_dir>/plugins/profile/<time>/`: `<host>.xplane.pb` for TensorBoard's profile plugin and XProf,
    `<host>.trace.json.gz` for Perfetto. Each process traces its own devices into its own files. Each step is
    marked ("train", its number), so the trace viewer shows where steps begin and end. The window closes after
    step b-1 has finished on the device."""

    def __init__(self, run_dir: str, steps: range):
        self.run_dir = run_dir
        self.steps = steps
        self.trace_dir: str | None = None  # set while tracing
        self.done = False

    def step(self, step: int) -> contextlib.AbstractContextManager:
        """Around the dispatch of `step`: starts the trace at the window's first step."""
        if self.trace_dir is None and not self.done and step in self.steps:
            self.trace_dir = tempfile.mkdtemp(prefix="jaxlm-trace-") if storage.is_uri(self.run_dir) else self.run_dir
            jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True)
        if self.trace_dir is None:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def stepped(self, step: int, outputs: Any) -> None:
        """After the dispatch of `step`: at the window's last step, waits for `outputs` and ends the trace."""
        if self.trace_dir is not None and step >= self.steps.stop - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.trace_dir is None:
            return
        jax.profiler.stop_trace()
        if self.trace_dir != self.run_dir:
            _copy_tree(self.trace_dir, self.run_dir)
            shutil.rmtree(self.trace_dir, ignore_errors=True)
        print(f"profiler trace of steps {self.steps.start}..{self.steps.stop - 1} in {self.run_dir}/plugins/profile")
        self.trace_dir, self.done = None, True


WANDB_ID_FILE = "wandb_id.txt"  # the run directory's W&B run, resumed when the run resumes


def check_wandb(train: TrainConfig) -> None:
    """With `--train.wandb-project`, the wandb package must be there (checked before anything is built)."""
    if not train.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--train.wandb-project needs the wandb package: pip install 'jaxlm[wandb]' (or leave the flag out)"
        ) from None


def _start_wandb(run_dir: str, experiment: Experiment):
    """The W&B run of this run directory: a new one (its id stored in the run directory), or the stored one
    resumed. W&B's own files go to `<run_dir>/wandb/` for a local run directory, to ./wandb for a gs:// one."""
    check_wandb(experiment.train)
    import wandb

    train = experiment.train
    id_path = storage.join(run_dir, WANDB_ID_FILE)
    if storage.exists(id_path):
        run_id = storage.read_text(id_path).strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        storage.write_text_atomic(id_path, run_id + "\n")
    run = wandb.init(
        project=train.wandb_project, entity=train.wandb_entity or None, name=train.wandb_name or experiment.name,
        tags=list(train.wandb_tags) or None, config=experiment.to_dict(), id=run_id, resume="allow",
        dir=None if storage.is_uri(run_dir) else run_dir,
    )
    # W&B's own step counts calls to log; the charts use the run's step (and tokens) instead.
    run.define_metric("step")
    run.define_metric("tokens")
    for group in ("train", "eval"):
        run.define_metric(f"{group}/*", step_metric="step")
    return run


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
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(7, 4.5) if len(runs) == 1 else (8, 5))
    ax = fig.subplots()
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
