"""A finetuning run's directory: its configs (written, checked, read back), saved parameter trees and the
summary."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError
from jaxlm.finetune.config import FINETUNE_FILE, FinetuneConfig, Params


# ---------------------------------------------------------------------------------------------- run directory


def _begin(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any] | None:
    """Write (or check) the run's configs; returns the summary of an already finished identical run."""
    from jaxlm.checkpoint import write_or_check_config

    run_dir = experiment.run_dir
    write_or_check_config(experiment)
    path = os.path.join(run_dir, FINETUNE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(ft.to_dict())):
            changed = [k for k in ft.to_dict() if old.get(k) != json.loads(json.dumps(ft.to_dict()[k]))]
            raise CheckpointError(
                f"{run_dir} holds a finetuning run of another config (finetune.{', finetune.'.join(changed[:3])}): "
                "use a new --train.out-dir, or delete the old run directory"
            )
    else:
        with open(path, "w") as f:
            json.dump(ft.to_dict(), f, indent=2)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            print(f"{run_dir} is finished; delete it or use a new --train.out-dir to run again")
            return json.load(f)
    return None


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
    tmp = path + ".tmp"
    save_file(_flatten(tree), tmp)
    os.replace(tmp, path)


def load_tree(path: str) -> Params:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: is this a finished finetuning run?")
    return _unflatten(load_file(path))


def _write_summary(run_dir: str, summary: dict[str, Any]) -> None:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _read_run(path: str) -> tuple[Experiment, FinetuneConfig | None]:
    from jaxlm.checkpoint import read_config

    experiment = read_config(path)
    if experiment is None:
        raise CheckpointError(f"{path} is not a jaxlm run directory (no config.json)")
    ft_path = os.path.join(path, FINETUNE_FILE)
    if not os.path.exists(ft_path):
        return experiment, None
    with open(ft_path) as f:
        return experiment, FinetuneConfig.from_dict(json.load(f))
