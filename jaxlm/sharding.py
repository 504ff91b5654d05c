"""Device meshes, logical-axis rules, shardings of state and batches, and multi-process start-up.

The model names every parameter axis (`embed`, `heads`, `mlp`, ...); `LOGICAL_RULES` says which mesh axis each
name is split over. Data parallelism splits the batch over `data` and `fsdp`; FSDP also splits the `embed` axis
of the weights (each device holds 1/fsdp of every matrix and the compiler gathers it when needed); tensor
parallelism splits heads, MLP width and vocabulary over `tensor`. The optimizer moments carry the same names as
their parameters, so they are split the same way.

The same experiment runs on one CPU, a GPU machine or a TPU pod slice: only `MeshConfig` changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import Experiment, MeshConfig
from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
EXIT_STATUS = 2  # what `jaxlm.cli.run` exits with on a JaxlmError; used where no exception can reach it

# Logical axis name -> mesh axes. The order matters for activations (flax gives each mesh axis to the first name
# that claims it): `batch` comes first, so an activation [batch, seq, embed] is split over the batch only, while a
# weight [embed, ...] (which has no batch axis) is split over `fsdp`.
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


# ------------------------------------------------------------------------------------------ multi-process start-up


def detected_cluster() -> str | None:
    """The cluster environment JAX can start a multi-process run from ("gcetpu", "slurm", "ompi", ...), if any."""
    # jax.distributed.initialize() without arguments asks these same classes; there is no public way to ask
    # whether it would succeed, and calling it on a plain machine fails.
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name or env.__name__
    return None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"MeshConfig.coordinator_address={address!r} must be host:port, e.g. 10.0.0.1:1234")
    return host.strip("[]"), int(port)


def _wait_for_listener(address: str, deadline: float) -> bool:
    """True once something accepts TCP connections at `address`; False if nothing does before `deadline`."""
    host, port = _split_address(address)
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextlib.contextmanager
def _exit_unless_done_within(seconds: float, message: str) -> Iterator[None]:
    """Print `message` and end the process with EXIT_STATUS if the block is still running after `seconds`.

    JAX's coordination client blocks in C++ while it waits for the other processes and aborts the process
    (SIGABRT, a long C++ trace) when its own timeout passes; no Python exception ever comes back. This timer
    fires first, so a run whose peers never arrive ends with one line and the usual exit status.
    """

    def fire():
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_STATUS)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def initialize_distributed(cfg: MeshConfig) -> None:
    """Join a multi-process run when one is configured or JAX recognises the cluster; otherwise do nothing.

    With `coordinator_address` set, every process calls this with the same address and process count and its own
    `process_id`. Without it, a TPU pod slice or a SLURM/Open MPI/Kubernetes job is detected by JAX. On a plain
    machine nothing happens. Processes that cannot all meet within `init_timeout_s` end with one line on stderr
    and exit status 2. Call it before anything else touches JAX devices.
    """
    if jax.distributed.is_initialized():
        return
    cluster = None if cfg.coordinator_address else detected_cluster()
    if not cfg.coordinator_address and cluster is None:
        return
    # CPU processes exchange data through gloo (over TCP); GPUs and TPUs use their own interconnect.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = cfg.init_timeout_s
    deadline = time.monotonic() + timeout
    if cfg.coordinator_address:
        _split_address(cfg.coordinator_address)  # a malformed address fails now, not after the timeout
        who = f"process {cfg.process_id} of {cfg.num_processes}"
        where = f"the coordinator at {cfg.coordinator_address}"
        if cfg.process_id != 0 and not _wait_for_listener(cfg.coordinator_address, deadline):
            raise ConfigError(
                f"{who}: nothing answered at {cfg.coordinator_address} within {timeout}s: start process 0 with the "
                "same --mesh.coordinator-address, and check that its host and port are reachable from here"
            )
        kwargs = dict(
            coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
        )
    else:
        who, where = f"{cluster} process", "the job's coordinator"
        kwargs = {}
    remaining = max(1.0, deadline - time.monotonic())
    message = (
        f"{who}: not every process joined {where} within {timeout}s: start all processes with the same "
        "--mesh flags (or raise --mesh.init-timeout-s)"
    )
    with _exit_unless_done_within(remaining, message):
        try:
            # JAX's own timeout is longer than ours, so that ours (one line, exit status 2) is the one that fires.
            jax.distributed.initialize(**kwargs, initialization_timeout=int(remaining) + 30)
        except Exception as e:  # a port in use, a call after JAX started, ...: one line is enough
            text = str(e).strip()
            first = text.splitlines()[0] if text else type(e).__name__
            raise ConfigError(f"{who}: could not join {where}: {first}") from None


def run_config(experiment: Experiment) -> Experiment:
    """The experiment as its run directory records it: the same in every process of a run and across restarts.

    A process's id differs between the processes of one run, and the coordinator's address and the start-up
    timeout may change when a preempted run restarts on other machines; none of them changes what is computed.
    """
    mesh = dataclasses.replace(
        experiment.mesh, coordinator_address="", process_id=-1, init_timeout_s=MeshConfig.init_timeout_s
    )
    return dataclasses.replace(experiment, mesh=mesh)


# ----------------------------------------------------------------------------------------------------- the mesh


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
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: the compiler propagates shardings from the parameters and batch (GSPMD-style). jax.make_mesh
    # orders devices by topology (ICI rings on TPUs); the last axis, `tensor`, varies fastest, so it stays
    # within a host and `data` spans hosts.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_fits(experiment: Experiment, mesh: Mesh) -> None:
    """Raise ConfigError unless the model and batch divide evenly over the mesh and its processes."""
    model, dp, tp, fsdp = experiment.model, data_parallel_size(mesh), mesh.shape["tensor"], mesh.shape["fsdp"]
    batch, accum = experiment.data.batch_size, experiment.train.grad_accum
    if batch % (dp * accum):
        raise ConfigError(
            f"DataConfig.batch_size={batch} must be divisible by the data-parallel size data x fsdp = {dp} times "
            f"TrainConfig.grad_accum={accum}: use a batch size that is a multiple of {dp * accum}"
        )
    if model.n_heads % tp:
        raise ConfigError(
            f"ModelConfig.n_heads={model.n_heads} must be divisible by the tensor-parallel size "
            f"MeshConfig.tensor={tp}: choose a tensor size that divides the number of heads"
        )
    if model.d_ff % tp:
        raise ConfigError(
            f"ModelConfig.d_ff={model.d_ff} must be divisible by the tensor-parallel size MeshConfig.tensor={tp}"
        )
    if model.d_model % fsdp:
        raise ConfigError(
            f"ModelConfig.d_model={model.d_model} must be divisible by MeshConfig.fsdp={fsdp}, which splits it"
        )
    # Each process feeds the rows of the batch its own devices hold (jaxlm.data gives process i the i-th slice).
    # That only works when no batch shard is held by devices of two processes, as when `tensor` spans hosts.
    owners: dict[int, set[int]] = {}
    for (d, f, _), device in np.ndenumerate(mesh.devices):
        owners.setdefault(d * fsdp + f, set()).add(device.process_index)
    shared = sorted(shard for shard, procs in owners.items() if len(procs) > 1)
    if shared:
        raise ConfigError(
            f"batch shard {shared[0]} of the mesh data={mesh.shape['data']} fsdp={fsdp} tensor={tp} lies on devices "
            f"of several processes: make data x fsdp a multiple of the {jax.process_count()} processes and keep "
            "tensor within one host"
        )


# ---------------------------------------------------------------------------------------------------- shardings


def partition_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one array from its logical axis names.

    A mesh axis is used at most once per array, and an array axis the mesh axes do not divide is replicated
    (GPT-2's 50257-token vocabulary, say, cannot be split in two).
    """
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
            return NamedSharding(mesh, partition_spec(leaf.names, leaf.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over (data, fsdp); replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows of the batch (process i holds the i-th slice) into global sharded arrays."""
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
        for k, v in local_batch.items()
    }


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Make the model's `nn.with_logical_constraint` calls take effect in what is traced inside this block.

    Outside it they do nothing, so the model runs unchanged on one device and in tools. Without such constraints
    the compiler tends to split activations like the FSDP-split weights they meet (along `embed`), so that every
    device computes on the whole batch; with them, activations stay split over the batch.

    Parameters must be boxed with `rules=()` (see `nn.with_logical_partitioning`) for this to be safe: flax would
    otherwise apply these rules to the flattened 2-D kernel that `nn.DenseGeneral` builds while it checks a
    parameter's shape inside the traced step, and fail (flax issue #3676). Their placement comes from
    `logical_shardings` anyway.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def traced_with_activation_sharding(fn: Callable, mesh: Mesh) -> Callable:
    """`fn`, entering `activation_sharding(mesh)` whenever it runs (so: while jax.jit traces it)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_sharding(mesh):
            return fn(*args, **kwargs)

    return traced
