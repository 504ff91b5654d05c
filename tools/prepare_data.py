"""Prepare an experiment's data once: train its tokenizer and tokenize every source file into token shards.

    python -m tools.prepare_data --experiment chinchilla_c4 --data.source 'shards:gs://b/c4/en/c4-train.*.json.gz'
    python -m tools.prepare_data --experiment fineweb_edu --process-index 3 --process-count 8   # on each of 8 hosts

Every process of a multi-host preparation runs the same command with its own --process-index (default: the
experiment's --mesh.process-id and --mesh.num-processes, or the TPU pod / cluster JAX detects, else one process);
process i tokenizes source files i, i + n, ... over --data.prepare-workers processes of its own. Process 0 trains
the tokenizer first and writes the manifest last. Stopped, it resumes with the files already done. A training run
of the same data config finds the prepared data and starts at once. Other sources (pystdlib, text:, tfds:) are
prepared as a training run would. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxlm import cli
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError


def _experiment(name: str, overrides: list[str]) -> Experiment:
    return cli.load_experiments(name, overrides, prog=f"python -m tools.prepare_data --experiment {name}")[0]


def _processes(args: argparse.Namespace, experiment: Experiment) -> tuple[int, int]:
    if args.process_count is not None:
        index, count = args.process_index or 0, args.process_count
    elif experiment.mesh.coordinator_address:
        index, count = experiment.mesh.process_id, experiment.mesh.num_processes
    else:
        from jaxlm import sharding

        if sharding.detected_cluster() is None:
            return 0, 1
        import jax

        sharding.initialize_distributed(experiment.mesh)
        index, count = jax.process_index(), jax.process_count()
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--process-index {index} is not in [0, --process-count {count})")
    return index, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.prepare_data", description=__doc__.split("\n\n")[0],
        epilog="Other arguments are the experiment's overrides (--data.source ..., --data.data-dir ...).",
    )
    parser.add_argument("--experiment", required=True, help="a file in experiments/ (e.g. chinchilla_c4)")
    parser.add_argument("--process-index", type=int, default=None)
    parser.add_argument("--process-count", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)

    def prepare() -> None:
        from jaxlm.data import prepare_data

        experiment = _experiment(args.experiment, overrides)
        index, count = _processes(args, experiment)
        start = time.perf_counter()
        prepared = prepare_data(experiment.data, process_index=index, process_count=count)
        print(f"prepared {prepared.tokens_dir} (fingerprint {prepared.fingerprint}) in "
              f"{time.perf_counter() - start:.1f} s")

    cli.guarded(prepare)


if __name__ == "__main__":
    main(sys.argv[1:])
