"""Test-session setup that must happen before JAX is imported anywhere.

Eight host (CPU) devices let the sharding tests build real meshes on one machine, and XLA's backend optimisations
and fusion emitters are off (tests/processes.py says why). Flags already in XLA_FLAGS are kept; a device count or
one of those two flags given there wins.

One JAX compilation cache serves the whole session: the pytest-xdist workers (which inherit this process's
environment) and the processes that tests start compile many of the same small programs. It is a fresh directory
per session, removed at the end, so no run's timing leans on an earlier one; JAX_COMPILATION_CACHE_DIR set
beforehand is used as it is.
"""

import atexit
import os
import shutil
import tempfile

from tests.processes import TEST_XLA_FLAGS

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count=8"
for _flag in TEST_XLA_FLAGS.split():
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}"
os.environ["XLA_FLAGS"] = _flags.strip()

# libtpu (for compiling to TPU topologies) takes a machine-wide lock when it loads; the test processes each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxlm-tests-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# A local GCS API server for gs:// tests (fixtures `gcs_server`, `gcs`); importing it also keeps gcsfs from probing
# the emulator over gRPC (see tests/gcs.py).
from tests.gcs import gcs, gcs_server  # noqa: F401


# pytest-xdist hands whole files to its two workers in collection order (`--dist loadfile --no-loadscope-reorder`
# in pyproject.toml). The files that take longest (most of them start jaxlm processes) go first, the longest first,
# so that the many short files fill in at the end and both workers finish together. The order only schedules:
# a file missing from the list runs after these, in the usual order.
LONGEST_FIRST = (
    "test_fault_tolerance.py", "test_finetune.py", "test_finetune_loop.py", "test_preemption.py", "test_bucket_runs.py",
    "test_robustness.py", "test_ray_sweeps.py", "test_hf.py", "test_model.py", "test_shards.py", "test_dpo.py",
    "test_train.py", "test_bench.py", "test_sweep_failures.py", "test_sharding.py", "test_data.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
