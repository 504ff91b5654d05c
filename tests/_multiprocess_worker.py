"""One process of the multi-process tests, started by tests/test_multiprocess.py as a subprocess.

    python tests/_multiprocess_worker.py train '{"mesh": [1, 2, 2], "coordinator": "127.0.0.1:1234", ...}'
    python tests/_multiprocess_worker.py cli '{"coordinator": "127.0.0.1:1234", "process_id": 1, ...}'

`train` runs a few steps of a tiny model on synthetic token batches through jaxlm's own train step, with each
process feeding only its rows of every batch, and prints one JSON line of results (the mesh's devices, all and
this process's). The test calls `train_steps` itself for its one-process reference. `cli` hands an experiment to
`jaxlm.cli.run` (which exits with its status). The parent sets JAX_PLATFORMS and XLA_FLAGS before JAX starts.
"""

from __future__ import annotations

import json
import sys


def train_steps(args: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm import sharding, train
    from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig

    data, fsdp, tensor = args["mesh"]
    mesh_cfg = MeshConfig(
        data=data, fsdp=fsdp, tensor=tensor, coordinator_address=args.get("coordinator", ""),
        num_processes=args.get("num_processes", 0), process_id=args.get("process_id", -1),
        init_timeout_s=args.get("init_timeout_s", 60),
    )
    batch_size, seq_len, vocab = 8, 16, 64
    experiment = Experiment(
        model=ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=vocab, max_seq_len=seq_len),
        data=DataConfig(seq_len=seq_len, batch_size=batch_size, vocab_size=vocab),
        optim=OptimConfig(lr=3e-3, eps=1e-6, warmup_steps=0, schedule="constant"),
        train=TrainConfig(steps=args["steps"]),
        mesh=mesh_cfg,
    )
    sharding.initialize_distributed(mesh_cfg)
    # `devices`: the first n devices only (a reference run inside the test session, which has 8).
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: args["devices"]] if "devices" in args else None)
    sharding.check_fits(experiment, mesh)
    state = train.init_train_state(experiment, mesh)
    state_sharding = train.state_shardings(experiment, mesh)
    step = jax.jit(
        train.make_train_step(experiment, mesh), in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, None),
    )
    rng = np.random.default_rng(1234)
    process, processes = jax.process_index(), jax.process_count()
    rows = batch_size // processes
    losses = []
    for _ in range(args["steps"]):
        tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)  # every process draws it all
        mine = tokens[process * rows : (process + 1) * rows]
        batch = sharding.global_batch({"inputs": mine[:, :-1], "targets": mine[:, 1:]}, mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    # Reductions over the global (sharded) params: every process takes part and gets the same numbers.
    abs_sums = jax.jit(lambda params: [jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params)])(state["params"])
    param_abs_sums = [float(s) for s in abs_sums]
    return {
        "process": process, "processes": processes, "devices": mesh.devices.size,
        "local_devices": sum(d.process_index == process for d in mesh.devices.flat), "losses": losses,
        "param_abs_sums": param_abs_sums,
    }


def run_cli(args: dict) -> None:
    from jaxlm.cli import run
    from jaxlm.config import Experiment, MeshConfig, TrainConfig

    mesh = MeshConfig(
        coordinator_address=args["coordinator"], num_processes=args["num_processes"],
        process_id=args["process_id"], init_timeout_s=args["init_timeout_s"],
    )
    run(Experiment(name="unreachable", train=TrainConfig(out_dir=args["out_dir"]), mesh=mesh), argv=[])


if __name__ == "__main__":
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    if mode == "train":
        print(json.dumps(train_steps(args)), flush=True)
    else:
        run_cli(args)
