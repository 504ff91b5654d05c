"""Sweeps on Ray: each member trains in a process of its own, started by a Ray task that holds the member's devices.

A member process is `python -m jaxlm.cli '<the member's experiment as JSON>'` (`member_command`), so a crash or an
out-of-memory ends that member only. Its devices come from Ray's resources: CPUs (the process then sees that many
host devices, `member_env`), GPUs (Ray sets CUDA_VISIBLE_DEVICES), or a TPU host's chips (Ray sets the TPU
visibility variables). A member on a TPU slice runs as one task per host of the slice, all starting the same member
with `jax.distributed` settings whose coordinator is the slice's first host (`host_launches`).

`run_members` is the driver: it submits the members (as many at once as the cluster holds, at most `parallel`),
retries a failed member at once until it has failed 1 + retries times (a killed member resumes from its last
checkpoint), records every ending in the sweep's status file, and prints a table of every member's state, step and
loss as they go. Ray is imported only here, and only when a sweep asks for it (`pip install -e '.[ray]'`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError
from jaxlm.logging import format_grid
from jaxlm.scaling import status as sweep_status

DEVICES = ("auto", "cpu", "gpu", "tpu")
LOG_FILE = "member.log"
TAIL_LINES = 40
COORDINATOR_PORT = 8476


def import_ray():
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--sweep.ray needs Ray, which is not installed: pip install -e '.[ray]' (or pip install ray)"
        ) from None
    return ray


@dataclass(frozen=True)
class Placement:
    """Where each member runs: `devices` of kind `device` per member process, at most `parallel` members at once
    (0: as many as the cluster's resources allow); with `tpu_slice` (e.g. "v4-16") each member takes a whole slice
    of that type, one process per host."""

    device: str = "cpu"
    devices: int = 1
    parallel: int = 0
    tpu_slice: str = ""

    def __post_init__(self):
        if self.device not in DEVICES[1:]:
            raise ConfigError(f"--sweep.device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.devices < 1 or self.parallel < 0:
            raise ConfigError(
                f"--sweep.devices-per-member {self.devices}, --sweep.parallel {self.parallel}: use at least 1 device "
                "per member, and 0 (no limit) or more members at once"
            )
        if self.tpu_slice and self.device != "tpu":
            raise ConfigError(f"--sweep.tpu-slice {self.tpu_slice} runs members on TPUs: drop --sweep.device "
                              f"{self.device} or set it to tpu")

    def capacity(self, resources: dict[str, float]) -> int:
        """How many members the cluster's `resources` (as `ray.cluster_resources()` gives them) hold at once."""
        if self.tpu_slice:
            fits = resources.get(f"TPU-{self.tpu_slice}-head", 0)
        else:
            fits = resources.get({"cpu": "CPU", "gpu": "GPU", "tpu": "TPU"}[self.device], 0) // self.devices
        return max(1, int(fits))

    def task_options(self) -> dict[str, Any]:
        """The Ray resources of one member process."""
        if self.device == "cpu":
            return {"num_cpus": self.devices}
        if self.device == "gpu":
            return {"num_cpus": 1, "num_gpus": self.devices}
        return {"num_cpus": 1, "resources": {"TPU": self.devices}}


def member_command(member: Experiment, python: str = sys.executable) -> list[str]:
    """The command line that trains `member` in a process of its own."""
    return [python, "-m", "jaxlm.cli", json.dumps(member.to_dict(), sort_keys=True)]


def member_env(device: str, devices: int, inherited: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables a member process gets on top of its task's: on CPUs, `devices` host devices
    (any device count already in XLA_FLAGS replaced); on GPUs and TPUs, only the platform (Ray has already set
    which devices the task may see)."""
    if device == "cpu":
        flags = (inherited if inherited is not None else os.environ).get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
    return {"JAX_PLATFORMS": "cuda" if device == "gpu" else "tpu"}


def host_launches(
    member: Experiment, coordinator_host: str, num_hosts: int, port: int = COORDINATOR_PORT,
    python: str = sys.executable,
) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each host's process of a member on a TPU slice of `num_hosts` hosts:
    the same member, with `jax.distributed` settings naming the slice's first host as the coordinator and each
    host's process id (host k is process k)."""
    if num_hosts < 1:
        raise ConfigError(f"a TPU slice of {num_hosts} hosts: expected at least one")
    address = f"{coordinator_host}:{port}"
    launches = []
    for process_id in range(num_hosts):
        command = [*member_command(member, python)]
        if num_hosts > 1:
            command += ["--mesh.coordinator-address", address, "--mesh.num-processes", str(num_hosts),
                        "--mesh.process-id", str(process_id)]
        launches.append((command, member_env("tpu", 0)))
    return launches


def failure_message(returncode: int, output_tail: str) -> str:
    """The first line of what ended a member process: its one-line error, its exception, or the signal."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"its process was killed by {name}"
    lines = [line.strip() for line in output_tail.splitlines() if line.strip()]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][:300]
    return (lines[-1][:300] if lines else "") + f" (exit status {returncode})"


def _die_with_parent() -> None:
    """In a member process: be killed when the task that started it dies (Linux), so that a cancelled task or a
    lost worker leaves no training process behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_process(command: list[str], env: dict[str, str], cwd: str, log_path: str) -> dict[str, Any]:
    """Run one member process to its end, its output into `log_path` (a local file, or a URI written at the end);
    returns its exit status, the tail of its output, when it started and ended, and the host it ran on."""
    local_log = log_path
    if storage.is_uri(log_path):
        local_log = os.path.join(tempfile.mkdtemp(prefix="jaxlm-member-"), LOG_FILE)
    os.makedirs(os.path.dirname(local_log) or ".", exist_ok=True)
    started = time.time()
    with open(local_log, "ab") as log:
        with warnings.catch_warnings():  # JAX warns of any fork in a process that imported it; this child execs
            warnings.simplefilter("ignore", RuntimeWarning)
            process = subprocess.Popen(
                command, env={**os.environ, **env}, cwd=cwd if os.path.isdir(cwd) else None, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        try:
            returncode = process.wait()
        finally:
            if process.poll() is None:  # the task was cancelled: end the member, giving it time to save
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    with open(local_log, "rb") as log:
        tail = b"".join(log.readlines()[-TAIL_LINES:]).decode("utf-8", errors="replace")
    if local_log != log_path:
        with open(local_log, "rb") as log:
            storage.write_bytes(log_path, log.read())
    return {"returncode": returncode, "tail": tail, "started": started, "ended": time.time(),
            "host": socket.gethostname(), "pid": process.pid}


def run_on_slice(member_json: str, chips_per_host: int, cwd: str, log_dir: str) -> dict[str, Any]:
    """On the first host of a TPU slice (the task holds the slice's head resource): start the member's process on
    every host of the slice, process 0 here, and wait for all; the result is the first failing host's, else
    host 0's."""
    import ray
    from ray.util import tpu
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    member = Experiment.from_dict(json.loads(member_json))
    pod, hosts = tpu.get_current_pod_name(), tpu.get_current_pod_worker_count()
    if not pod or not hosts:
        raise ConfigError("this task holds a TPU slice's head resource but Ray reports no TPU pod on its host")
    here = ray.util.get_node_ip_address()
    host_task = ray.remote(run_process)
    refs = []
    for k, (command, env) in enumerate(host_launches(member, here, hosts)):
        options: dict[str, Any] = {"num_cpus": 1, "resources": {pod: 1, "TPU": chips_per_host}}
        if k == 0:  # the coordinator runs in process 0, on this host
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        log = storage.join(log_dir, LOG_FILE if k == 0 else f"member-host{k}.log")
        refs.append(host_task.options(**options).remote(command, env, cwd, log))
    results = ray.get(refs)
    return next((r for r in results if r["returncode"] != 0), results[0])


def _table(members: Sequence[Experiment], status: dict[str, dict[str, Any]], running: set[str]) -> str:
    shown = {**status, **{name: {**status.get(name, {}), "state": "running"} for name in running}}
    return format_grid(sweep_status.STATUS_HEADER, sweep_status.status_rows(members, shown))


def run_members(
    members: Sequence[Experiment], everyone: Sequence[Experiment], status: dict[str, dict[str, Any]],
    directory: str, placement: Placement, retries: int, table_every_s: float = 30.0,
) -> list[str]:
    """Train `members` on the Ray cluster this process is connected to; returns the names of those that failed
    1 + `retries` times. `status` is the sweep's record, updated and written to `directory` as members end."""
    ray = import_ray()
    cwd = os.getcwd()
    if placement.tpu_slice:
        task = ray.remote(run_on_slice).options(num_cpus=0, resources={f"TPU-{placement.tpu_slice}-head": 1})
    else:
        task = ray.remote(run_process).options(**placement.task_options())

    def submit(member: Experiment):
        if placement.tpu_slice:
            return task.remote(json.dumps(member.to_dict()), placement.devices, cwd, member.run_dir)
        log = storage.join(member.run_dir, LOG_FILE)
        return task.remote(member_command(member), member_env(placement.device, placement.devices), cwd, log)

    waiting = list(members)
    running: dict[Any, Experiment] = {}
    failed: list[str] = []
    last_table = 0.0
    try:
        while waiting or running:
            # Submit no more than the cluster holds, so that every submitted member is running (an autoscaling
            # cluster's resources grow as it adds nodes).
            limit = min(placement.parallel or len(members), placement.capacity(ray.cluster_resources()))
            while waiting and len(running) < limit:
                member = waiting.pop(0)
                running[submit(member)] = member
            done, _ = ray.wait(list(running), num_returns=1, timeout=table_every_s)
            for ref in done:
                member = running.pop(ref)
                entry = status.get(member.name, {})
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # the task itself failed: its worker or node was lost
                    text = str(e).strip().splitlines()
                    result = {"returncode": 1, "tail": text[-1] if text else type(e).__name__}
                times = {k: result[k] for k in ("started", "ended", "host") if k in result}
                if result["returncode"] == 0:
                    status[member.name] = sweep_status.finished_entry(entry, **times)
                    print(f"{member.name} finished on {result.get('host', '?')}")
                else:
                    error = failure_message(result["returncode"], result["tail"])
                    status[member.name] = sweep_status.failed_entry(entry, error, **times)
                    if status[member.name]["failures"] <= retries:
                        print(f"{member.name} failed: {error}; retrying it", file=sys.stderr)
                        waiting.insert(0, member)
                    else:
                        print(f"{member.name} failed: {error}; giving up after {status[member.name]['failures']} "
                              f"failures (its log: {storage.join(member.run_dir, LOG_FILE)})", file=sys.stderr)
                        failed.append(member.name)
                sweep_status.write_status(directory, status)
            if done or time.monotonic() - last_table >= table_every_s:
                print(_table(everyone, status, {m.name for m in running.values()}), flush=True)
                last_table = time.monotonic()
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise
    return failed
