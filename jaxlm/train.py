"""Training: the train state, the jitted train and eval steps, and the loop.

The loop dispatches step N+1 before it reads step N's metrics, so the host never waits for the device between
steps. It evaluates every `eval_every` steps, checkpoints every `ckpt_every` steps and on SIGTERM, stops on a
non-finite loss or gradient norm (or skips such updates, if asked), and writes one JSON line per logged step to
`<run_dir>/metrics.jsonl`. At the end it writes samples, a loss plot and a one-line summary.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from jaxlm import flops, sharding
from jaxlm.checkpoint import Checkpoints, load_params, write_or_check_config
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError, ConfigError, NonFiniteError
from jaxlm.logging import MetricsWriter, plot_losses
from jaxlm.model import Transformer, compiler_options
from jaxlm.optim import make_optimizer, make_schedule

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved a checkpoint on SIGTERM; rerun the command to resume


class Preempted(Exception):
    """Raised after the checkpoint written on SIGTERM; the CLI exits with PREEMPTED_EXIT_CODE."""


# ----------------------------------------------------------------------------------------------- state and steps


def _init_boxed(experiment: Experiment, rng: jax.Array) -> dict[str, Any]:
    """Train state with every parameter (and its optimizer moments) still boxed with its logical axis names."""
    model = Transformer(experiment.model)
    tokens = jnp.zeros((1, experiment.data.seq_len), jnp.int32)
    params = model.init(rng, tokens)["params"]
    opt_state = make_optimizer(experiment.optim, experiment.train.steps).init(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


def state_shardings(experiment: Experiment, mesh: jax.sharding.Mesh) -> Any:
    abstract = jax.eval_shape(functools.partial(_init_boxed, experiment), jax.random.key(0))
    return sharding.logical_shardings(abstract, mesh)


def abstract_train_state(experiment: Experiment, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The train state's shapes, dtypes and shardings, computed without allocating it."""
    mesh = mesh or sharding.make_mesh(type(experiment.mesh)())
    abstract = jax.eval_shape(lambda rng: nn.unbox(_init_boxed(experiment, rng)), jax.random.key(0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings(experiment, mesh)
    )


def init_train_state(experiment: Experiment, mesh: jax.sharding.Mesh) -> Any:
    """Materialise the train state directly in its shards (no device ever holds the whole of a sharded array)."""
    init = jax.jit(
        lambda rng: nn.unbox(_init_boxed(experiment, rng)), out_shardings=state_shardings(experiment, mesh)
    )
    return init(jax.random.key(experiment.train.seed))


def token_losses(experiment: Experiment, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
    """Sum of next-token cross-entropies over the real (non-padding) targets, and their count."""
    logits_BTV = Transformer(experiment.model).apply(
        {"params": params},
        batch["inputs"],
        positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"),
        deterministic=rng is None,
        rngs={"dropout": rng} if rng is not None else {},
    )
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    weights_BT = (batch["segment_ids"] > 0) if "segment_ids" in batch else jnp.ones_like(losses_BT, dtype=bool)
    return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT).astype(jnp.float32)


def make_train_step(experiment: Experiment, mesh: jax.sharding.Mesh | None = None):
    """(state, batch) -> (state, metrics): k microbatches accumulated, one optimizer update.

    With `mesh`, the model's activation sharding constraints take effect (see jaxlm.sharding).
    """
    tx = make_optimizer(experiment.optim, experiment.train.steps)
    schedule = make_schedule(experiment.optim, experiment.train.steps)
    accum = experiment.train.grad_accum
    use_dropout = experiment.model.dropout > 0

    def train_step(state, batch):
        step_rng = jax.random.fold_in(jax.random.key(experiment.train.seed + 1), state["step"])
        # Rows i, i + k, i + 2k, ... form microbatch i: each keeps the batch's sharding over devices.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def one(carry, inputs):
            grads_sum, loss_sum, count = carry
            index, microbatch = inputs
            rng = jax.random.fold_in(step_rng, index) if use_dropout else None
            (loss, n), grads = jax.value_and_grad(
                lambda p: token_losses(experiment, p, microbatch, rng), has_aux=True
            )(state["params"])
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, count), _ = jax.lax.scan(one, init, (jnp.arange(accum), micro))
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = loss_sum / count
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if experiment.train.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
        return new_state, metrics

    return train_step if mesh is None else sharding.traced_with_activation_sharding(train_step, mesh)


def jit_train_step(experiment: Experiment, mesh: jax.sharding.Mesh):
    """The train step jitted over `mesh`: state donated, shardings pinned, the backend's compiler options."""
    state_sharding = state_shardings(experiment, mesh)
    return jax.jit(
        make_train_step(experiment, mesh), in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, None), donate_argnums=0, compiler_options=compiler_options(),
    )


def make_eval_step(experiment: Experiment, mesh: jax.sharding.Mesh | None = None):
    def eval_step(params, batch):
        return token_losses(experiment, params, batch, None)

    return eval_step if mesh is None else sharding.traced_with_activation_sharding(eval_step, mesh)


# ------------------------------------------------------------------------------------------------------- the loop


class _SigtermFlag:
    """Set by SIGTERM; the loop checks it between steps so the step in flight finishes and is saved."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
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


def _evaluate(experiment, eval_step, params, prepared, mesh) -> float:
    from jaxlm.data import make_iterator

    it = make_iterator(
        experiment.data, prepared, split="validation", seed=0, shuffle_rows=True,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    total, count = 0.0, 0.0
    try:
        for _ in range(experiment.train.eval_steps):
            loss_sum, n = eval_step(params, sharding.global_batch(next(it), mesh))
            total, count = total + float(loss_sum), count + float(n)
    finally:
        it.close()
    return total / count


def _load_init_params(experiment: Experiment, state: Any) -> Any:
    """Replace the fresh params with those of another run (TrainConfig.init_from), checking every shape."""
    source, params = load_params(experiment.train.init_from)
    expected = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in expected:
        other = got.get(path)
        if other is None or other.shape != leaf.shape:
            name = jax.tree_util.keystr(path)
            found = "missing" if other is None else f"shape {other.shape}"
            raise CheckpointError(
                f"init_from {experiment.train.init_from}: parameter {name} is {found}, this model needs "
                f"{leaf.shape}: use a run of the same model shape"
            )
    params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), params, state["params"])
    return {**state, "params": params}


def _prepare_once(experiment: Experiment):
    """Prepare corpus and tokenizer on process 0 first, so that processes sharing a cache never race to build it."""
    from jaxlm.data import prepare_data

    if jax.process_count() == 1:
        return prepare_data(experiment.data)
    from jax.experimental import multihost_utils

    prepared = prepare_data(experiment.data) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxlm: data prepared")
    return prepared or prepare_data(experiment.data)


def train(experiment: Experiment) -> dict[str, Any]:
    """Run (or resume) an experiment to its last step; returns the summary written to summary.json."""
    from jaxlm.data import make_iterator

    sharding.initialize_distributed(experiment.mesh)
    mesh = sharding.make_mesh(experiment.mesh)
    sharding.check_fits(experiment, mesh)
    run_dir = experiment.run_dir
    primary = jax.process_index() == 0
    write_or_check_config(sharding.run_config(experiment))

    prepared = _prepare_once(experiment)
    if prepared.vocab_size > experiment.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {prepared.vocab_size} tokens but ModelConfig.vocab_size={experiment.model.vocab_size}:"
            f" set --model.vocab-size to at least {prepared.vocab_size}"
        )
    train_iter = make_iterator(
        experiment.data, prepared, split="train", seed=experiment.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )

    checkpoints = Checkpoints(
        run_dir, experiment.train.keep_checkpoints, experiment.train.keep_best, experiment.train.async_checkpoints
    )
    latest = checkpoints.latest_step()
    summary_path = os.path.join(run_dir, "summary.json")
    if latest is not None and latest >= experiment.train.steps and os.path.exists(summary_path):
        checkpoints.close()
        print(f"{run_dir} is finished (step {latest}); delete it or use a new --train.out-dir to run again")
        with open(summary_path) as f:
            return json.load(f)
    if latest is not None:
        abstract = abstract_train_state(experiment, mesh)
        state, data_state = checkpoints.restore(latest, abstract)
        if data_state is not None:
            train_iter.set_state(data_state)
        print(f"resuming {run_dir} from step {latest}")
    else:
        state = init_train_state(experiment, mesh)
        if experiment.train.init_from:
            state = _load_init_params(experiment, state)
    start_step = int(state["step"])

    train_step = jit_train_step(experiment, mesh)
    eval_step = jax.jit(make_eval_step(experiment, mesh), compiler_options=compiler_options())
    tokens_per_step = experiment.data.batch_size * experiment.data.seq_len
    flops_per_token = flops.flops_per_token(experiment.model, experiment.data.seq_len)
    peak, peak_source = flops.peak_flops()
    log = MetricsWriter(run_dir, start_step)
    bytes_per_token = prepared.stats["val_bytes_per_token"]

    def eval_row(step: int) -> dict[str, Any]:
        val_loss = _evaluate(experiment, eval_step, state["params"], prepared, mesh)
        row = {"step": step, "val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bytes_per_token}
        log.write(row)
        return row

    last_eval = eval_row(start_step) if start_step == 0 else None
    steps = experiment.train.steps
    skipped_in_row, skipped_total = 0, 0
    window_start, window_tokens = None, 0
    started = time.perf_counter()
    train_time, trained_tokens = 0.0, 0
    last_row: dict[str, Any] = {}
    pending: tuple[int, dict] | None = None

    def read(step: int, metrics: dict) -> None:
        """Handle the metrics of a finished step (one step late)."""
        nonlocal skipped_in_row, skipped_total, window_start, window_tokens, last_row, train_time, trained_tokens
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
            window_tokens += tokens_per_step
        if step % experiment.train.log_every == 0 or step == steps:
            elapsed = now - window_start
            tps = window_tokens / elapsed if not first and elapsed > 0 else None
            if tps is not None:
                train_time, trained_tokens = train_time + elapsed, trained_tokens + window_tokens
            last_row = {
                "step": step, "tokens": step * tokens_per_step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tps,
                "mfu": tps * flops_per_token / peak if tps is not None else None,
                "epoch": train_iter.epoch, "skipped": skipped_total,
            }
            log.write(last_row)
            bar.set_postfix(loss=f"{last_row['loss']:.3f}", tok_s=f"{tps or 0:,.0f}")
            window_start, window_tokens = now, 0

    with _SigtermFlag() as sigterm, tqdm(
        total=steps, initial=start_step, desc=experiment.name, disable=not primary, dynamic_ncols=True
    ) as bar:
        for step in range(start_step + 1, steps + 1):
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            if pending is not None:
                read(*pending)
            pending = (step, metrics)
            bar.update(1)
            if step % experiment.train.eval_every == 0 or step == steps:
                read(*pending)
                pending = None
                last_eval = eval_row(step)
            if step % experiment.train.ckpt_every == 0 or step == steps or sigterm.raised:
                if pending is not None:
                    read(*pending)
                    pending = None
                metrics_for_best = {"val_loss": last_eval["val_loss"]} if last_eval and last_eval["step"] == step else None
                checkpoints.save(step, state, train_iter.get_state(), metrics=metrics_for_best)
            if sigterm.raised:
                checkpoints.wait()
                checkpoints.close()
                raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in {run_dir}; rerun the same command to resume")
        if pending is not None:
            read(*pending)
    train_iter.close()
    checkpoints.wait()
    checkpoints.close()

    wall = time.perf_counter() - started
    tps = trained_tokens / train_time if train_time > 0 else 0.0
    summary = {
        "name": experiment.name, "steps": steps, "tokens": steps * tokens_per_step,
        "train_loss": last_row.get("loss"), "val_loss": last_eval["val_loss"] if last_eval else None,
        "val_bpb": last_eval["val_bpb"] if last_eval else None, "tokens_per_sec": tps,
        "mfu": tps * flops_per_token / peak, "peak_flops": peak, "peak_source": peak_source, "wall_s": wall,
        "params": flops.count_params(experiment.model),
    }
    params = state["params"]
    if jax.process_count() > 1 and experiment.train.samples:
        # Process 0 samples alone, so it needs the params on its own devices: every process joins the gather.
        from jax.experimental import multihost_utils

        params = jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])
    if primary:
        _write_outputs(experiment, params, prepared, summary)
    return summary


def _write_outputs(experiment: Experiment, params: Any, prepared, summary: dict[str, Any]) -> None:
    run_dir = experiment.run_dir
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_losses(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"), experiment.name)
    if experiment.train.samples:
        write_samples(experiment, params, prepared, os.path.join(run_dir, "samples.txt"))
    print(
        f"{experiment.name}: loss {summary['train_loss']:.4f}  val loss {summary['val_loss']:.4f}  "
        f"val bpb {summary['val_bpb']:.4f}  tokens {summary['tokens']:,}  tokens/s {summary['tokens_per_sec']:,.0f}  "
        f"MFU {summary['mfu']:.1%}  time {summary['wall_s']:.0f}s  -> {run_dir}"
    )


SAMPLE_PROMPTS = ("def ", "import ", "class ")


def write_samples(experiment: Experiment, params: Any, prepared, path: str) -> None:
    """Samples from fixed prompts, each after an end-of-document token (where documents start in training rows)."""
    from jaxlm.generate import generate

    tokenizer = prepared.tokenizer
    prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(experiment.train.samples)]
    prompt_ids = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in prompts]
    budget = experiment.model.max_seq_len - max(len(ids) for ids in prompt_ids)
    outputs = generate(
        experiment.model, params, prompt_ids, max_new_tokens=min(experiment.train.sample_tokens, budget),
        temperature=0.8, top_k=40, seed=experiment.train.seed, eos_id=tokenizer.eos_id,
    )
    with open(path, "w") as f:
        for i, (prompt, ids, out) in enumerate(zip(prompts, prompt_ids, outputs)):
            # Decoding prompt and continuation together keeps sentencepiece's word-initial spaces.
            f.write(f"--- sample {i}, prompt {prompt!r}\n{tokenizer.decode(ids[1:] + list(out))}\n\n")
