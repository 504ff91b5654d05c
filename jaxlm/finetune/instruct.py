"""Instruction tuning: training an assistant, writing its samples and checkpoint, and loading it back
(`load_lm`, `run_layout`, `user_prompt`) for sampling and evaluation."""

from __future__ import annotations

import json
from typing import Any

import jax

from jaxlm import lora as lora_lib
from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError
from jaxlm.finetune.backbone import load_base, response_losses
from jaxlm.finetune.config import ADAPTERS_FILE, FINETUNE_FILE, FinetuneConfig, Params
from jaxlm.finetune.data import (
    InstructSplit,
    alpaca_prompt,
    chat_prompt,
    fixed_batches,
    instruct_epoch,
    pack_rows,
    prompt_ids,
    read_instruct,
)
from jaxlm.finetune.rundir import load_tree, read_run, save_tree
from jaxlm.finetune.task import FinetuneTask
from jaxlm.logging import METRICS_FILE, read_metrics
from jaxlm.train import fit


# ------------------------------------------------------------------------------------------------- instruction


def _split_loss(experiment: Experiment, ft: FinetuneConfig, pad_id: int):
    """(params, adapters, split) -> mean response-token loss over a whole split, on this process's devices."""
    cfg, spec = experiment.model, ft.lora
    losses = jax.jit(lambda params, adapters, batch: response_losses(cfg, params, batch, adapters, spec))

    def evaluate(params, adapters, data: InstructSplit) -> float:
        rows = pack_rows(data.ids, data.weights, ft.max_len, pad_id, ft.pack)
        total = count = 0.0
        for batch, real in fixed_batches(rows, experiment.data.batch_size):
            batch["weights"][real:] = 0.0
            s, n = losses(params, adapters, batch)
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    return evaluate


class InstructionTuning(FinetuneTask):
    """Next-token loss on the responses of templated examples; prompts are context only.

    Trainable: the language model's params (every weight, or the last k blocks through the update mask), so its
    checkpoints are language-model checkpoints every jaxlm tool reads; or with LoRA the adapters, beside the
    frozen {"model": params}.
    """

    def read_data(self) -> None:
        ft = self.ft
        self.splits = {"train": read_instruct(ft.train_file, self.tokenizer, ft)}
        for name, path in (("validation", ft.val_file), ("test", ft.test_file)):
            if path:
                self.splits[name] = read_instruct(path, self.tokenizer, ft)
        if jax.process_index() == 0:
            for name, data in self.splits.items():
                tokens = sum(int(w[1:].sum()) for w in data.weights)
                cut = f", {data.truncated} truncated to max_len={ft.max_len}" if data.truncated else ""
                dropped = f" ({data.dropped} dropped: no response left)" if data.dropped else ""
                print(f"{name}: {len(data)} examples ({'/'.join(data.layouts)}), {tokens:,} response tokens{cut}{dropped}")
            print(f"trainable parameters: {self.count_trainable():,}")

    def abstract_params(self):
        if self.ft.lora is not None:
            return self.abstract_adapters(), {"model": self.boxed_backbone()}
        return self.boxed_backbone(), {}

    def init_trainable(self, rng, shardings):
        if self.ft.lora is not None:
            return self.init_adapters(jax.random.fold_in(rng, 2), shardings)
        return self.place_backbone(shardings)

    def init_frozen(self, shardings):
        return {"model": self.place_backbone(shardings["model"])} if self.ft.lora is not None else {}

    def update_mask(self):
        return self.backbone_mask()

    def epoch_rows(self, epoch):
        return instruct_epoch(self.splits["train"], self.ft, self.tokenizer.pad_id, self.experiment.train.seed, epoch)

    def _model_and_adapters(self, params, frozen):
        return (frozen["model"], params) if self.ft.lora is not None else (params, None)

    def loss(self, params, frozen, batch, rng):
        model, adapters = self._model_and_adapters(params, frozen)
        rng = rng if self.uses_dropout() else None
        return response_losses(self.experiment.model, model, batch, adapters, self.ft.lora, rng)

    def eval_batches(self):
        if "validation" not in self.splits:
            return iter(())
        data = self.splits["validation"]
        rows = pack_rows(data.ids, data.weights, self.ft.max_len, self.tokenizer.pad_id, self.ft.pack)
        return self.split_batches(rows, "weights")

    def eval_sums(self, params, frozen, batch):
        loss_sum, count = self.loss(params, frozen, batch, None)
        return {"loss": loss_sum, "count": count}

    def eval_row(self, sums):
        return {"val_loss": sums["loss"] / max(sums["count"], 1.0)}

    def finish(self, params, frozen, summary):
        run_dir, ft = self.experiment.run_dir, self.ft
        model, adapters = self._model_and_adapters(params, frozen)
        evaluate_split = _split_loss(self.experiment, ft, self.tokenizer.pad_id)
        out: dict[str, Any] = {
            "task": "instruct", "layouts": list(self.splits["train"].layouts),
            "trainable_params": self.count_trainable(),
            "train_loss": evaluate_split(model, adapters, self.splits["train"]),
        }
        first = next((r for r in read_metrics(storage.join(run_dir, METRICS_FILE)) if "val_loss" in r), None)
        if "validation" in self.splits and first is not None and first["step"] == 0:
            out["validation_loss_before"] = first["val_loss"]
        for name in ("validation", "test"):
            if name in self.splits:
                out[f"{name}_loss_after"] = evaluate_split(model, adapters, self.splits[name])
                before = out.get(f"{name}_loss_before")
                print(f"{name} loss on response tokens: "
                      + (f"{before:.4f} before, " if before is not None else "")
                      + f"{out[f'{name}_loss_after']:.4f} after")
        if ft.lora is not None:
            save_tree(storage.join(run_dir, ADAPTERS_FILE), adapters)
            model = lora_lib.merge(model, adapters, ft.lora)
        source = self.splits.get("validation", self.splits["train"])
        out["samples"] = write_samples(
            self.experiment, model, self.tokenizer, source, ft, storage.join(run_dir, "samples.txt")
        )
        return out


def train_instruct(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    """Instruction-tune a language model; returns the summary (also written to summary.json)."""
    return fit(InstructionTuning(experiment, ft))


def write_samples(
    experiment: Experiment, params: Params, tokenizer: Any, data: InstructSplit, ft: FinetuneConfig, path: str
) -> list[dict[str, str]]:
    """Greedy answers to the first `ft.samples` prompts of `data` (those that leave room for an answer), beside
    the reference answers. One batch: greedy tokens do not depend on the other rows or the padding."""
    from jaxlm.generate import generate

    cfg = experiment.model
    chosen = [
        (prompt, reference, ids)
        for prompt, reference in list(zip(data.prompts, data.responses))[: ft.samples]
        if len(ids := prompt_ids(tokenizer, prompt)) < cfg.max_seq_len
    ]
    out = []
    if chosen:
        budget = min(ft.sample_tokens, cfg.max_seq_len - max(len(ids) for _, _, ids in chosen))
        answers = generate(cfg, params, [ids for _, _, ids in chosen], max_new_tokens=budget, temperature=0.0,
                           eos_id=tokenizer.eos_id)
        out = [{"prompt": "".join(t for t, _ in prompt), "reference": reference, "answer": tokenizer.decode(new)}
               for (prompt, reference, _), new in zip(chosen, answers)]
    with storage.open(path, "w") as f:
        for s in out:
            f.write(f"--- prompt\n{s['prompt']}\n--- reference\n{s['reference']}\n--- answer\n{s['answer']}\n\n")
    return out


def load_lm(path: str) -> tuple[Experiment, Params]:
    """The experiment and language-model params of a run: a pretraining run or checkpoint, a fully finetuned
    assistant, or a LoRA one (its adapters folded into the base weights it was trained on)."""
    from jaxlm.checkpoint import load_params

    if not storage.isdir(path) or not storage.exists(storage.join(path, FINETUNE_FILE)):
        return load_params(path)
    experiment, ft = read_run(path)
    if ft.task == "classify":
        raise CheckpointError(f"{path} is a classification run, not a language model: use load_classifier")
    if ft.lora is None:
        return load_params(path)
    experiment, base = load_base(experiment)
    return experiment, lora_lib.merge(base, load_tree(storage.join(path, ADAPTERS_FILE)), ft.lora)


def run_layout(path: str) -> str:
    """The prompt layout ('alpaca' or 'chat') an instruction-tuned run learned; 'chat' for any other run."""
    summary_path = storage.join(path, "summary.json")
    if storage.exists(summary_path):
        layouts = json.loads(storage.read_text(summary_path)).get("layouts") or ["chat"]
        return layouts[0]
    return "chat"


def instruction_tuned(path: str) -> bool:
    """Whether `path` is an instruction-tuned run (or one preference-tuned after it), or a checkpoints/<step>
    directory of one: its finetune.json says task instruct or dpo. A pretraining run has none (its prompts were
    never wrapped in a template)."""
    path = storage.abspath(path).rstrip("/")
    parent = storage.dirname(path)
    run_dir = storage.dirname(parent) if storage.basename(parent) == "checkpoints" else path
    try:
        return json.loads(storage.read_text(storage.join(run_dir, FINETUNE_FILE))).get("task", "classify") in ("instruct", "dpo")
    except (OSError, ValueError, AttributeError):
        return False


def user_prompt(text: str, layout: str = "chat") -> str:
    """A single user request in the given layout's template, ready for the model's answer."""
    if layout == "alpaca":
        return alpaca_prompt(text)
    return chat_prompt([{"role": "user", "content": text}])
