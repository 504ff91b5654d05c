"""Training: the one loop, and the Task it drives.

A `Task` says what is learned: its parameters (trainable, and frozen ones the loss reads but never changes), its
batches, its loss (a pure function of trainable params, frozen params and a batch), which parameters move (an
update mask) and its evaluation. `Pretraining` (next-token prediction on a corpus) is one Task; finetuning
tasks (jaxlm.finetune) are others. The loop (`fit`) does the rest, the same for every task: the device mesh and
shardings, gradient accumulation, AdamW, checkpoints with exact resume (params, optimizer state, data
position), a save on SIGTERM, non-finite guards, metrics.jsonl, the progress bar and evaluation.

The loop dispatches step N+1 before it reads step N's metrics, so the host never waits for the device between
steps. It evaluates every `eval_every` steps, checkpoints every `ckpt_every` steps and on SIGTERM, stops on a
non-finite loss or gradient norm (or skips such updates, if asked), and at the end hands the trained params to
the task for its outputs (samples, plots, reports) and writes summary.json.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxlm import flops, sharding, storage
from jaxlm.checkpoint import Checkpoints, load_params, write_or_check_config
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError, ConfigError, NonFiniteError
from jaxlm.logging import MetricsWriter, ProfileWindow, check_wandb, plot_losses
from jaxlm.model import Transformer, bits_per_byte, compiler_options
from jaxlm.optim import make_optimizer, make_schedule
from jaxlm.runlock import RunLock

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved a checkpoint on SIGTERM; rerun the command to resume
SUMMARY_FILE = "summary.json"

Params = Any
Batch = dict[str, Any]


class Preempted(Exception):
    """Raised after the checkpoint written on SIGTERM; the CLI exits with PREEMPTED_EXIT_CODE."""


class BatchSource(Protocol):
    """An endless iterator of this process's rows of each batch, whose position can be saved and restored."""

    epoch: int

    def __next__(self) -> Batch: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None: ...


class Task(Protocol):
    """What the loop trains. `experiment` holds the model, data, optimizer, train and mesh settings."""

    experiment: Experiment
    tokens_per_step: int | None  # for tokens/s and MFU; None where examples are not counted in tokens
    flops_per_token: float | None

    def setup(self) -> None:
        """Everything before the first parameter exists: data, tokenizer, the task's own files. Every process."""

    def abstract_params(self) -> tuple[Params, Params]:
        """(trainable, frozen) as `jax.eval_shape` gives them; leaves may be boxed with logical axis names."""

    def init_trainable(self, rng: jax.Array, shardings: Params) -> Params:
        """The trainable params of a fresh run, placed with `shardings`."""

    def init_frozen(self, shardings: Params) -> Params:
        """The frozen params (also on resume: they are never checkpointed), placed with `shardings`."""

    def update_mask(self) -> Params | None:
        """1/0 per trainable parameter (broadcastable to it): which ones move; None: all of them."""

    def loss(self, params: Params, frozen: Params, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(sum of the losses, their count) over a batch; `rng` None means deterministic (no dropout)."""

    def train_batches(self) -> BatchSource: ...

    def eval_batches(self) -> Iterable[Batch]:
        """This process's rows of the evaluation batches (empty: the task has no evaluation)."""

    def eval_sums(self, params: Params, frozen: Params, batch: Batch) -> dict[str, jax.Array]:
        """Sums over one evaluation batch (pure); the loop adds them up over the batches and processes."""

    def eval_row(self, sums: dict[str, float]) -> dict[str, float]:
        """The evaluation figures (`val_loss`, ...) from the summed `eval_sums`."""

    def finish(self, params: Params, frozen: Params, summary: dict[str, Any]) -> dict[str, Any]:
        """Outputs of the finished run (process 0 only, params on its devices); returns summary fields to add."""


# ------------------------------------------------------------------------------------------------ the step


def make_step(task: Task, mesh: jax.sharding.Mesh | None = None):
    """(state, frozen, batch) -> (state, metrics): k microbatches accumulated, one masked optimizer update.

    With `mesh`, the model's activation sharding constraints take effect (see jaxlm.sharding).
    """
    experiment = task.experiment
    tx = make_optimizer(experiment.optim, experiment.train.steps, experiment.model)
    schedule = make_schedule(experiment.optim, experiment.train.steps)
    accum = experiment.train.grad_accum
    mask = task.update_mask()

    def masked(tree):
        return tree if mask is None else jax.tree.map(lambda x, m: x * m, tree, mask)

    def step(state, frozen, batch):
        step_rng = jax.random.fold_in(jax.random.key(experiment.train.seed + 1), state["step"])
        # Rows i, i + k, i + 2k, ... form microbatch i: each keeps the batch's sharding over devices.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def one(carry, inputs):
            grads_sum, loss_sum, count = carry
            index, microbatch = inputs
            rng = jax.random.fold_in(step_rng, index)
            (loss, n), grads = jax.value_and_grad(
                lambda p: task.loss(p, frozen, microbatch, rng), has_aux=True
            )(state["params"])
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, count), _ = jax.lax.scan(one, init, (jnp.arange(accum), micro))
        count = jnp.maximum(count, 1.0)
        grads = masked(jax.tree.map(lambda g: g / count, grads))
        loss = loss_sum / count
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        # Masked parameters must not move at all, which weight decay alone would make them do.
        params = optax.apply_updates(state["params"], masked(updates))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if experiment.train.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
        return new_state, metrics

    return step if mesh is None else sharding.traced_with_activation_sharding(step, mesh)


def _boxed_state(task: Task) -> tuple[Params, Params]:
    """The abstract train state and frozen params, boxed with logical axis names where the task gave them."""
    trainable, frozen = task.abstract_params()
    experiment = task.experiment
    tx = make_optimizer(experiment.optim, experiment.train.steps, experiment.model)
    opt_state = jax.eval_shape(tx.init, trainable)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    return {"step": step, "params": trainable, "opt_state": opt_state}, frozen


def task_shardings(task: Task, mesh: jax.sharding.Mesh, boxed: tuple[Params, Params] | None = None):
    """NamedShardings of the train state and of the frozen params (from `_boxed_state(task)`, given or computed)."""
    state, frozen = boxed or _boxed_state(task)
    return sharding.logical_shardings(state, mesh), sharding.logical_shardings(frozen, mesh)


def _abstract(boxed: Params, shardings: Params) -> Params:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )


def abstract_state(task: Task, mesh: jax.sharding.Mesh) -> tuple[Params, Params]:
    """The train state and frozen params as ShapeDtypeStructs carrying their shardings over `mesh`: what the
    steps compile against, with nothing allocated (no data, no parameters)."""
    boxed = _boxed_state(task)
    state_sharding, frozen_sharding = task_shardings(task, mesh, boxed)
    return _abstract(boxed[0], state_sharding), _abstract(boxed[1], frozen_sharding)


def jit_step(task: Task, mesh: jax.sharding.Mesh):
    """The step jitted over `mesh`: state donated, shardings pinned, the compiler options of the mesh's devices."""
    state_sharding, frozen_sharding = task_shardings(task, mesh)
    return jax.jit(
        make_step(task, mesh), in_shardings=(state_sharding, frozen_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, None), donate_argnums=0, compiler_options=compiler_options(mesh),
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _shard_bytes(abstract: Params) -> int:
    """The bytes of one device's shards of an abstract tree."""
    return sum(
        int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(abstract)
    )


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def device_memory(mesh: jax.sharding.Mesh) -> tuple[int | None, str]:
    """The memory free for a run on each of the mesh's devices, and what that memory is (None where unknown).

    Accelerators report their own; CPU devices share the host's available memory."""
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())  # this process's own
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"a {device.device_kind} has"
    available = _host_available_bytes()
    if device.platform != "cpu" or available is None:
        return None, ""
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return available // local, f"{local} CPU device(s) share this host's {_gib(available)} available, each"


def compile_within_memory(step, abstract_state: Params, abstract_frozen: Params, batch: Batch, mesh):
    """The jitted step compiled for the run's shapes, once the compiler's own memory analysis says that one
    device holds its state, its frozen params, the batch and the step's temporaries; else a ConfigError giving
    the sizes and what to change, before any of the state is allocated."""
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
    compiled = step.lower(abstract_state, abstract_frozen, abstract_batch).compile()
    stats = compiled.memory_analysis()
    available, where = device_memory(mesh)
    if stats is None or available is None:
        return compiled
    # Donated state: its output reuses (aliases) its input's buffers.
    needed = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
              + stats.temp_size_in_bytes)
    if needed <= available:
        return compiled
    params, opt_state = _shard_bytes(abstract_state["params"]), _shard_bytes(abstract_state["opt_state"])
    raise ConfigError(
        f"the run needs {_gib(needed)} per device (params {_gib(params)}, optimizer state {_gib(opt_state)}, the "
        f"step's temporaries {_gib(stats.temp_size_in_bytes)}) but {where} {_gib(available)}: shard the state over "
        "the devices (--mesh.fsdp -1 --mesh.data 1), recompute activations (--model.remat full), lower "
        "--data.batch-size or raise --train.grad-accum, or train a smaller model"
    )


def jit_eval(task: Task, mesh: jax.sharding.Mesh):
    """The task's `eval_sums` as (params, frozen, batch) -> sums, jitted over `mesh` (shardings from the arguments)."""
    return jax.jit(
        sharding.traced_with_activation_sharding(task.eval_sums, mesh), compiler_options=compiler_options(mesh)
    )


def place(tree: Params, shardings: Params) -> Params:
    """Host or single-device arrays put on the mesh, each with its sharding."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


# ------------------------------------------------------------------------------------------------ pretraining


class Pretraining:
    """Next-token prediction on the experiment's corpus: what `python -m experiments.<name>` trains."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.prepared = None
        self.tokens_per_step = experiment.data.batch_size * experiment.data.seq_len
        self.flops_per_token = flops.flops_per_token(experiment.model, experiment.data.seq_len)

    def setup(self) -> None:
        self.prepared = _prepare_once(self.experiment)
        if self.prepared.vocab_size > self.experiment.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.prepared.vocab_size} tokens but ModelConfig.vocab_size="
                f"{self.experiment.model.vocab_size}: set --model.vocab-size to at least {self.prepared.vocab_size}"
            )
        if self.experiment.train.samples:
            _sample_prompts(self.experiment, self.prepared.tokenizer)  # the samples must fit, before any step

    def _init_boxed(self, rng: jax.Array) -> Params:
        tokens = jnp.zeros((1, self.experiment.data.seq_len), jnp.int32)
        return Transformer(self.experiment.model).init(rng, tokens)["params"]

    def abstract_params(self) -> tuple[Params, Params]:
        return jax.eval_shape(self._init_boxed, jax.random.key(0)), {}

    def init_trainable(self, rng: jax.Array, shardings: Params) -> Params:
        if self.experiment.train.init_from:
            return _load_init_params(self.experiment, shardings)
        return jax.jit(lambda key: nn.unbox(self._init_boxed(key)), out_shardings=shardings)(rng)

    def init_frozen(self, shardings: Params) -> Params:
        return {}

    def update_mask(self) -> None:
        return None

    def loss(self, params, frozen, batch, rng):
        dropout = self.experiment.model.dropout > 0 and rng is not None
        return Transformer(self.experiment.model).apply(
            {"params": params}, batch["inputs"], positions_BT=batch.get("positions"),
            segment_ids_BT=batch.get("segment_ids"), deterministic=not dropout,
            rngs={"dropout": rng} if dropout else {}, loss_batch=batch,
        )

    def train_batches(self) -> BatchSource:
        from jaxlm.data import make_iterator

        return make_iterator(
            self.experiment.data, self.prepared, split="train", seed=self.experiment.train.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            shuffle_rows=self.experiment.data.shuffle_rows,
        )

    def eval_batches(self) -> Iterator[Batch]:
        from jaxlm.data import make_iterator

        it = make_iterator(
            self.experiment.data, self.prepared, split="validation", seed=0, shuffle_rows=True,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        try:
            for _ in range(self.experiment.train.eval_steps):
                yield next(it)
        finally:
            it.close()

    def eval_sums(self, params, frozen, batch):
        loss_sum, count = self.loss(params, frozen, batch, None)
        return {"loss": loss_sum, "count": count}

    def eval_row(self, sums):
        val_loss = sums["loss"] / sums["count"]
        return {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.prepared.stats["val_bytes_per_token"])}

    def finish(self, params, frozen, summary):
        if self.experiment.train.samples:
            write_samples(
                self.experiment, params, self.prepared, storage.join(self.experiment.run_dir, "samples.txt")
            )
        # What the run read: a corpus such as pysrc depends on the machine, so its identity goes with the figures.
        return {"params": flops.count_params(self.experiment.model), "data_fingerprint": self.prepared.fingerprint}


def _load_init_params(experiment: Experiment, shardings: Params) -> Params:
    """The params of another run (TrainConfig.init_from), every shape checked, placed with `shardings`."""
    _, params = load_params(experiment.train.init_from)
    expected = jax.tree_util.tree_flatten_with_path(shardings)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    abstract = jax.eval_shape(lambda: nn.unbox(Pretraining(experiment)._init_boxed(jax.random.key(0))))
    shapes = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    for path, _ in expected:
        other, want = got.get(path), shapes[path].shape
        if other is None or other.shape != want:
            found = "missing" if other is None else f"shape {other.shape}"
            raise CheckpointError(
                f"init_from {experiment.train.init_from}: parameter {jax.tree_util.keystr(path)} is {found}, this "
                f"model needs {want}: use a run of the same model shape"
            )
    return place(params, shardings)


def _prepare_once(experiment: Experiment):
    """Prepare corpus and tokenizer on process 0 first, so that processes sharing a cache never race to build it."""
    from jaxlm.data import prepare_data

    if jax.process_count() == 1:
        return prepare_data(experiment.data)
    if experiment.data.source.startswith("shards:"):  # every process tokenizes its share of the files
        return prepare_data(experiment.data, process_index=jax.process_index(), process_count=jax.process_count())
    from jax.experimental import multihost_utils

    prepared = prepare_data(experiment.data) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxlm: data prepared")
    return prepared or prepare_data(experiment.data)


SAMPLE_PROMPTS = ("def ", "import ", "class ")


def _sample_prompts(experiment: Experiment, tokenizer) -> tuple[list[str], list[list[int]], int]:
    """The samples' prompts, their ids, and how many new tokens the context leaves after the longest (at least 1)."""
    prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(experiment.train.samples)]
    prompt_ids = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in prompts]
    longest = max(len(ids) for ids in prompt_ids)
    budget = experiment.model.max_seq_len - longest
    if budget < 1:
        raise ConfigError(
            f"ModelConfig.max_seq_len={experiment.model.max_seq_len} leaves no room to sample after the "
            f"{longest}-token sample prompts: set --train.samples 0, or --model.max-seq-len to at least {longest + 1}"
        )
    return prompts, prompt_ids, budget


def write_samples(experiment: Experiment, params: Params, prepared, path: str) -> None:
    """Samples from fixed prompts, each after an end-of-document token (where documents start in training rows)."""
    from jaxlm.generate import generate

    tokenizer = prepared.tokenizer
    prompts, prompt_ids, budget = _sample_prompts(experiment, tokenizer)
    outputs = generate(
        experiment.model, params, prompt_ids, max_new_tokens=min(experiment.train.sample_tokens, budget),
        temperature=0.8, top_k=40, seed=experiment.train.seed, eos_id=tokenizer.eos_id,
    )
    with storage.open(path, "w") as f:
        for i, (prompt, ids, out) in enumerate(zip(prompts, prompt_ids, outputs)):
            # Decoding prompt and continuation together keeps sentencepiece's word-initial spaces.
            f.write(f"--- sample {i}, prompt {prompt!r}\n{tokenizer.decode(ids[1:] + list(out))}\n\n")


# The pretraining state, for tools and tests that drive the step themselves (benchmarks, AOT compiles).


def state_shardings(experiment: Experiment, mesh: jax.sharding.Mesh) -> Params:
    return task_shardings(Pretraining(experiment), mesh)[0]


def abstract_train_state(experiment: Experiment, mesh: jax.sharding.Mesh | None = None) -> Params:
    """The pretraining state's shapes, dtypes and shardings, computed without allocating it."""
    mesh = mesh or sharding.make_mesh(type(experiment.mesh)())
    return abstract_state(Pretraining(experiment), mesh)[0]


def abstract_batch(experiment: Experiment, mesh: jax.sharding.Mesh) -> Batch:
    """A global pretraining batch's shapes and dtypes with its sharding over `mesh` (see jaxlm.data's batches)."""
    keys = ("inputs", "targets", "segment_ids", "positions") if experiment.data.document_mask else ("inputs", "targets")
    shape = (experiment.data.batch_size, experiment.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh)) for k in keys}


def init_train_state(experiment: Experiment, mesh: jax.sharding.Mesh) -> Params:
    """A fresh pretraining state, materialised directly in its shards."""
    task = Pretraining(experiment)
    shardings = state_shardings(experiment, mesh)
    params = task.init_trainable(jax.random.key(experiment.train.seed), shardings["params"])
    opt_state = jax.jit(
        make_optimizer(experiment.optim, experiment.train.steps, experiment.model).init,
        out_shardings=shardings["opt_state"],
    )(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]), "params": params, "opt_state": opt_state}


def make_train_step(experiment: Experiment, mesh: jax.sharding.Mesh | None = None):
    """The pretraining step as (state, batch) -> (state, metrics)."""
    step = make_step(Pretraining(experiment), mesh)
    return lambda state, batch: step(state, {}, batch)


def jit_train_step(experiment: Experiment, mesh: jax.sharding.Mesh):
    """The pretraining step jitted over `mesh`, as (state, batch) -> (state, metrics): state donated, shardings
    pinned, the backend's compiler options (what `fit` runs, for tools that lower and time it themselves)."""
    state_sharding = state_shardings(experiment, mesh)
    return jax.jit(
        make_train_step(experiment, mesh), in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, None), donate_argnums=0, compiler_options=compiler_options(mesh),
    )


def token_losses(experiment: Experiment, params: Params, batch: Batch, rng: jax.Array | None):
    """Pretraining's loss: the summed next-token cross-entropy over the batch's counted targets, and their count."""
    return Pretraining(experiment).loss(params, {}, batch, rng)


# ------------------------------------------------------------------------------------------------------- the loop


class _Preemption:
    """Whether SIGTERM has come, asked between steps so that the step in flight finishes and is saved.

    One process: a handler sets a flag. Several: every process must save the same step, yet the signal may reach
    only some of them, or reach them at different steps. jax.distributed.initialize starts a preemption sync
    manager whose notifier catches SIGTERM and tells the coordination service, which names a step that every
    process has yet to reach; `reached_preemption_sync_point(step)` is true at that step in every process. No
    Python handler is installed then (it would replace the notifier's).
    """

    def __init__(self):
        self.raised = False
        self._previous = None
        self.collective = jax.process_count() > 1

    def reached(self, step: int) -> bool:
        if self.collective:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.raised

    def __enter__(self):
        if self.collective:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class TimedSaves:
    """`--train.ckpt-every-minutes`: whether that long has passed since the last save, by process 0's clock.

    With several processes, process 0's answer is broadcast at every step, so that all of them save the same step
    (a collective each step: only while the option is on). `clock` gives seconds; tests pass their own.
    """

    def __init__(self, minutes: float, clock=time.monotonic):
        self.interval_s = minutes * 60.0
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        if not self.interval_s:
            return False
        due = self.clock() - self.last >= self.interval_s
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def saved(self) -> None:
        self.last = self.clock()


def _evaluate(task: Task, eval_fn, params: Params, frozen: Params, mesh) -> dict[str, float] | None:
    totals: dict[str, float] = {}
    for batch in task.eval_batches():
        sums = jax.device_get(eval_fn(params, frozen, sharding.global_batch(batch, mesh)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return task.eval_row(totals) if totals else None


def _gathered(tree: Params) -> Params:
    """A tree of global arrays, whole on this process's first device (every process must call this)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.device_put(multihost_utils.process_allgather(tree, tiled=True), jax.local_devices()[0])


def train(experiment: Experiment) -> dict[str, Any]:
    """Pretrain (or resume) an experiment to its last step; returns the summary written to summary.json."""
    return fit(Pretraining(experiment))


def fit(task: Task, devices: list | None = None) -> dict[str, Any]:
    """Run (or resume) a task to its last step over `devices` (default: every device of every process); returns
    the summary written to summary.json."""
    check_wandb(task.experiment.train)
    sharding.initialize_distributed(task.experiment.mesh)
    mesh = sharding.make_mesh(task.experiment.mesh, devices)
    sharding.check_fits(task.experiment, mesh)  # a bad mesh is refused before any data work
    task.setup()  # may complete the experiment: a finetuning run's model is that of its Hugging Face start
    sharding.check_fits(task.experiment, mesh)
    # One writer per run directory: process 0 holds the lock from before anything is written there to the end.
    lock = RunLock(task.experiment.run_dir).acquire() if jax.process_index() == 0 else None
    try:
        return _fit(task, mesh)
    finally:
        if lock is not None:
            lock.release()


def _fit(task: Task, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    experiment = task.experiment
    run_dir = experiment.run_dir
    primary = jax.process_index() == 0
    write_or_check_config(sharding.run_config(experiment))

    checkpoints = Checkpoints(
        run_dir, experiment.train.keep_checkpoints, experiment.train.keep_best, experiment.train.async_checkpoints
    )
    latest = checkpoints.latest_step()
    summary_path = storage.join(run_dir, SUMMARY_FILE)
    if latest is not None and latest >= experiment.train.steps and storage.exists(summary_path):
        checkpoints.close()
        print(f"{run_dir} is finished (step {latest}); delete it or use a new --train.out-dir to run again")
        return json.loads(storage.read_text(summary_path))

    boxed = _boxed_state(task)
    state_sharding, frozen_sharding = task_shardings(task, mesh, boxed)
    train_iter = task.train_batches()
    train_step, first_batch = jit_step(task, mesh), None
    if latest is None:  # a resumed state fitted when it was saved
        try:
            first_batch = sharding.global_batch(next(train_iter), mesh)
            train_step = compile_within_memory(
                train_step, _abstract(boxed[0], state_sharding), _abstract(boxed[1], frozen_sharding), first_batch,
                mesh,
            )
        except BaseException:  # a run refused here leaves nothing open (a sweep goes on with its next member)
            train_iter.close()
            checkpoints.close(after_error=True)
            raise
    frozen = task.init_frozen(frozen_sharding)
    if latest is not None:
        state, data_state = checkpoints.restore(latest, _abstract(boxed[0], state_sharding))
        if data_state is not None:
            train_iter.set_state(data_state)
        print(f"resuming {run_dir} from step {latest}")
    else:
        params = task.init_trainable(jax.random.key(experiment.train.seed), state_sharding["params"])
        opt_state = jax.jit(
            make_optimizer(experiment.optim, experiment.train.steps, experiment.model).init,
            out_shardings=state_sharding["opt_state"],
        )(params)
        step0 = jax.device_put(jnp.zeros((), jnp.int32), state_sharding["step"])
        state = {"step": step0, "params": params, "opt_state": opt_state}
    start_step = int(state["step"])

    eval_fn = jit_eval(task, mesh)
    tokens_per_step = task.tokens_per_step
    peak, peak_source = flops.peak_flops()
    log = MetricsWriter(run_dir, start_step, experiment)
    profile = ProfileWindow(run_dir, experiment.train.profiled_steps())

    def eval_row(step: int) -> dict[str, Any] | None:
        row = _evaluate(task, eval_fn, state["params"], frozen, mesh)
        if row is not None:
            tokens = {"tokens": step * tokens_per_step} if tokens_per_step is not None else {}
            row = {"step": step, **tokens, **row}
            log.write(row)
        return row

    last_eval = None
    steps = experiment.train.steps
    skipped_in_row, skipped_total = 0, 0
    window_start, window_steps = None, 0
    started = time.perf_counter()
    train_time, trained_steps = 0.0, 0
    last_row: dict[str, Any] = {}
    pending: tuple[int, dict] | None = None

    def throughput(steps_done: int, seconds: float) -> dict[str, float | None]:
        if tokens_per_step is None or seconds <= 0:
            return {"tokens_per_sec": None, "mfu": None}
        tps = steps_done * tokens_per_step / seconds
        return {"tokens_per_sec": tps, "mfu": tps * task.flops_per_token / peak if task.flops_per_token else None}

    def read(step: int, metrics: dict) -> None:
        """Handle the metrics of a finished step (one step late)."""
        nonlocal skipped_in_row, skipped_total, window_start, window_steps, last_row, train_time, trained_steps
        m = jax.device_get(metrics)
        now = time.perf_counter()
        if not m["finite"]:
            if not experiment.train.skip_nonfinite or skipped_in_row + 1 >= experiment.train.max_nonfinite:
                good = checkpoints.latest_step()
                where = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was saved"
                raise NonFiniteError(
                    f"non-finite loss {m['loss']} or gradient norm {m['grad_norm']} at step {step} ({where}); "
                    "lower --optim.lr, raise --optim.warmup-steps, or set --train.skip-nonfinite"
                )
            skipped_in_row, skipped_total = skipped_in_row + 1, skipped_total + 1
        else:
            skipped_in_row = 0
        first = window_start is None  # this run's first step includes compilation: not a throughput figure
        if first:
            window_start = now
        else:
            window_steps += 1
        if step % experiment.train.log_every == 0 or step == steps:
            elapsed = now - window_start
            speed = throughput(window_steps, elapsed) if not first else throughput(0, 0)
            if not first:
                train_time, trained_steps = train_time + elapsed, trained_steps + window_steps
            last_row = {"step": step}
            if tokens_per_step is not None:
                last_row["tokens"] = step * tokens_per_step
            last_row.update({
                "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), **speed,
                "epoch": train_iter.epoch, "skipped": skipped_total,
            })
            log.write(last_row)
            postfix = {"loss": f"{last_row['loss']:.3f}"}
            if speed["tokens_per_sec"] is not None:
                postfix["tok_s"] = f"{speed['tokens_per_sec']:,.0f}"
            bar.set_postfix(postfix)
            window_start, window_steps = now, 0

    timed_saves = TimedSaves(experiment.train.ckpt_every_minutes)
    try:
        if start_step == 0:
            last_eval = eval_row(start_step)
        with _Preemption() as preemption, tqdm(
            total=steps, initial=start_step, desc=experiment.name, disable=not primary, dynamic_ncols=True
        ) as bar:
            for step in range(start_step + 1, steps + 1):
                batch = first_batch if first_batch is not None else sharding.global_batch(next(train_iter), mesh)
                first_batch = None
                with profile.step(step):
                    state, metrics = train_step(state, frozen, batch)
                profile.stepped(step, metrics)
                if pending is not None:
                    read(*pending)
                pending = (step, metrics)
                bar.update(1)
                if step % experiment.train.eval_every == 0 or step == steps:
                    read(*pending)
                    pending = None
                    last_eval = eval_row(step) or last_eval
                preempted = preemption.reached(step)
                timed = timed_saves.due()  # every step: with several processes it is a collective
                if step % experiment.train.ckpt_every == 0 or step == steps or preempted or timed:
                    if pending is not None:
                        read(*pending)
                        pending = None
                    at_step = last_eval is not None and last_eval["step"] == step
                    metrics_row = {"val_loss": last_eval["val_loss"]} if at_step else None
                    checkpoints.save(step, state, train_iter.get_state(), metrics=metrics_row)
                    timed_saves.saved()
                    log.flush()
                if preempted:
                    checkpoints.wait()
                    raise Preempted(
                        f"SIGTERM: saved a checkpoint at step {step} in {run_dir}; rerun the same command to resume"
                    )
            if pending is not None:
                read(*pending)
        checkpoints.wait()
    finally:  # also after an error, so that a sweep's next member starts clean
        failed = sys.exc_info()[0] is not None
        profile.close()
        train_iter.close()
        checkpoints.close(after_error=failed)
        log.close(failed=failed)

    summary: dict[str, Any] = {"name": experiment.name, "steps": steps, "train_loss": last_row.get("loss")}
    if tokens_per_step is not None:
        summary["tokens"] = steps * tokens_per_step
    if last_eval is not None:
        summary.update({k: v for k, v in last_eval.items() if k != "step"})
    summary.update(throughput(trained_steps, train_time))
    summary.update({"peak_flops": peak, "peak_source": peak_source, "wall_s": time.perf_counter() - started})
    params, frozen = _gathered(state["params"]), _gathered(frozen)
    if primary:
        summary.update(task.finish(params, frozen, summary))
        _write_summary(experiment, summary)
    return summary


def _write_summary(experiment: Experiment, summary: dict[str, Any]) -> None:
    run_dir = experiment.run_dir
    storage.write_text_atomic(storage.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    plot_losses(storage.join(run_dir, "metrics.jsonl"), storage.join(run_dir, "loss.png"), experiment.name)
    figures = [f"loss {summary['train_loss']:.4f}"]
    for key, label, spec in (("val_loss", "val loss", ".4f"), ("val_bpb", "val bpb", ".4f"),
                             ("val_accuracy", "val accuracy", ".4f"), ("tokens", "tokens", ",")):
        if summary.get(key) is not None:
            figures.append(f"{label} {summary[key]:{spec}}")
    if summary.get("tokens_per_sec") is not None:
        figures.append(f"tokens/s {summary['tokens_per_sec']:,.0f}")
    if summary.get("mfu") is not None:
        figures.append(f"MFU {summary['mfu']:.1%}")
    figures.append(f"time {summary['wall_s']:.0f}s")
    print(f"{experiment.name}: {'  '.join(figures)}  -> {run_dir}")
