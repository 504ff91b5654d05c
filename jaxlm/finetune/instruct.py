"""Instruction tuning: training an assistant, writing its samples and checkpoint, and loading it back
(`load_lm`, `run_layout`, `user_prompt`) for sampling and evaluation."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import lora as lora_lib
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError
from jaxlm.finetune.backbone import (
    _split_trainable,
    count_trainable,
    full_backbone,
    load_base,
    load_tokenizer,
    response_losses,
)
from jaxlm.finetune.config import ADAPTERS_FILE, FINETUNE_FILE, FinetuneConfig, Params, _check_common
from jaxlm.finetune.data import (
    InstructSplit,
    _fixed_batches,
    alpaca_prompt,
    chat_prompt,
    instruct_batches,
    pack_rows,
    prompt_ids,
    read_instruct,
)
from jaxlm.finetune.loop import _fit, _Metrics, _uses_dropout
from jaxlm.finetune.rundir import _begin, _read_run, _write_summary, load_tree, save_tree
from jaxlm.optim import make_optimizer


# ------------------------------------------------------------------------------------------------- instruction


def _instruct_eval_fn(experiment: Experiment, ft: FinetuneConfig, pad_id: int):
    cfg, spec = experiment.model, ft.lora
    losses = jax.jit(lambda t, fz, batch: response_losses(cfg, t, fz, batch, spec))

    def evaluate(trainable, frozen, data: InstructSplit) -> float:
        rows = pack_rows(data.ids, data.weights, ft.max_len, pad_id, ft.pack)
        total = count = 0.0
        for batch, real in _fixed_batches(rows, experiment.data.batch_size):
            batch["weights"][real:] = 0.0
            s, n = losses(trainable, frozen, batch)
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    return evaluate


def train_instruct(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    """Instruction-tune a language model; returns the summary (also written to summary.json)."""
    experiment, backbone = load_base(experiment)
    _check_common(experiment, ft)
    finished = _begin(experiment, ft)
    if finished is not None:
        return finished
    run_dir = experiment.run_dir
    started = time.perf_counter()
    tokenizer = load_tokenizer(experiment)
    splits = {"train": read_instruct(ft.train_file, tokenizer, ft)}
    for name, path in (("validation", ft.val_file), ("test", ft.test_file)):
        if path:
            splits[name] = read_instruct(path, tokenizer, ft)
    for name, data in splits.items():
        tokens = sum(int(w[1:].sum()) for w in data.weights)
        cut = f", {data.truncated} truncated to max_len={ft.max_len}" if data.truncated else ""
        dropped = f" ({data.dropped} dropped: no response left)" if data.dropped else ""
        print(f"{name}: {len(data)} examples ({'/'.join(data.layouts)}), {tokens:,} response tokens{cut}{dropped}")

    cfg = experiment.model
    rng = jax.random.key(experiment.train.seed)
    trainable, frozen, mask = _split_trainable(experiment, ft, backbone, None, jax.random.fold_in(rng, 2))
    n_trainable = count_trainable(trainable, mask)
    print(f"trainable parameters: {n_trainable:,}")
    spec, pad_id = ft.lora, tokenizer.pad_id
    dropout = _uses_dropout(experiment, ft)

    def loss_fn(t, fz, batch, rng):
        return response_losses(cfg, t, fz, batch, spec, rng if dropout else None)

    evaluate_split = _instruct_eval_fn(experiment, ft, pad_id)
    summary: dict[str, Any] = {
        "name": experiment.name, "task": "instruct", "steps": experiment.train.steps,
        "layouts": list(splits["train"].layouts), "trainable_params": n_trainable,
    }
    for name in ("validation", "test"):
        if name in splits:
            summary[f"{name}_loss_before"] = evaluate_split(trainable, frozen, splits[name])
            print(f"{name} loss on response tokens before finetuning: {summary[f'{name}_loss_before']:.4f}")

    def evaluate(t):
        return {"val_loss": evaluate_split(t, frozen, splits["validation"])} if "validation" in splits else {}

    metrics = _Metrics(run_dir)
    batches = instruct_batches(splits["train"], ft, experiment.data.batch_size, pad_id, experiment.train.seed)
    trainable, opt_state = _fit(experiment, trainable, frozen, mask, loss_fn, batches, evaluate, metrics)

    summary["train_loss"] = evaluate_split(trainable, frozen, splits["train"])
    for name in ("validation", "test"):
        if name in splits:
            summary[f"{name}_loss_after"] = evaluate_split(trainable, frozen, splits[name])
            print(
                f"{name} loss on response tokens: {summary[f'{name}_loss_before']:.4f} before, "
                f"{summary[f'{name}_loss_after']:.4f} after"
            )
    if spec is not None:
        save_tree(os.path.join(run_dir, ADAPTERS_FILE), trainable["lora"])
        params = lora_lib.merge(backbone, trainable["lora"], spec)
    else:
        params = full_backbone(trainable, frozen)
        _save_lm_checkpoint(experiment, params, opt_state if not frozen.get("model") else None)
    source = splits.get("validation", splits["train"])
    summary["samples"] = write_samples(
        experiment, params, tokenizer, source, ft, os.path.join(run_dir, "samples.txt")
    )
    summary["wall_s"] = time.perf_counter() - started
    _write_summary(run_dir, summary)
    return summary


def _save_lm_checkpoint(experiment: Experiment, params: Params, opt_state: Any | None) -> None:
    """A jaxlm checkpoint (the train state layout), so that every tool loads the result as a language model.

    `opt_state` is that of {"model": params}, or None when part of the model was frozen (frozen parameters have
    no moments): then the checkpoint holds a fresh optimizer state, which only fills the layout.
    """
    from jaxlm.checkpoint import Checkpoints

    tx = make_optimizer(experiment.optim, experiment.train.steps)
    if opt_state is None:
        opt_state = tx.init(params)
    else:  # its leaves are in the order of the plain params'
        opt_state = jax.tree.unflatten(jax.tree.structure(jax.eval_shape(tx.init, params)), jax.tree.leaves(opt_state))
    checkpoints = Checkpoints(experiment.run_dir, keep=1, async_save=False)
    try:
        step = experiment.train.steps
        state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state}
        checkpoints.save(step, state, None)
        checkpoints.wait()
    finally:
        checkpoints.close()


def write_samples(
    experiment: Experiment, params: Params, tokenizer: Any, data: InstructSplit, ft: FinetuneConfig, path: str
) -> list[dict[str, str]]:
    """Greedy answers to the first `ft.samples` prompts of `data`, beside the reference answers."""
    from jaxlm.generate import generate

    out = []
    cfg = experiment.model
    for prompt, reference in list(zip(data.prompts, data.responses))[: ft.samples]:
        ids = prompt_ids(tokenizer, prompt)
        budget = min(ft.sample_tokens, cfg.max_seq_len - len(ids))
        if budget < 1:
            continue
        new = generate(cfg, params, [ids], max_new_tokens=budget, temperature=0.0, eos_id=tokenizer.eos_id)[0]
        out.append({"prompt": "".join(t for t, _ in prompt), "reference": reference, "answer": tokenizer.decode(new)})
    with open(path, "w") as f:
        for s in out:
            f.write(f"--- prompt\n{s['prompt']}\n--- reference\n{s['reference']}\n--- answer\n{s['answer']}\n\n")
    return out


def load_lm(path: str) -> tuple[Experiment, Params]:
    """The experiment and language-model params of a run: a pretraining run or checkpoint, a fully finetuned
    assistant, or a LoRA one (its adapters folded into the base weights it was trained on)."""
    from jaxlm.checkpoint import load_params

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, FINETUNE_FILE)):
        return load_params(path)
    experiment, ft = _read_run(path)
    if ft.task == "classify":
        raise CheckpointError(f"{path} is a classification run, not a language model: use load_classifier")
    if ft.lora is None:
        return load_params(path)
    experiment, base = load_base(experiment)
    return experiment, lora_lib.merge(base, load_tree(os.path.join(path, ADAPTERS_FILE)), ft.lora)


def run_layout(path: str) -> str:
    """The prompt layout ('alpaca' or 'chat') an instruction-tuned run learned; 'chat' for any other run."""
    summary_path = os.path.join(path, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            layouts = json.load(f).get("layouts") or ["chat"]
        return layouts[0]
    return "chat"


def instruction_tuned(path: str) -> bool:
    """Whether `path` is an instruction-tuned run, or a checkpoints/<step> directory of one: its finetune.json
    says task instruct. A pretraining run has none (its prompts were never wrapped in a template)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else path
    try:
        with open(os.path.join(run_dir, FINETUNE_FILE)) as f:
            return json.load(f).get("task", "classify") == "instruct"
    except (OSError, ValueError, AttributeError):
        return False


def user_prompt(text: str, layout: str = "chat") -> str:
    """A single user request in the given layout's template, ready for the model's answer."""
    if layout == "alpaca":
        return alpaca_prompt(text)
    return chat_prompt([{"role": "user", "content": text}])
