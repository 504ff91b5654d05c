"""Classification finetuning: training and evaluating a classifier head (confusion matrix included), and
`load_classifier` to use a finished run."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import Experiment
from jaxlm.errors import CheckpointError
from jaxlm.finetune.backbone import (
    _split_trainable,
    classifier_logits,
    count_trainable,
    full_backbone,
    load_base,
    load_tokenizer,
)
from jaxlm.finetune.config import CLASSIFIER_FILE, LABELS_FILE, FinetuneConfig, Params, _check_common
from jaxlm.finetune.data import (
    ClassifySplit,
    _fixed_batches,
    classify_batches,
    encode_classify,
    label_ids,
    read_table,
)
from jaxlm.finetune.loop import _fit, _Metrics, _uses_dropout
from jaxlm.finetune.rundir import _begin, _read_run, _write_summary, load_tree, save_tree


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


def _classify_eval_fn(experiment: Experiment, ft: FinetuneConfig):
    cfg, spec = experiment.model, ft.lora

    @jax.jit
    def logits(trainable, frozen, tokens, lengths):
        return classifier_logits(cfg, trainable, frozen, tokens, lengths, spec)

    def evaluate(trainable, frozen, data: ClassifySplit) -> tuple[dict[str, float], np.ndarray]:
        outs = []
        arrays = {"tokens": data.tokens, "lengths": data.lengths}
        for batch, real in _fixed_batches(arrays, experiment.data.batch_size):
            outs.append(np.asarray(logits(trainable, frozen, batch["tokens"], batch["lengths"]))[:real])
        z = np.concatenate(outs).astype(np.float64)
        log_probs = z - z.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        loss = float(-log_probs[np.arange(len(data)), data.labels].mean())
        predictions = z.argmax(-1)
        return {"loss": loss, "accuracy": float((predictions == data.labels).mean())}, predictions

    return evaluate


def train_classifier(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    """Finetune a classifier; returns the summary (also written to summary.json)."""
    experiment, backbone = load_base(experiment)
    _check_common(experiment, ft)
    finished = _begin(experiment, ft)
    if finished is not None:
        return finished
    run_dir = experiment.run_dir
    started = time.perf_counter()
    tokenizer = load_tokenizer(experiment)
    columns = (ft.text_column, ft.label_column)
    train_rows = read_table(ft.train_file, columns)
    labels = label_ids(train_rows, ft.label_column, ft.labels)
    splits = {"train": encode_classify(train_rows, ft.train_file, tokenizer, ft, labels)}
    for name, path in (("validation", ft.val_file), ("test", ft.test_file)):
        if path:
            splits[name] = encode_classify(read_table(path, columns), path, tokenizer, ft, labels)
    with open(os.path.join(run_dir, LABELS_FILE), "w") as f:
        json.dump({"labels": labels}, f, indent=2)
    for name, data in splits.items():
        counts = np.bincount(data.labels, minlength=len(labels))
        cut = f", {data.truncated} truncated to max_len={ft.max_len}" if data.truncated else ""
        print(f"{name}: {len(data)} examples ({', '.join(f'{label} {c}' for label, c in zip(labels, counts))}){cut}")

    cfg = experiment.model
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}  # replaced by the classifier head
    rng = jax.random.key(experiment.train.seed)
    head = {
        "kernel": cfg.init_std * jax.random.normal(jax.random.fold_in(rng, 1), (cfg.d_model, len(labels)), jnp.float32),
        "bias": jnp.zeros((len(labels),), jnp.float32),
    }
    trainable, frozen, mask = _split_trainable(experiment, ft, backbone, head, jax.random.fold_in(rng, 2))
    n_trainable = count_trainable(trainable, mask)
    print(f"trainable parameters: {n_trainable:,}")
    spec, dropout = ft.lora, _uses_dropout(experiment, ft)

    def loss_fn(t, fz, batch, rng):
        rng = rng if dropout else None
        logits = classifier_logits(cfg, t, fz, batch["tokens"], batch["lengths"], spec, rng)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return jnp.sum(losses), jnp.float32(losses.shape[0])

    evaluate_split = _classify_eval_fn(experiment, ft)

    def evaluate(t):
        if "validation" not in splits:
            return {}
        row, _ = evaluate_split(t, frozen, splits["validation"])
        return {"val_loss": row["loss"], "val_accuracy": row["accuracy"]}

    metrics = _Metrics(run_dir)
    batches = classify_batches(splits["train"], experiment.data.batch_size, experiment.train.seed, ft.balanced)
    trainable, _ = _fit(experiment, trainable, frozen, mask, loss_fn, batches, evaluate, metrics)

    majority = int(np.bincount(splits["train"].labels, minlength=len(labels)).argmax())
    summary: dict[str, Any] = {
        "name": experiment.name, "task": "classify", "steps": experiment.train.steps, "labels": labels,
        "trainable_params": n_trainable, "majority_class": labels[majority],
    }
    final = "test" if "test" in splits else "validation" if "validation" in splits else "train"
    for name, data in splits.items():
        row, predictions = evaluate_split(trainable, frozen, data)
        row["majority_baseline"] = float((data.labels == majority).mean())
        row["examples"] = len(data)
        summary[name] = row
        print(
            f"{name:<10} loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}  "
            f"(majority class {row['majority_baseline']:.4f}, {len(data)} examples)"
        )
        if name == final:
            matrix = confusion_matrix(data.labels, predictions, len(labels))
            table = format_confusion(matrix, labels)
            print(f"confusion matrix ({name}):\n{table}")
            with open(os.path.join(run_dir, "confusion.txt"), "w") as f:
                f.write(f"{name} split\n{table}\n")
            with open(os.path.join(run_dir, "confusion.json"), "w") as f:
                json.dump({"split": name, "labels": labels, "matrix": matrix.tolist()}, f, indent=2)
    saved = trainable if ft.lora is not None else {**trainable, "model": full_backbone(trainable, frozen)}
    save_tree(os.path.join(run_dir, CLASSIFIER_FILE), saved)
    summary["wall_s"] = time.perf_counter() - started
    _write_summary(run_dir, summary)
    return summary


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
        _, predictions = _classify_eval_fn(self.experiment, self.finetune)(self.trainable, self.frozen, data)
        return [self.labels[i] for i in predictions]


def load_classifier(run_dir: str) -> Classifier:
    experiment, ft = _read_run(run_dir)
    if ft is None or ft.task != "classify":
        raise CheckpointError(f"{run_dir} is not a classification run")
    trainable = load_tree(os.path.join(run_dir, CLASSIFIER_FILE))
    frozen: Params = {}
    if ft.lora is not None:
        _, base = load_base(experiment)
        frozen = {"model": {k: v for k, v in base.items() if k != "lm_head"}}
    with open(os.path.join(run_dir, LABELS_FILE)) as f:
        labels = json.load(f)["labels"]
    return Classifier(experiment, ft, trainable, frozen, labels, load_tokenizer(experiment))
