"""The environment of the jaxlm processes that tests start: CPU only, a given number of host devices, the
checkout on the path, and the test session's XLA flags (conftest.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' programs are tiny: XLA's backend optimisations cost them more time compiling than they save running,
# and turned off they halve the compile time of most tests. The numerics are the same up to rounding, and
# processes compared with one another all compile this way.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def process_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """os.environ for a process of `devices` CPU devices, with `extra` variables set."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    flags = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, "XLA_FLAGS": flags, **extra}
