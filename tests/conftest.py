"""Test-session setup that must happen before JAX is imported anywhere.

Eight host (CPU) devices let the sharding tests build real meshes on one machine. Flags already in XLA_FLAGS are
kept; a device count given there wins.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
