"""Evaluation of a language model: loss, perplexity and bits per byte on a corpus split; multiple-choice scoring.

Loss is the mean next-token cross-entropy (nats) over every target of the packed rows the input pipeline makes
(documents joined by end-of-document tokens, as in training); perplexity is exp(loss); bits per byte divides the
loss by ln 2 and by the split's bytes per token (UTF-8 bytes of its documents over their tokens), the convention
the training loop's `val_bpb` follows, so the two are comparable and independent of the tokenizer.

Multiple choice (the HellaSwag layout: `ctx`, `endings`, `label` per JSONL line): each ending is scored by its
log-likelihood given the context, log p(ending | context) = sum over its tokens; the prediction is the ending
with the highest sum (`accuracy`), or the highest sum per character of the ending (`accuracy_norm`, the
length normalisation of the common evaluation harnesses, which removes the bias toward short endings). The
context starts after an end-of-document token, like every document in training, and an ending follows it after
one space (unless either side already has one). A context too long for the model loses its earliest tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import DataConfig, Experiment, ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.model import Transformer, bits_per_byte, forward

SPLITS = ("train", "validation")


# -------------------------------------------------------------------------------------------- language modelling


def data_config_for(experiment: Experiment, source: str = "", split: str = "validation") -> tuple[DataConfig, str]:
    """The data config and pipeline split that read `split` of `source` (default: the run's own corpus) with the
    run's own tokenizer."""
    from jaxlm.data import prepare_data

    data = experiment.data
    if source and source != data.source:
        kind = data.tokenizer
        if kind == "char":
            raise ConfigError(
                "a char tokenizer only covers its own corpus's characters: evaluate on the run's --source"
            )
        if kind.startswith("sentencepiece-"):
            tokenizer = prepare_data(data).tokenizer
            kind = os.path.join(data.resolved_cache_dir, "tokenizers", tokenizer.name)
            if not os.path.isfile(kind):
                raise ConfigError(f"the run's tokenizer file {kind} is missing: prepare the run's corpus first")
        data = dataclasses.replace(data, source=source, tokenizer=kind)
    if split not in SPLITS:
        if not data.source.startswith("tfds:"):
            raise DataError(f"split {split!r}: a local corpus has the splits {', '.join(SPLITS)}")
        data, split = dataclasses.replace(data, val_split=split), "validation"
    return data, split


@functools.partial(jax.jit, static_argnames="cfg")
def _token_losses(cfg: ModelConfig, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return Transformer(cfg).apply(
        {"params": params}, batch["inputs"], positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"), loss_batch=batch,
    )


def lm_metrics(
    experiment: Experiment,
    params: Any,
    *,
    split: str = "validation",
    source: str = "",
    batches: int = 0,
    batch_size: int = 0,
    seq_len: int = 0,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte over `batches` batches of a split (0: the whole split, one epoch).

    The rows are read in a random order fixed by the data, so that a few batches sample the whole split; the
    train loop's evaluation reads the same rows (its `eval_steps` batches are the first ones here)."""
    from jaxlm.data import make_iterator, prepare_data

    if batches < 0:
        raise ConfigError(f"batches must be >= 0 (0: the whole split), got {batches}")
    data, pipeline_split = data_config_for(experiment, source, split)
    overrides = {k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v}
    data = dataclasses.replace(data, **overrides)
    cfg = dataclasses.replace(experiment.model, remat="none")
    if data.seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len={data.seq_len} is beyond the model's context of {cfg.max_seq_len}")
    prepared = prepare_data(data)
    if prepared.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {prepared.vocab_size} tokens, the model only {cfg.vocab_size}")
    it = make_iterator(data, prepared, split=pipeline_split, seed=0, epochs=None if batches else 1, shuffle_rows=True)
    total, count, n = 0.0, 0.0, 0
    try:
        for batch in it:
            s, c = _token_losses(cfg, params, batch)
            total, count, n = total + float(s), count + float(c), n + 1
            if batches and n >= batches:
                break
    finally:
        it.close()
    loss = total / count
    bytes_per_token = prepared.stats[pipeline_split]["bytes_per_token"]
    return {
        "source": data.source, "split": split, "batches": n, "tokens": int(count), "loss": loss,
        "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte(loss, bytes_per_token),
        "bytes_per_token": bytes_per_token,
    }


# ----------------------------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    endings: tuple[str, ...]
    label: int


def read_choices(path: str) -> list[ChoiceItem]:
    """Items of a JSONL file in the HellaSwag layout: `ctx` (str), `endings` (list of str), `label` (index)."""
    from jaxlm.finetune.data import read_jsonl

    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: give a .jsonl file with ctx, endings and label on each line")
    items = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        for key in ("ctx", "endings", "label"):
            if key not in record:
                raise DataError(f"{where}: missing field {key!r} (each line needs ctx, endings and label)")
        ctx, endings, label = record["ctx"], record["endings"], record["label"]
        if not isinstance(ctx, str):
            raise DataError(f"{where}: ctx must be a string")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise DataError(f"{where}: endings must be a list of at least two non-empty strings")
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {label!r} is not an index into endings") from None
        if not 0 <= label < len(endings):
            raise DataError(f"{where}: label {label} is outside the {len(endings)} endings")
        items.append(ChoiceItem(ctx, tuple(endings), label))
    return items


def continuation(context: str, ending: str) -> str:
    """The text that follows the context: the ending, after a space unless either side has one already."""
    joined = not context or context[-1].isspace() or ending[0].isspace()
    return ending if joined else " " + ending


@functools.partial(jax.jit, static_argnames="cfg")
def _row_logprobs(cfg: ModelConfig, params: Any, inputs_BT, targets_BT, weights_BT):
    logits_BTV = forward(cfg, params, inputs_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(picked_BT * weights_BT, axis=-1)


def ending_logprobs(
    cfg: ModelConfig, params: Any, tokenizer: Any, items: Sequence[ChoiceItem], batch_size: int = 16
) -> tuple[list[np.ndarray], int]:
    """log p(ending | context) for every ending of every item, and how many contexts had to be shortened."""
    cfg = dataclasses.replace(cfg, remat="none")
    limit = cfg.max_seq_len + 1  # the model reads max_seq_len tokens and predicts the next of each
    seqs, starts, owners = [], [], []
    truncated = 0
    for i, item in enumerate(items):
        ctx_ids = [tokenizer.eos_id, *tokenizer.encode(item.context)]
        cut = False
        for ending in item.endings:
            end_ids = list(tokenizer.encode(continuation(item.context, ending)))
            if len(end_ids) >= limit:
                raise DataError(
                    f"item {i}: an ending of {len(end_ids)} tokens leaves no room for context in the model's "
                    f"{cfg.max_seq_len} positions"
                )
            ids = ctx_ids
            if len(ids) + len(end_ids) > limit:
                ids, cut = ids[len(ids) + len(end_ids) - limit :], True
            seqs.append(ids + end_ids)
            starts.append(len(ids))
            owners.append(i)
        truncated += cut
    width = min(cfg.max_seq_len, -(-max(len(s) - 1 for s in seqs) // 16) * 16)  # few shapes, few compilations
    n = len(seqs)
    rows = -(-n // batch_size) * batch_size
    inputs = np.zeros((rows, width), np.int32)
    targets = np.zeros((rows, width), np.int32)
    weights = np.zeros((rows, width), np.float32)
    for r, (seq, start) in enumerate(zip(seqs, starts)):
        inputs[r, : len(seq) - 1], targets[r, : len(seq) - 1] = seq[:-1], seq[1:]
        weights[r, start - 1 : len(seq) - 1] = 1.0  # the targets that are ending tokens
    scores = np.concatenate([
        np.asarray(_row_logprobs(cfg, params, inputs[b : b + batch_size], targets[b : b + batch_size],
                                 weights[b : b + batch_size]))
        for b in range(0, rows, batch_size)
    ])[:n]
    out: list[list[float]] = [[] for _ in items]
    for owner, score in zip(owners, scores):
        out[owner].append(float(score))
    return [np.asarray(s) for s in out], truncated


def score_choices(
    cfg: ModelConfig, params: Any, tokenizer: Any, items: Sequence[ChoiceItem], batch_size: int = 16
) -> dict[str, Any]:
    """Accuracy with the summed and with the per-character log-likelihood, and the chance level."""
    scores, truncated = ending_logprobs(cfg, params, tokenizer, items, batch_size)
    labels = np.array([item.label for item in items])
    summed = np.array([int(np.argmax(s)) for s in scores])
    chars = [np.array([len(continuation(item.context, e)) for e in item.endings]) for item in items]
    normed = np.array([int(np.argmax(s / c)) for s, c in zip(scores, chars)])
    return {
        "items": len(items), "accuracy": float(np.mean(summed == labels)),
        "accuracy_norm": float(np.mean(normed == labels)),
        "chance": float(np.mean([1 / len(item.endings) for item in items])), "truncated_contexts": truncated,
    }
