"""Device meshes, logical-axis rules, shardings of state and batches, and multi-process start-up.

The model names every parameter axis (`embed`, `heads`, `mlp`, ...); `LOGICAL_RULES` says which mesh axis each
name is split over. Data parallelism splits the batch over `data` and `fsdp`; FSDP also splits the `embed` axis
of the weights (each device holds 1/fsdp of every matrix and the compiler gathers it when needed); tensor
parallelism splits heads, MLP width and vocabulary over `tensor`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import MeshConfig
from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("seq", None),
)


def initialize_distributed(cfg: MeshConfig) -> None:
    """Start multi-process JAX when asked to (or when JAX recognises a TPU pod or cluster); no-op otherwise."""
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address:
        try:
            jax.distributed.initialize(
                coordinator_address=cfg.coordinator_address,
                num_processes=cfg.num_processes,
                process_id=cfg.process_id,
                initialization_timeout=cfg.init_timeout_s,
            )
        except Exception as e:  # the coordinator's errors are long C++ messages; one line is enough
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"could not join the coordinator at {cfg.coordinator_address} as process {cfg.process_id} of "
                f"{cfg.num_processes} within {cfg.init_timeout_s}s ({first}): start every process with the same "
                "address and check that process 0 is running"
            ) from None


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the one -1 axis (if any) and check the product is the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} cannot fill {n_devices} devices: "
                f"the fixed sizes multiply to {known}, which does not divide {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices but "
            f"{n_devices} are present: make the sizes multiply to {n_devices} (or set one to -1)"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: the compiler propagates shardings from the parameters and batch (GSPMD-style).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _mesh_axes_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec for one array from its logical names; an axis the mesh does not divide is replicated."""
    rules = dict(LOGICAL_RULES)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = rules.get(name) if name else None
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes_tuple = tuple(a for a in axes_tuple if a not in used and mesh.shape[a] > 1)
        if axes_tuple and dim % math.prod(mesh.shape[a] for a in axes_tuple) == 0:
            used.update(axes_tuple)
            spec.append(axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
        else:
            spec.append(None)
    return P(*spec)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes (unboxed leaves replicate)."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _mesh_axes_for(leaf.names, leaf.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows of the batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
