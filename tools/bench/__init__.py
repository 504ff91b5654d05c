"""Benchmarks and their helpers: `python -m tools.bench train|decode|data|compile|checkpoint` (see `bench.py`),
the step profiler, the PyTorch reference and the GPU check. No user command imports this package."""
