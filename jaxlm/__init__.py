"""jaxlm: build, train, sample, finetune and measure language models in JAX (see README.md)."""

import importlib.metadata
import importlib.util
import os
import sys


def _quiet_libtpu_without_a_tpu() -> None:
    """libtpu (the `tpu` extra, which also compiles for TPU topologies ahead of time) starts with every JAX program
    and prints warnings about missing TPU metadata where there is no TPU. On such a machine with no GPU plugin
    either, JAX is kept to the CPU unless JAX_PLATFORMS says otherwise; compiling for a topology still works (it
    loads libtpu itself). Must run before JAX starts its backends."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
        return  # a GPU plugin: leave the choice of platforms to JAX
    try:
        from jax._src import hardware_utils  # the check JAX itself makes before it starts a TPU

        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return
    except (ImportError, AttributeError):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is first imported, here and in child processes
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_quiet_libtpu_without_a_tpu()
