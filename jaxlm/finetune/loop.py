"""The training loop both finetuning tasks share: the masked AdamW step, the metrics file and `_fit`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import Experiment
from jaxlm.errors import NonFiniteError
from jaxlm.finetune.config import FinetuneConfig, Params
from jaxlm.model import compiler_options
from jaxlm.optim import make_optimizer, make_schedule


# ------------------------------------------------------------------------------------------------------- loop


def _make_step(experiment: Experiment, loss_fn: Callable, mask: Params | None):
    """(state, frozen, batch) -> (state, metrics): one AdamW update of the trainable params, masked if asked."""
    tx = make_optimizer(experiment.optim, experiment.train.steps)
    schedule = make_schedule(experiment.optim, experiment.train.steps)
    seed = experiment.train.seed

    def apply_mask(tree):
        return tree if mask is None else jax.tree.map(lambda x, m: x * m, tree, mask)

    def step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.key(seed + 1), state["step"])
        (loss_sum, count), grads = jax.value_and_grad(
            lambda t: loss_fn(t, frozen, batch, rng), has_aux=True
        )(state["params"])
        count = jnp.maximum(count, 1.0)
        grads = apply_mask(jax.tree.map(lambda g: g / count, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        # Masked parameters must not move at all, which weight decay alone would make them do.
        params = optax.apply_updates(state["params"], apply_mask(updates))
        metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return tx, step


class _Metrics:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        open(self.path, "w").close()

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _fit(
    experiment: Experiment,
    trainable: Params,
    frozen: Params,
    mask: Params | None,
    loss_fn: Callable,
    batches: Iterator[dict[str, np.ndarray]],
    evaluate: Callable[[Params], dict[str, float]],
    metrics: _Metrics,
) -> tuple[Params, Any]:
    """Train for TrainConfig.steps; evaluate every eval_every steps and at the end. Returns (params, opt_state)."""
    from tqdm import tqdm

    tx, step_fn = _make_step(experiment, loss_fn, mask)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
    step_fn = jax.jit(step_fn, donate_argnums=0, compiler_options=compiler_options())
    steps, tc = experiment.train.steps, experiment.train
    with tqdm(total=steps, desc=experiment.name, dynamic_ncols=True) as bar:
        for step in range(1, steps + 1):
            state, m = step_fn(state, frozen, next(batches))
            bar.update(1)
            if step % tc.log_every == 0 or step == steps:
                m = jax.device_get(m)
                if not math.isfinite(float(m["loss"])):
                    raise NonFiniteError(
                        f"non-finite loss {float(m['loss'])} at step {step}: lower --optim.lr or raise "
                        "--optim.warmup-steps"
                    )
                metrics.write({"step": step, **{k: float(v) for k, v in m.items()}})
                bar.set_postfix(loss=f"{float(m['loss']):.3f}")
            if step % tc.eval_every == 0 or step == steps:
                row = evaluate(state["params"])
                if row:
                    metrics.write({"step": step, **row})
                    bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return state["params"], state["opt_state"]


def _uses_dropout(experiment: Experiment, ft: FinetuneConfig) -> bool:
    return experiment.model.dropout > 0 or (ft.lora is not None and ft.lora.dropout > 0)
