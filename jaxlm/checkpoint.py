"""Checkpoints: an orbax CheckpointManager over the run directory.

Each checkpoint `<run_dir>/checkpoints/<step>/` holds two items: `state` (params, optimizer state, step; arrays
in orbax's tensor format, never pickled) and `data` (the input iterator's position, one JSON file per process).
The run's `config.json` sits beside `checkpoints/`: a checkpoint is only ever restored into the config that wrote
it. Saves are asynchronous; orbax writes each into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class _IteratorState:
    """Holds an iterator's state for grain's orbax handler, which writes it as one JSON file per process."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class Checkpoints:
    """Save and restore a run's train state and data position; keep the latest N (and optionally the best)."""

    def __init__(self, run_dir: str, keep: int = 3, keep_best: bool = False, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        policy: Any = pp.LatestN(n=keep)
        if keep_best:
            best = pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False)
            policy = pp.AnyPreservationPolicy([policy, best])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(data_state))
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
        """The train state (placed like `abstract_state`'s shardings) and the data state saved at `step`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(_IteratorState())
        )
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored ({_one_line(e)}): delete that step's "
                "directory to fall back to an earlier checkpoint, or start a new run directory"
            ) from None
        return restored["state"], restored["data"].state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_config(run_dir: str) -> Experiment | None:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return Experiment.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a jaxlm config ({_one_line(e)}): point to a jaxlm run directory") from None


def write_or_check_config(experiment: Experiment) -> bool:
    """Write config.json into a new run directory; in an existing one, refuse a different config.

    Returns True when the directory already held this config (the run may resume from it).
    """
    run_dir = experiment.run_dir
    existing = read_config(run_dir)
    if existing is not None:
        if existing.to_dict() != experiment.to_dict():
            old, new = existing.to_dict(), experiment.to_dict()
            diffs = [
                f"{section}.{key}: {old[section][key]!r} -> {new[section][key]!r}"
                for section in new if isinstance(new[section], dict)
                for key in new[section] if old.get(section, {}).get(key) != new[section][key]
            ]
            raise CheckpointError(
                f"{run_dir} holds a run of another config ({'; '.join(diffs[:3]) or 'name'}): use a new "
                "--train.out_dir, or delete the old run directory"
            )
        return True
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(experiment.to_json())
        os.replace(tmp, os.path.join(run_dir, CONFIG_FILE))
    return False


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
    """A run directory or a checkpoint step directory -> (run directory, step or None for the latest)."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return path, None
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CHECKPOINT_DIR and os.path.basename(path).isdigit():
        return os.path.dirname(parent), int(os.path.basename(path))
    raise CheckpointError(f"{path} is neither a jaxlm run directory (with {CONFIG_FILE}) nor a checkpoint step directory")


def load_params(path: str) -> tuple[Experiment, Any]:
    """The experiment and params of a run directory's latest checkpoint, or of one checkpoint step directory."""
    from jaxlm.train import abstract_train_state  # train imports this module

    run_dir, step = resolve_checkpoint(path)
    experiment = read_config(run_dir)
    checkpoints = Checkpoints(run_dir, async_save=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet: train it first")
        abstract = abstract_train_state(experiment)
        state, _ = checkpoints.restore(step, abstract)
    finally:
        checkpoints.close()
    return experiment, state["params"]
