"""The optimizer: optax AdamW with a learning-rate schedule, global-norm clipping, a weight-decay mask and, under
muP, per-parameter learning-rate scales."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import ModelConfig, OptimConfig


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


def is_hidden_matrix(path) -> bool:
    """A matrix whose both sides grow with the width (attention and MLP kernels), as muP classes parameters;
    embeddings, the output matrix, biases and norm scales are not."""
    keys = [getattr(k, "key", None) for k in path]
    return keys[-1] == "kernel" and "lm_head" not in keys


def lr_scales(model: ModelConfig, params: Any) -> Any:
    """Each parameter's learning-rate multiplier: under muP base/width for hidden matrices (Tensor Programs V,
    Table 3, Adam), 1 for the rest; 1 everywhere under sp."""
    ratio = model.width_ratio
    return jax.tree_util.tree_map_with_path(lambda path, _: ratio if is_hidden_matrix(path) else 1.0, params)


def scale_by_lr_scales(model: ModelConfig) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its `lr_scales` entry (after AdamW: its decoupled decay too)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, lr_scales(model, updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, steps: int, model: ModelConfig | None = None) -> optax.GradientTransformation:
    """Clip by global norm (if grad_clip > 0), then AdamW with decoupled weight decay on matrices only; under muP
    (`model.parametrization`), each parameter's update scaled by its learning-rate multiplier."""
    adamw = optax.adamw(
        make_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(adamw)
    if model is not None and model.parametrization == "mup":
        parts.append(scale_by_lr_scales(model))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)
