"""Low-rank adapters (LoRA, Hu et al. 2021) on the Transformer's attention and MLP matrices, with no model edit.

A targeted projection y = x W (+ b) becomes y = x W (+ b) + (alpha / r) dropout(x) A B, with A [d_in, r] drawn
at random and B [r, d_out] zero, so that a fresh adapter leaves the model unchanged. Multi-axis kernels (the
query's [D, H, E], the output projection's [H, E, D]) are adapted as the [d_in, d_out] matrices they flatten to.

The adapters live in their own pytree, shaped like the params but holding only `lora_a` and `lora_b` under each
adapted module (with the leading `layers` axis when the blocks are scanned). `attach` puts them beside the
kernels in the params tree, so `nn.scan` hands each layer its slice, and `interceptor` adds the low-rank term to
the targeted modules' outputs while the forward pass runs. `merge` folds them into the kernels for export and
sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError

# Module name -> how many leading kernel axes are contracted with the input (the rest are output axes).
TARGET_INPUT_AXES = {"query": 1, "key": 1, "value": 1, "out": 2, "fc": 1, "gate": 1, "up": 1, "proj": 1}
TARGETS = tuple(TARGET_INPUT_AXES)
_STACKED = "blocks"  # scanned layers: every leaf under this key has a leading layers axis

Params = dict[str, Any]


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scale (alpha / rank), input dropout, and which projections are adapted."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"LoRA needs at least one target projection: choose from {', '.join(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGET_INPUT_AXES]
        if unknown:
            raise ConfigError(f"unknown LoRA target {unknown[0]!r}: choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _adapted(params: Params, targets: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, bool]]:
    """(path to the module, its kernel, whether it is stacked over layers) for every targeted module."""

    def walk(node: Params, path: tuple[str, ...]):
        for key, child in node.items():
            if not isinstance(child, dict):
                continue
            if key in targets and "kernel" in child:
                yield path + (key,), child["kernel"], path[:1] == (_STACKED,)
            else:
                yield from walk(child, path + (key,))

    yield from walk(params, ())


def _matrix_dims(name: str, kernel_shape: tuple[int, ...], stacked: bool) -> tuple[int, int]:
    shape = kernel_shape[1:] if stacked else kernel_shape
    n_in = TARGET_INPUT_AXES[name]
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_lora(cfg: ModelConfig, params: Params, spec: LoraSpec, rng: jax.Array) -> Params:
    """Fresh adapters for `params`: A ~ N(0, 1/d_in), B = 0 (so the adapted model starts as the base model)."""
    modules = list(_adapted(params, spec.targets))
    found = {path[-1] for path, _, _ in modules}
    missing = [t for t in spec.targets if t not in found]
    if missing:
        present = sorted({k for k in TARGETS if any(p[-1] == k for p, _, _ in _adapted(params, TARGETS))})
        raise ConfigError(
            f"LoRA target {missing[0]!r} has no matrix in this model (its MLP is {cfg.mlp}): choose from "
            f"{', '.join(present)}"
        )
    lora: Params = {}
    for i, (path, kernel, stacked) in enumerate(modules):
        d_in, d_out = _matrix_dims(path[-1], kernel.shape, stacked)
        lead = kernel.shape[:1] if stacked else ()
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead, d_in, spec.rank), jnp.float32) / math.sqrt(d_in)
        _set(lora, path, {"lora_a": a, "lora_b": jnp.zeros((*lead, spec.rank, d_out), jnp.float32)})
    return lora


def count_params(lora: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))


def attach(params: Params, lora: Params) -> Params:
    """The params tree with each adapter's `lora_a` and `lora_b` beside its module's kernel (for `interceptor`)."""

    def join(base: Params, extra: Params) -> Params:
        out = dict(base)
        for key, value in extra.items():
            out[key] = join(base[key], value) if isinstance(value, dict) else value
        return out

    return join(params, lora)


def interceptor(spec: LoraSpec, deterministic: bool = True):
    """A flax method interceptor that adds the low-rank term to every Dense/DenseGeneral holding an adapter.

    Use it around a forward pass on `attach`ed params: `with nn.intercept_methods(interceptor(spec)): ...`.
    """

    def intercept(next_fn, args, kwargs, context):
        module = context.module
        out = next_fn(*args, **kwargs)
        if (
            context.method_name != "__call__"
            or not isinstance(module, (nn.Dense, nn.DenseGeneral))
            or not module.has_variable("params", "lora_a")
        ):
            return out
        a = module.get_variable("params", "lora_a")
        b = module.get_variable("params", "lora_b")
        x = args[0]
        axis = getattr(module, "axis", -1)
        n_in = len(axis) if isinstance(axis, (tuple, list)) else 1
        x_flat = x.reshape(*x.shape[: x.ndim - n_in], a.shape[0])
        if spec.dropout > 0 and not deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x_flat.shape)
            x_flat = jnp.where(keep, x_flat / (1.0 - spec.dropout), 0.0).astype(x_flat.dtype)
        dtype = module.dtype or x.dtype
        delta = (x_flat.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
        return out + (spec.scale * delta).reshape(out.shape).astype(out.dtype)

    return intercept


def merge(params: Params, lora: Params, spec: LoraSpec) -> Params:
    """Base params with every adapter folded in: W + (alpha / r) A B, reshaped to the kernel's axes."""
    merged = jax.tree.map(lambda x: x, params)
    for path, kernel, _ in _adapted(params, spec.targets):
        node = lora
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            continue
        delta = jnp.einsum("...ir,...ro->...io", node["lora_a"], node["lora_b"])
        module = merged
        for key in path:
            module = module[key]
        module["kernel"] = kernel + spec.scale * delta.reshape(kernel.shape).astype(kernel.dtype)
    return merged

