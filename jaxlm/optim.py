"""The optimizer: optax AdamW with a learning-rate schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import OptimConfig


def make_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Learning rate by step: linear warmup from 0 to `lr`, then the configured shape over the remaining steps.

    cosine:   cosine decay from lr to min_lr, reaching min_lr at `steps`.
    wsd:      warmup, stable at lr, then linear decay to min_lr over the final `decay_fraction` of the steps.
    constant: lr after warmup.
    """
    warmup = min(cfg.warmup_steps, steps)
    warmup_fn = optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
    rest = max(steps - warmup, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr / cfg.lr)
    elif cfg.schedule == "wsd":
        decay = max(int(round(cfg.decay_fraction * steps)), 1)
        stable = max(rest - decay, 0)
        main = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, cfg.min_lr, decay)], [stable]
        )
    else:
        main = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return main
    return optax.join_schedules([warmup_fn, main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for weight matrices and embeddings; False for biases and norm scales (which decay would only harm)."""

    def is_matrix(path, _) -> bool:
        return getattr(path[-1], "key", None) in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """Clip by global norm (if grad_clip > 0), then AdamW with decoupled weight decay on matrices only."""
    adamw = optax.adamw(
        make_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
