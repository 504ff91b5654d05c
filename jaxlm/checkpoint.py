"""Checkpoints: an orbax CheckpointManager over the run directory.

Each checkpoint `<run_dir>/checkpoints/<step>/` holds two items: `state` (params, optimizer state, step; arrays
in orbax's tensor format, never pickled) and `data` (the input iterator's position, one JSON file per process).
The run's `config.json` sits beside `checkpoints/`: a checkpoint is only ever restored into the config that wrote
it. Saves are asynchronous; orbax writes each into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError, ConfigError, StorageError
from jaxlm.model import init_params

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"  # orbax's mark of a complete save where directories cannot be renamed


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


def _local_bytes(state: Any) -> int:
    """The bytes this process writes of a state: one copy of each of its shards."""
    return sum(
        shard.data.nbytes for leaf in jax.tree.leaves(state) for shard in getattr(leaf, "addressable_shards", ())
        if shard.replica_id == 0
    )


def _other_shapes(e: BaseException) -> bool:
    """Whether a restore failed on arrays whose shapes differ from the target's (orbax says "shape")."""
    return "shape" in str(e).lower()


def _edited_config(where: str, run_dir: str, e: BaseException) -> CheckpointError:
    # The checkpoint is whole; the config beside it no longer describes it. Deleting checkpoints would not help.
    return CheckpointError(
        f"{where} holds arrays of other shapes than the model in {run_dir}/{CONFIG_FILE} ({_one_line(e)[:160]}): "
        f"was {CONFIG_FILE} changed after the run started? Put back the config it was started with (the "
        "checkpoint is kept as it is), or start a new run directory"
    )


def _disk_bytes(directory: str) -> int:
    """The space the files under a local directory take on its disk."""
    return sum(
        os.stat(os.path.join(d, n)).st_blocks * 512 for d, _, names in os.walk(directory) for n in names
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class _StorageErrorsReportedByJaxlm(logging.Filter):
    """orbax logs a background write that failed for want of space or permission with its whole traceback (and
    asyncio's), before the error reaches `Checkpoints.save`, `wait` or `close`, which report it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return storage.as_storage_error("", "write", error or RuntimeError(record.getMessage())) is None


# orbax logs through absl; the writes it abandons after the first failure end as asyncio's "never retrieved".
_QUIETED_LOGGERS = (logging.getLogger("absl"), logging.getLogger("asyncio"))


def _quiet_abandoned_writes() -> None:
    """When a save fails in the background (a disk filled up), orbax leaves its other writes of that save to end
    on an event loop it has closed, and their errors reach Python's "unraisable" hook, a traceback each, up to
    interpreter shutdown. They repeat the error that `Checkpoints` reports in one line; other unraisable errors
    still print."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxlm_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        shutting_down = isinstance(e, ImportError) and "shutting down" in str(e)
        if not (closed_loop or shutting_down):
            previous(unraisable)

    hook.jaxlm_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class Checkpoints:
    """Save and restore a run's train state and data position; keep the latest N (and optionally the best)."""

    def __init__(self, run_dir: str, keep: int = 3, keep_best: bool = False, async_save: bool = True):
        self.directory = storage.join(storage.abspath(run_dir), CHECKPOINT_DIR)
        if storage.isfile(self.directory):
            raise CheckpointError(f"{self.directory} is not a directory: move it away and rerun")
        storage.makedirs(self.directory)  # a missing bucket is one StorageError line, not orbax's traceback
        _quiet_abandoned_writes()
        for logger in _QUIETED_LOGGERS:
            if not any(isinstance(f, _StorageErrorsReportedByJaxlm) for f in logger.filters):
                logger.addFilter(_StorageErrorsReportedByJaxlm())
        policy: Any = pp.LatestN(n=keep)
        if keep_best:
            best = pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False)
            policy = pp.AnyPreservationPolicy([policy, best])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,  # the remains of a save that a crash interrupted
        )
        self._saving = 0  # the step of the latest save started (its errors may surface later)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        except Exception as e:
            raise CheckpointError(f"cannot open the checkpoints in {self.directory} ({_one_line(e)})") from None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint; a step directory orbax does not recognise is an error, not a fresh start."""
        latest = self.manager.latest_step()
        try:
            names = storage.listdir(self.directory)
        except FileNotFoundError:
            # None yet; or, in a bucket, where a folder is only the names of its objects, it vanished as orbax
            # removed the remains of an interrupted first save (its clean-up runs beside this).
            names = []
        steps = [int(n) for n in names if n.isdigit()]
        unknown = sorted(set(steps) - set(self.manager.all_steps()))
        if unknown and storage.is_uri(self.directory):
            # Object stores have no rename: a save cut short leaves its step directory without orbax's commit
            # marker (what a temporary directory is locally). It holds nothing to keep.
            torn = [s for s in unknown if not storage.exists(storage.join(self.directory, str(s), COMMIT_MARKER))]
            if jax.process_index() == 0:
                for s in torn:
                    storage.rmtree(storage.join(self.directory, str(s)), missing_ok=True)
            unknown = sorted(set(unknown) - set(torn))
        if unknown:
            raise CheckpointError(
                f"{self.directory}/{unknown[-1]} is not a complete checkpoint: delete it to resume from "
                f"{'step ' + str(latest) if latest is not None else 'scratch'}"
            )
        return latest

    def save(self, step: int, state: Any, data_state: dict | None, metrics: dict | None = None) -> None:
        """Start saving `step` (in the background with async saves). Where the local disk lacks the room for it,
        a StorageError before anything is written, so that the latest complete checkpoint stays the latest."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(data_state))
        )
        with self._reported(self._saving):  # an error here is the previous save's, in the background
            self.manager.wait_until_finished()  # its bytes are on disk before counting free space
        with self._reported(step):
            self._check_room(step, state)
            self.manager.save(step, args=args, metrics=metrics, force=True)
        self._saving = step

    def _check_room(self, step: int, state: Any) -> None:
        if storage.is_uri(self.directory):
            return
        # Twice the last checkpoint's footprint on disk where there is one (orbax writes each process's files, then
        # merges them into the final ones: both exist at the peak); else the arrays with a margin for the metadata.
        latest = self.manager.latest_step()
        previous = _disk_bytes(storage.join(self.directory, str(latest))) if latest is not None else 0
        needed = int(max(2 * previous, _local_bytes(state) + (512 << 10)) * 1.05)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise StorageError(
                f"no space left for checkpoint {step} in {self.directory} (it needs about {needed / 2**20:,.1f} MiB, "
                f"{free / 2**20:,.1f} MiB are free): free some space and rerun to resume, or move the run "
                f"elsewhere; {self._intact()}"
            )

    def _intact(self) -> str:
        latest = self.manager.latest_step()
        return f"checkpoint {latest} is intact" if latest is not None else "no checkpoint was saved before"

    @contextlib.contextmanager
    def _reported(self, step: int):
        """Errors of a save that the user can fix (a full or read-only disk, permissions) as one StorageError."""
        try:
            yield
        except StorageError:
            raise
        except Exception as e:  # orbax and tensorstore wrap the OSError, or give only its text
            error = storage.as_storage_error(f"{self.directory}/{step}", "write checkpoint", e)
            if error is None:
                raise
            raise StorageError(f"{error}; {self._intact()}") from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
        """The train state (placed like `abstract_state`'s shardings) and the data state saved at `step`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(_IteratorState())
        )
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            where = f"checkpoint {self.directory}/{step}"
            if _other_shapes(e):
                raise _edited_config(where, storage.dirname(self.directory), e) from None
            raise CheckpointError(
                f"{where} cannot be restored ({_one_line(e)}): move that step's directory out of "
                f"{self.directory} to fall back to an earlier checkpoint, or start a new run directory"
            ) from None
        return restored["state"], restored["data"].state

    def wait(self) -> None:
        with self._reported(self._saving):
            self.manager.wait_until_finished()

    def close(self, after_error: bool = False) -> None:
        """Waits for the last save. After an error, one that the same cause (a full disk) made fail too is not
        raised over it."""
        try:
            with self._reported(self._saving):
                self.manager.close()
        except Exception:
            if not after_error:
                raise


def read_config(run_dir: str) -> Experiment | None:
    path = storage.join(run_dir, CONFIG_FILE)
    if not storage.exists(path):
        return None
    try:
        return Experiment.from_dict(json.loads(storage.read_text(path)))
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a jaxlm config ({_one_line(e)}): point to a jaxlm run directory") from None


# Fields that do not change what is computed (up to rounding, for the attention kernel): a run may resume with
# other values of these.
BOOKKEEPING = {
    "model": {"remat", "attention"},
    "train": {"out_dir", "log_every", "eval_every", "eval_steps", "ckpt_every", "ckpt_every_minutes",
              "keep_checkpoints", "keep_best", "async_checkpoints", "samples", "sample_tokens",
              "tensorboard", "wandb_project", "wandb_entity", "wandb_name", "wandb_tags", "profile_steps"},
    "data": {"num_workers", "cache_dir"},
}


def _computation(d: dict[str, Any]) -> dict[str, Any]:
    return {
        section: {k: v for k, v in value.items() if k not in BOOKKEEPING.get(section, ())}
        if isinstance(value, dict) else value
        for section, value in d.items()
    }


def _holds_results(run_dir: str) -> bool:
    """Whether a run directory holds anything a run produced: a checkpoint, logged metrics or a summary."""
    checkpoints = storage.join(run_dir, CHECKPOINT_DIR)
    if storage.isdir(checkpoints) and storage.listdir(checkpoints):
        return True
    return any(
        storage.isfile(path) and storage.getsize(path) > 0
        for path in (storage.join(run_dir, "metrics.jsonl"), storage.join(run_dir, "summary.json"))
    )


def write_or_check_config(experiment: Experiment) -> bool:
    """Write config.json into the run directory; refuse a directory that holds a run of another config.

    A directory whose config.json is all there is (a start that failed before its first step, say on a missing
    corpus) holds no run: its config is replaced. Returns True when the directory already held this config (the
    run may resume from it). Bookkeeping fields (logging, evaluation and checkpoint intervals, paths) may differ;
    config.json then records the new values.
    """
    run_dir = experiment.run_dir
    existing = read_config(run_dir)
    if existing is not None and not _holds_results(run_dir):
        existing = None  # a start that failed before its first step: nothing of it to keep
    if existing is not None:
        old, new = _computation(existing.to_dict()), _computation(experiment.to_dict())
        if old != new:
            diffs = [
                f"{section}.{key}: {old[section].get(key)!r} -> {new[section][key]!r}"
                for section in new if isinstance(new[section], dict)
                for key in new[section] if old.get(section, {}).get(key) != new[section][key]
            ] or [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in new if old.get(key) != new[key]]
            raise CheckpointError(
                f"{run_dir} holds a run of another config ({'; '.join(diffs[:3])}): use a new "
                "--train.out-dir, or delete the old run directory"
            )
    if jax.process_index() == 0:
        try:
            storage.makedirs(run_dir)
        except OSError as e:
            raise CheckpointError(
                f"cannot create the run directory {run_dir} ({e.strerror}): choose another --train.out-dir"
            ) from None
        storage.write_text_atomic(storage.join(run_dir, CONFIG_FILE), experiment.to_json())
    return existing is not None


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
    """A run directory or a checkpoint step directory -> (run directory, step or None for the latest)."""
    path = storage.abspath(path).rstrip("/")
    if storage.exists(storage.join(path, CONFIG_FILE)):
        return path, None
    parent = storage.dirname(path)
    if storage.basename(parent) == CHECKPOINT_DIR and storage.basename(path).isdigit():
        return storage.dirname(parent), int(storage.basename(path))
    raise CheckpointError(f"{path} is neither a jaxlm run directory (with {CONFIG_FILE}) nor a checkpoint step directory")


def load_params(path: str) -> tuple[Experiment, Any]:
    """The experiment and params of a run directory's latest checkpoint, or of one checkpoint step directory.

    Only the params are read (not the optimizer state), onto the default device.
    """
    run_dir, step = resolve_checkpoint(path)
    experiment = read_config(run_dir)
    checkpoints = Checkpoints(run_dir, async_save=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet: train it first")
    finally:
        checkpoints.close()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: init_params(experiment.model, jax.random.key(0), seq_len=1))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
    item = storage.join(run_dir, CHECKPOINT_DIR, str(step), "state")
    try:
        target = {"params": abstract}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = ocp.PyTreeCheckpointer().restore(
            item, args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
        )
    except Exception as e:
        if _other_shapes(e):
            raise _edited_config(item, run_dir, e) from None
        raise CheckpointError(
            f"{item} holds no params of the model in {run_dir}/{CONFIG_FILE} ({_one_line(e)}): is it a "
            "language-model run of jaxlm?"
        ) from None
    return experiment, restored["params"]


def save_params(experiment: Experiment, params: Any, step: int = 0) -> None:
    """A checkpoint of `params` with a fresh optimizer state, in the experiment's run directory: how imported
    weights become a run that every tool reads and `--train.init-from` starts from."""
    from jaxlm.optim import make_optimizer

    checkpoints = Checkpoints(experiment.run_dir, async_save=False)
    try:
        if checkpoints.latest_step() is not None:
            raise CheckpointError(f"{experiment.run_dir} already holds a checkpoint: choose a new directory")
        opt_state = jax.jit(make_optimizer(experiment.optim, experiment.train.steps, experiment.model).init)(params)
        state = {"step": jax.numpy.asarray(step, jax.numpy.int32), "params": params, "opt_state": opt_state}
        checkpoints.save(step, state, data_state=None)
        checkpoints.wait()
    finally:
        checkpoints.close()
