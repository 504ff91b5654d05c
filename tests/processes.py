"""The environment of the jaxlm processes that tests start: CPU only, a given number of host devices, the
checkout on the path, and the test session's XLA flags (conftest.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' programs are tiny: XLA's backend optimisations and its newer fusion emitters cost them more time
# compiling than they save running. With both off (the CPU backend then emits fusions with its classic elemental
# emitter) a test's program compiles in about a third of the time. The numerics are the same up to rounding, and
# processes compared with one another all compile this way.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def process_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """os.environ for a process of `devices` CPU devices, with `extra` variables set."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    flags = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, "XLA_FLAGS": flags, **extra}
