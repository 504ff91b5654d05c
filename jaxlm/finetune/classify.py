"""Classification finetuning: training and evaluating a classifier head (confusion matrix included), and
`load_classifier` to use a finished run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError
from jaxlm.finetune.backbone import classifier_logits, full_backbone, load_base, load_tokenizer
from jaxlm.finetune.config import CLASSIFIER_FILE, LABELS_FILE, FinetuneConfig, Params
from jaxlm.finetune.data import ClassifySplit, classify_epoch, encode_classify, fixed_batches, label_ids, read_table
from jaxlm.finetune.rundir import load_tree, read_run, save_tree
from jaxlm.finetune.task import FinetuneTask
from jaxlm.model import token_loss_sums
from jaxlm.train import fit


# ----------------------------------------------------------------------------------------------- classification


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    out = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(out, (labels, predictions), 1)
    return out


def format_confusion(matrix: np.ndarray, labels: Sequence[str]) -> str:
    width = max(6, *(len(x) for x in labels), len(str(matrix.max())) + 1)
    head = "true \\ predicted".ljust(width) + "".join(x.rjust(width + 1) for x in labels)
    lines = [head]
    for label, row in zip(labels, matrix):
        lines.append(label.ljust(width) + "".join(str(v).rjust(width + 1) for v in row))
    return "\n".join(lines)


def _split_logits(experiment: Experiment, ft: FinetuneConfig):
    """(trainable, frozen, split) -> (metrics, predictions) over a whole split, on this process's devices."""
    cfg, spec = experiment.model, ft.lora

    @jax.jit
    def logits(trainable, frozen, tokens, lengths):
        return classifier_logits(cfg, trainable, frozen, tokens, lengths, spec)

    def evaluate(trainable, frozen, data: ClassifySplit) -> tuple[dict[str, float], np.ndarray]:
        outs = []
        arrays = {"tokens": data.tokens, "lengths": data.lengths}
        for batch, real in fixed_batches(arrays, experiment.data.batch_size):
            outs.append(np.asarray(logits(trainable, frozen, batch["tokens"], batch["lengths"]))[:real])
        z = np.concatenate(outs).astype(np.float64)
        log_probs = z - z.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        loss = float(-log_probs[np.arange(len(data)), data.labels].mean())
        predictions = z.argmax(-1)
        return {"loss": loss, "accuracy": float((predictions == data.labels).mean())}, predictions

    return evaluate


class Classification(FinetuneTask):
    """A linear head on the final hidden state of each example's closing end token, in place of the LM head.

    Trainable: {"model": backbone, "head"} (every weight, or the last k blocks through the update mask), or with
    LoRA {"lora": adapters, "head"} beside the frozen {"model": backbone}.
    """

    keeps_lm_head = False

    def read_data(self) -> None:
        ft, tokenizer = self.ft, self.tokenizer
        columns = (ft.text_column, ft.label_column)
        train_rows = read_table(ft.train_file, columns)
        self.labels = label_ids(train_rows, ft.label_column, ft.labels)
        self.splits = {"train": encode_classify(train_rows, ft.train_file, tokenizer, ft, self.labels)}
        for name, path in (("validation", ft.val_file), ("test", ft.test_file)):
            if path:
                self.splits[name] = encode_classify(read_table(path, columns), path, tokenizer, ft, self.labels)
        if jax.process_index() == 0:
            with storage.open(storage.join(self.experiment.run_dir, LABELS_FILE), "w") as f:
                json.dump({"labels": self.labels}, f, indent=2)
            for name, data in self.splits.items():
                counts = np.bincount(data.labels, minlength=len(self.labels))
                cut = f", {data.truncated} truncated to max_len={ft.max_len}" if data.truncated else ""
                print(f"{name}: {len(data)} examples "
                      f"({', '.join(f'{label} {c}' for label, c in zip(self.labels, counts))}){cut}")
            print(f"trainable parameters: {self.count_trainable():,}")

    def abstract_params(self):
        head = {
            "kernel": jax.ShapeDtypeStruct((self.experiment.model.d_model, len(self.labels)), jnp.float32),
            "bias": jax.ShapeDtypeStruct((len(self.labels),), jnp.float32),
        }
        if self.ft.lora is not None:
            return {"lora": self.abstract_adapters(), "head": head}, {"model": self.boxed_backbone()}
        return {"model": self.boxed_backbone(), "head": head}, {}

    def init_trainable(self, rng, shardings):
        cfg = self.experiment.model
        head = jax.jit(lambda key: {
            "kernel": cfg.init_std * jax.random.normal(key, (cfg.d_model, len(self.labels)), jnp.float32),
            "bias": jnp.zeros((len(self.labels),), jnp.float32),
        }, out_shardings=shardings["head"])(jax.random.fold_in(rng, 1))
        if self.ft.lora is not None:
            return {"lora": self.init_adapters(jax.random.fold_in(rng, 2), shardings["lora"]), "head": head}
        return {"model": self.place_backbone(shardings["model"]), "head": head}

    def init_frozen(self, shardings):
        return {"model": self.place_backbone(shardings["model"])} if self.ft.lora is not None else {}

    def update_mask(self):
        mask = self.backbone_mask()
        if mask is None:
            return None
        return {"model": mask, "head": {"kernel": np.float32(1), "bias": np.float32(1)}}

    def epoch_rows(self, epoch):
        return classify_epoch(self.splits["train"], self.experiment.train.seed, epoch, self.ft.balanced)

    def _logits(self, params, frozen, batch, rng):
        rng = rng if self.uses_dropout() else None
        return classifier_logits(
            self.experiment.model, params, frozen, batch["tokens"], batch["lengths"], self.ft.lora, rng
        )

    def loss(self, params, frozen, batch, rng):
        # The class is the one "next token" of each example: the token loss with a vocabulary of classes.
        logits_B1C = self._logits(params, frozen, batch, rng)[:, None]
        return token_loss_sums(logits_B1C, {"targets": batch["labels"][:, None]})

    def eval_batches(self):
        if "validation" not in self.splits:
            return iter(())
        data = self.splits["validation"]
        arrays = {"tokens": data.tokens, "lengths": data.lengths, "labels": data.labels,
                  "valid": np.ones(len(data), np.float32)}
        return self.split_batches(arrays, "valid")

    def eval_sums(self, params, frozen, batch):
        logits = self._logits(params, frozen, batch, None)
        valid = batch["valid"]
        loss_sum, count = token_loss_sums(logits[:, None], {"targets": batch["labels"][:, None], "weights": valid[:, None]})
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return {"loss": loss_sum, "correct": jnp.sum(correct * valid), "count": count}

    def eval_row(self, sums):
        return {"val_loss": sums["loss"] / sums["count"], "val_accuracy": sums["correct"] / sums["count"]}

    def finish(self, params, frozen, summary):
        labels, splits, run_dir = self.labels, self.splits, self.experiment.run_dir
        evaluate_split = _split_logits(self.experiment, self.ft)
        majority = int(np.bincount(splits["train"].labels, minlength=len(labels)).argmax())
        out: dict[str, Any] = {
            "task": "classify", "labels": labels, "trainable_params": self.count_trainable(),
            "majority_class": labels[majority],
        }
        final = "test" if "test" in splits else "validation" if "validation" in splits else "train"
        for name, data in splits.items():
            row, predictions = evaluate_split(params, frozen, data)
            row["majority_baseline"] = float((data.labels == majority).mean())
            row["examples"] = len(data)
            out[name] = row
            print(
                f"{name:<10} loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}  "
                f"(majority class {row['majority_baseline']:.4f}, {len(data)} examples)"
            )
            if name == final:
                matrix = confusion_matrix(data.labels, predictions, len(labels))
                table = format_confusion(matrix, labels)
                print(f"confusion matrix ({name}):\n{table}")
                with storage.open(storage.join(run_dir, "confusion.txt"), "w") as f:
                    f.write(f"{name} split\n{table}\n")
                with storage.open(storage.join(run_dir, "confusion.json"), "w") as f:
                    json.dump({"split": name, "labels": labels, "matrix": matrix.tolist()}, f, indent=2)
        saved = params if self.ft.lora is not None else {**params, "model": full_backbone(params, frozen)}
        save_tree(storage.join(run_dir, CLASSIFIER_FILE), saved)
        return out


def train_classifier(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    """Finetune a classifier; returns the summary (also written to summary.json)."""
    return fit(Classification(experiment, ft))


@dataclass
class Classifier:
    """A finished classification run, ready to label texts."""

    experiment: Experiment
    finetune: FinetuneConfig
    trainable: Params
    frozen: Params
    labels: list[str]
    tokenizer: Any

    def predict(self, texts: Sequence[str]) -> list[str]:
        ft = dataclasses.replace(self.finetune, truncate=True)
        rows = [(i + 1, {ft.text_column: t, ft.label_column: self.labels[0]}) for i, t in enumerate(texts)]
        data = encode_classify(rows, "<texts>", self.tokenizer, ft, self.labels)
        _, predictions = _split_logits(self.experiment, self.finetune)(self.trainable, self.frozen, data)
        return [self.labels[i] for i in predictions]


def load_classifier(run_dir: str) -> Classifier:
    experiment, ft = read_run(run_dir)
    if ft is None or ft.task != "classify":
        raise CheckpointError(f"{run_dir} is not a classification run")
    trainable = load_tree(storage.join(run_dir, CLASSIFIER_FILE))
    frozen: Params = {}
    if ft.lora is not None:
        _, base = load_base(experiment)
        frozen = {"model": {k: v for k, v in base.items() if k != "lm_head"}}
    labels = json.loads(storage.read_text(storage.join(run_dir, LABELS_FILE)))["labels"]
    return Classifier(experiment, ft, trainable, frozen, labels, load_tokenizer(experiment))
