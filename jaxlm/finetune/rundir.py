"""A finetuning run's directory: its configs (written, checked, read back), saved parameter trees and the
summary."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError
from jaxlm.finetune.config import FINETUNE_FILE, FinetuneConfig, Params


# ---------------------------------------------------------------------------------------------- run directory


def write_or_check_finetune(run_dir: str, ft: FinetuneConfig) -> None:
    """Write finetune.json into the run directory, or refuse one that holds a finetuning run of another config."""
    path = storage.join(run_dir, FINETUNE_FILE)
    mine = json.loads(json.dumps(ft.to_dict()))
    if storage.exists(path):
        # Read back through the config, so that a field added since the run began compares as its default.
        old = json.loads(json.dumps(FinetuneConfig.from_dict(json.loads(storage.read_text(path))).to_dict()))
        if old != mine:
            changed = [k for k in mine if old.get(k) != mine[k]]
            raise CheckpointError(
                f"{run_dir} holds a finetuning run of another config (finetune.{', finetune.'.join(changed[:3])}): "
                "use a new --train.out-dir, or delete the old run directory"
            )
    elif jax.process_index() == 0:
        storage.makedirs(run_dir)
        storage.write_text_atomic(path, json.dumps(mine, indent=2))


def _flatten(tree: Params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten(flat: dict[str, np.ndarray]) -> Params:
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree


def save_tree(path: str, tree: Params) -> None:
    with storage.local_copy(path, "w") as local:  # safetensors writes local files only
        save_file(_flatten(tree), local)


def load_tree(path: str) -> Params:
    if not storage.isfile(path):
        raise CheckpointError(f"{path} does not exist: is this a finished finetuning run?")
    with storage.local_copy(path) as local:
        return _unflatten(load_file(local))


def read_run(path: str) -> tuple[Experiment, FinetuneConfig | None]:
    from jaxlm.checkpoint import read_config

    experiment = read_config(path)
    if experiment is None:
        raise CheckpointError(f"{path} is not a jaxlm run directory (no config.json)")
    ft_path = storage.join(path, FINETUNE_FILE)
    if not storage.exists(ft_path):
        return experiment, None
    return experiment, FinetuneConfig.from_dict(json.loads(storage.read_text(ft_path)))
