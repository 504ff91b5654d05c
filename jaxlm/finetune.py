"""Finetuning a pretrained model: a classifier, or an assistant (instruction tuning), fully or with LoRA.

A finetuning run is an `Experiment` (model, tokenizer, optimizer, steps, batch size, seed, run directory;
`TrainConfig.init_from` names the pretrained weights: a jaxlm run directory, a checkpoint step directory, or a
Hugging Face model directory) plus a `FinetuneConfig` (the task, its files, and what is trained). An experiment
module hands both to `run_finetune`, which applies `--section.field` and `--finetune.field` overrides.

Classification: the model's final hidden state at the last token of each example (an end-of-sequence token
closes every example) goes through a linear head that replaces the LM head. Inputs are CSV, TSV or JSONL files
with a text and a label column; label ids are stored with the run (labels.json); loss and accuracy on every
split, a confusion matrix at the end (confusion.txt, confusion.json).

Instruction tuning: JSONL in the Alpaca layout (instruction, optional input, output) or the chat layout
(messages: a list of {role, content}), rendered by a prompt template; only response tokens count in the loss.
Rows hold one example each (padded) or several (packed); segment ids keep attention inside each example and
positions restart at each.

Every example starts after an end-of-sequence token, as documents do in pretraining, and responses end with one.

From the experiment: the model (replaced by the Hugging Face config when init_from is such a directory), the
data section's tokenizer fields (checked against the pretrained run's), `data.batch_size` (examples; rows when
instruction tuning), the optimizer and schedule, `train.steps`, `eval_every`, `log_every`, `seed`, `init_from`
and the run directory. Evaluation reads whole splits, so `train.eval_steps` and `data.seq_len` play no part.
Finetuning runs on one device and starts over if interrupted (runs are minutes long; a finished run is not
repeated).

What the run directory holds: config.json and finetune.json; metrics.jsonl; summary.json; for a classifier,
classifier.safetensors (the backbone and head, or with LoRA only the adapters and head) and labels.json; for an
assistant, a jaxlm checkpoint (full finetuning: every jaxlm tool loads it as a language model) or
adapters.safetensors (LoRA: `load_lm` folds them into the base weights); samples.txt.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from safetensors.numpy import load_file, save_file

from jaxlm import lora as lora_lib
from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import CheckpointError, ConfigError, DataError, JaxlmError, NonFiniteError
from jaxlm.model import Transformer, compiler_options, init_params
from jaxlm.optim import make_optimizer, make_schedule

TASKS = ("classify", "instruct")
LAYOUTS = ("auto", "alpaca", "chat")
ROLES = ("system", "user", "assistant")
FINETUNE_FILE = "finetune.json"
LABELS_FILE = "labels.json"
CLASSIFIER_FILE = "classifier.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

Params = dict[str, Any]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class FinetuneConfig:
    """What a finetuning run learns from, and which parameters it trains."""

    task: str = "classify"  # classify | instruct
    train_file: str = ""
    val_file: str = ""  # "" skips validation
    test_file: str = ""  # "" skips the test split
    text_column: str = "text"  # classify
    label_column: str = "label"  # classify
    labels: tuple[str, ...] = ()  # classify: the classes in id order; () takes the sorted labels of train_file
    balanced: bool = False  # classify: draw every class equally often
    layout: str = "auto"  # instruct: alpaca | chat | auto (each line by its fields)
    pack: bool = False  # instruct: several examples per row (attention kept inside each)
    max_len: int = 256  # tokens the model reads per example (classify: with both end tokens) or per row
    truncate: bool = True  # an example longer than max_len is cut (and counted); False: it is an error
    train_last_k: int = -1  # -1 trains everything; k >= 0 only the last k blocks, the final norm and the head
    lora_rank: int = 0  # > 0: train low-rank adapters (and the classifier head) instead of the weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    samples: int = 3  # instruct: validation prompts answered greedily at the end (samples.txt)
    sample_tokens: int = 96

    def __post_init__(self):
        _require(self.task in TASKS, f"FinetuneConfig.task={self.task!r} is not one of {', '.join(TASKS)}")
        _require(bool(self.train_file), "FinetuneConfig.train_file is empty: set --finetune.train-file")
        _require(self.layout in LAYOUTS, f"FinetuneConfig.layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")
        _require(self.max_len >= 3, f"FinetuneConfig.max_len must be at least 3, got {self.max_len}")
        _require(
            self.train_last_k >= -1, f"FinetuneConfig.train_last_k must be -1 (all) or >= 0, got {self.train_last_k}"
        )
        _require(self.lora_rank >= 0, f"FinetuneConfig.lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        _require(
            self.lora_rank == 0 or self.train_last_k == -1,
            "FinetuneConfig.lora_rank and train_last_k are alternatives: set one of them",
        )
        _require(self.samples >= 0, f"FinetuneConfig.samples must be >= 0, got {self.samples}")
        _require(self.sample_tokens > 0, f"FinetuneConfig.sample_tokens must be positive, got {self.sample_tokens}")
        _require(
            not self.balanced or self.task == "classify", "FinetuneConfig.balanced applies to --finetune.task classify"
        )
        _require(not self.pack or self.task == "instruct", "FinetuneConfig.pack applies to --finetune.task instruct")
        _require(len(set(self.labels)) == len(self.labels), f"FinetuneConfig.labels repeats a label: {self.labels}")
        _require(len(self.labels) != 1, "FinetuneConfig.labels needs at least two classes")
        _ = self.lora  # building the spec runs its checks

    @property
    def lora(self) -> lora_lib.LoraSpec | None:
        if self.lora_rank == 0:
            return None
        return lora_lib.LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _require(not unknown, f"unknown finetune fields: {', '.join(sorted(unknown))}")
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})


# ------------------------------------------------------------------------------------------------- input files


def _where(path: str, line: int) -> str:
    return f"{path}:{line}"


def read_table(path: str, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) of each record of a .csv, .tsv or .jsonl file; every column is required."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: check the file path")
    ext = os.path.splitext(path)[1].lower()
    rows: list[tuple[int, dict[str, str]]] = []
    if ext in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            header = reader.fieldnames or []
            for column in columns:
                if column not in header:
                    raise DataError(
                        f"{path} has no column {column!r} (its columns: {', '.join(header) or 'none'}): "
                        "name the right one with --finetune.text-column / --finetune.label-column"
                    )
            for record in reader:
                values = {c: record[c] for c in columns}
                if any(v is None for v in values.values()):
                    raise DataError(f"{_where(path, reader.line_num)}: the row has fewer fields than the header")
                rows.append((reader.line_num, values))
    elif ext == ".jsonl":
        for line_no, record in read_jsonl(path):
            missing = [c for c in columns if c not in record]
            if missing:
                raise DataError(f"{_where(path, line_no)}: missing field {missing[0]!r}")
            for c in columns:
                if record[c] is None or isinstance(record[c], (list, dict)):
                    raise DataError(f"{_where(path, line_no)}: field {c!r} must be a string or a number")
            rows.append((line_no, {c: str(record[c]) for c in columns}))
    else:
        raise DataError(f"{path}: unknown file type {ext or '(none)'}: use .csv, .tsv or .jsonl")
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is an error."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: check the file path")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{_where(path, line_no)}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{_where(path, line_no)}: expected a JSON object, got {type(record).__name__}")
            out.append((line_no, record))
    if not out:
        raise DataError(f"{path} holds no examples")
    return out


# ----------------------------------------------------------------------------------------------- classification


@dataclass
class ClassifySplit:
    """Examples as right-padded token rows: tokens [N, max_len], lengths [N] (real tokens), labels [N]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.labels)


def label_ids(rows: list[tuple[int, dict[str, str]]], label_column: str, given: Sequence[str]) -> list[str]:
    """The classes in id order: `given`, or the sorted labels of the training rows. Each must have an example."""
    seen = [r[label_column] for _, r in rows]
    counts = {label: seen.count(label) for label in set(seen)}
    labels = list(given) if given else sorted(counts)
    for label in labels:
        if counts.get(label, 0) == 0:
            raise DataError(
                f"class {label!r} has no training example: add examples of it or drop it from --finetune.labels"
            )
    if len(labels) < 2:
        raise DataError(f"the training file has a single class ({labels[0]!r}): a classifier needs at least two")
    return labels


def encode_classify(
    rows: list[tuple[int, dict[str, str]]], path: str, tokenizer: Any, ft: FinetuneConfig, labels: Sequence[str]
) -> ClassifySplit:
    index = {label: i for i, label in enumerate(labels)}
    n = len(rows)
    tokens = np.full((n, ft.max_len), tokenizer.pad_id, np.int32)
    lengths = np.zeros(n, np.int32)
    ids = np.zeros(n, np.int32)
    truncated = 0
    eos = tokenizer.eos_id
    texts = [r[ft.text_column] for _, r in rows]
    for i, ((line, record), text_ids) in enumerate(zip(rows, tokenizer.encode_batch(texts))):
        label = record[ft.label_column]
        if label not in index:
            raise DataError(
                f"{_where(path, line)}: unknown label {label!r}; the classes are {', '.join(map(repr, labels))}"
            )
        seq = [eos, *text_ids, eos]
        if len(seq) > ft.max_len:
            if not ft.truncate:
                raise DataError(
                    f"{_where(path, line)}: the example is {len(seq)} tokens, longer than max_len={ft.max_len}: "
                    "raise --finetune.max-len or set --finetune.truncate"
                )
            seq = seq[: ft.max_len - 1] + [eos]
            truncated += 1
        tokens[i, : len(seq)] = seq
        lengths[i] = len(seq)
        ids[i] = index[label]
    return ClassifySplit(tokens, lengths, ids, truncated)


def classify_batches(
    data: ClassifySplit, batch_size: int, seed: int, balanced: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches: shuffled epochs, or (balanced) a uniformly drawn class and then an example of it."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(data.labels == c) for c in range(int(data.labels.max()) + 1)]
    by_class = [members for members in by_class if len(members)]
    order = np.zeros(0, np.int64)
    while True:
        if balanced:
            classes = rng.integers(0, len(by_class), batch_size)
            pick = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes])
        else:
            while len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(data))])
            pick, order = order[:batch_size], order[batch_size:]
        yield {"tokens": data.tokens[pick], "lengths": data.lengths[pick], "labels": data.labels[pick]}


# ----------------------------------------------------------------------------------------- instruction tuning


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca template up to the response, which follows it directly."""
    text = f"### Instruction:\n{instruction}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    return text + "### Response:\n"


def _role_header(role: str) -> str:
    return f"### {role.capitalize()}:\n"


def _open_reply(messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    return _chat_segments([*messages, {"role": "assistant", "content": ""}])[:-1]


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The chat template's text for a conversation so far, ending where the assistant's next reply begins.

    In token ids each assistant reply is also followed by the end-of-sequence token: encode a conversation
    with `chat_prompt_ids`, not by encoding this text.
    """
    return "".join(text for text, _ in _open_reply(messages))


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation so far, exactly as training encoded it, ready for the assistant's reply."""
    return prompt_ids(tokenizer, _open_reply(messages))


def prompt_ids(tokenizer: Any, prompt: str | Sequence[tuple[str, bool]]) -> list[int]:
    """Token ids of a prompt (text, or template segments) as the finetuned model saw prompts in training."""
    segments = [(prompt, False)] if isinstance(prompt, str) else prompt
    ids, _ = encode_segments(tokenizer, segments)
    return ids


def _chat_segments(messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [(_role_header("assistant"), False), (m["content"], True)]
        else:
            segments.append((f"{_role_header(m['role'])}{m['content']}\n\n", False))
    return segments


def template_segments(record: dict[str, Any], layout: str, where: str) -> tuple[str, list[tuple[str, bool]]]:
    """(the layout used, [(text, counts in the loss)]) of one JSONL record."""
    if layout == "auto":
        layout = "chat" if "messages" in record else "alpaca" if "instruction" in record else ""
        if not layout:
            raise DataError(f"{where}: neither 'instruction' (Alpaca layout) nor 'messages' (chat layout) is present")
    if layout == "alpaca":
        for key in ("instruction", "output"):
            if key not in record:
                raise DataError(f"{where}: missing field {key!r} (Alpaca layout: instruction, optional input, output)")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: field {key!r} must be a string")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string")
        return layout, [(alpaca_prompt(record["instruction"], extra), False), (record["output"], True)]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: missing field 'messages' (chat layout: a list of {{role, content}} objects)")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return layout, _chat_segments(messages)


def encode_segments(tokenizer: Any, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids (starting with end-of-sequence; each trained segment closed by one) and a 0/1 loss weight per id."""
    ids, weights = [tokenizer.eos_id], [0]
    for text, trained in segments:
        piece = list(tokenizer.encode(text)) if text else []
        if trained:
            piece.append(tokenizer.eos_id)
        ids += piece
        weights += [int(trained)] * len(piece)
    return ids, weights


@dataclass
class InstructSplit:
    """Encoded examples (token ids and loss weights per id), the layout of each, and how many were cut."""

    ids: list[np.ndarray]
    weights: list[np.ndarray]
    prompts: list[list[tuple[str, bool]]]  # the segments before the first trained one
    responses: list[str]
    truncated: int
    dropped: int
    layouts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


def read_instruct(path: str, tokenizer: Any, ft: FinetuneConfig) -> InstructSplit:
    limit = ft.max_len + 1  # a row reads max_len tokens and predicts the next of each
    out = InstructSplit([], [], [], [], 0, 0, ())
    layouts = set()
    for line, record in read_jsonl(path):
        layout, segments = template_segments(record, ft.layout, _where(path, line))
        layouts.add(layout)
        ids, weights = encode_segments(tokenizer, segments)
        if len(ids) > limit:
            if not ft.truncate:
                raise DataError(
                    f"{_where(path, line)}: the example is {len(ids)} tokens, longer than max_len+1={limit}: "
                    "raise --finetune.max-len or set --finetune.truncate"
                )
            ids, weights = ids[:limit], weights[:limit]
            out.truncated += 1
            if sum(weights[1:]) == 0:
                out.dropped += 1  # nothing of the response is left to learn from
                continue
        first = next(i for i, (_, trained) in enumerate(segments) if trained)
        out.ids.append(np.asarray(ids, np.int32))
        out.weights.append(np.asarray(weights, np.float32))
        out.prompts.append(list(segments[:first]))
        out.responses.append(segments[first][0])
    if not out.ids:
        raise DataError(f"{path}: every example was longer than max_len={ft.max_len}: raise --finetune.max-len")
    out.layouts = tuple(sorted(layouts))
    return out


def pack_rows(
    ids: Sequence[np.ndarray], weights: Sequence[np.ndarray], width: int, pad_id: int, pack: bool
) -> dict[str, np.ndarray]:
    """Rows of `width` inputs: one example each, or (pack) as many whole examples as fit, in order.

    An example of n ids gives n - 1 (input, target) pairs; segment ids (1, 2, ... within a row; 0 padding) keep
    attention inside each example, and positions restart at 0 for each.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, seq in enumerate(ids):
        n = len(seq) - 1
        if current and (not pack or used + n > width):
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    R = len(rows)
    out = {
        "inputs": np.full((R, width), pad_id, np.int32), "targets": np.full((R, width), pad_id, np.int32),
        "weights": np.zeros((R, width), np.float32), "segment_ids": np.zeros((R, width), np.int32),
        "positions": np.zeros((R, width), np.int32),
    }
    for r, members in enumerate(rows):
        start = 0
        for s, i in enumerate(members, 1):
            seq, w = ids[i], weights[i]
            n = len(seq) - 1
            sl = slice(start, start + n)
            out["inputs"][r, sl], out["targets"][r, sl], out["weights"][r, sl] = seq[:-1], seq[1:], w[1:]
            out["segment_ids"][r, sl] = s
            out["positions"][r, sl] = np.arange(n)
            start += n
    return out


def instruct_batches(data: InstructSplit, ft: FinetuneConfig, batch_size: int, pad_id: int, seed: int):
    """Endless training batches: each epoch shuffles the examples, then pads or packs them into rows."""
    rng = np.random.default_rng(seed)
    pending: dict[str, np.ndarray] | None = None
    while True:
        order = rng.permutation(len(data))
        rows = pack_rows([data.ids[i] for i in order], [data.weights[i] for i in order], ft.max_len, pad_id, ft.pack)
        pending = rows if pending is None else {k: np.concatenate([pending[k], rows[k]]) for k in rows}
        while len(pending["inputs"]) >= batch_size:
            yield {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}


def _fixed_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Batches of `batch_size` rows in order (the last padded by repeating row 0), with the count of real rows."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        idx = np.concatenate([np.arange(start, start + real), np.zeros(batch_size - real, np.int64)])
        yield {k: v[idx] for k, v in arrays.items()}, real


# -------------------------------------------------------------------------------------------------- the model


def _is_output_projection(context) -> bool:
    module = context.module
    if not isinstance(module.parent, Transformer):
        return False
    return (module.name == "embed" and context.method_name == "attend") or (
        module.name == "lm_head" and context.method_name == "__call__"
    )


def _skip_output_projection(next_fn, args, kwargs, context):
    # The final-normed hidden states are the output projection's input: return them instead of logits.
    if _is_output_projection(context):
        return args[0]
    return next_fn(*args, **kwargs)


def apply_model(
    cfg: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    lora: Params | None = None,
    lora_spec: lora_lib.LoraSpec | None = None,
    rng: jax.Array | None = None,
    hidden: bool = False,
) -> jax.Array:
    """Logits [B, T, V], or with `hidden` the final hidden states [B, T, D] (float32), optionally through LoRA
    adapters. With `rng` dropout is on (the model's and the adapters')."""
    variables = {"params": params if lora is None else lora_lib.attach(params, lora)}
    with contextlib.ExitStack() as stack:
        if lora is not None:
            stack.enter_context(nn.intercept_methods(lora_lib.interceptor(lora_spec, deterministic=rng is None)))
        if hidden:
            stack.enter_context(nn.intercept_methods(_skip_output_projection))
        return Transformer(cfg).apply(
            variables, tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
            deterministic=rng is None, rngs={"dropout": rng} if rng is not None else {},
        )


def _parts(trainable: Params, frozen: Params) -> tuple[Params, Params | None, Params | None]:
    """(backbone params, adapters or None, classifier head or None) of a split parameter set; the backbone's
    top-level entries may lie partly in `trainable` and partly in `frozen`."""
    backbone = {**frozen.get("model", {}), **trainable.get("model", {})}
    return backbone, trainable.get("lora"), trainable.get("head")


def full_backbone(trainable: Params, frozen: Params) -> Params:
    return _parts(trainable, frozen)[0]


def classifier_logits(
    cfg, trainable: Params, frozen: Params, tokens_BT, lengths_B, lora_spec=None, rng=None
) -> jax.Array:
    """Class logits [B, C] from the hidden state at each row's last real token."""
    backbone, adapters, head = _parts(trainable, frozen)
    hidden_BTD = apply_model(cfg, backbone, tokens_BT, lora=adapters, lora_spec=lora_spec, rng=rng, hidden=True)
    last_BD = jnp.take_along_axis(hidden_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BD @ head["kernel"] + head["bias"]


def response_losses(cfg, trainable: Params, frozen: Params, batch, lora_spec=None, rng=None):
    """Sum of cross-entropies over response targets (loss weight 1), and their count."""
    backbone, adapters, _ = _parts(trainable, frozen)
    logits_BTV = apply_model(
        cfg, backbone, batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
        lora=adapters, lora_spec=lora_spec, rng=rng,
    )
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return jnp.sum(losses_BT * batch["weights"]), jnp.sum(batch["weights"])


# -------------------------------------------------------------------------------------------- pretrained weights


def is_hf_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS)


def load_base(experiment: Experiment) -> tuple[Experiment, Params]:
    """The experiment (its model taken from a Hugging Face directory when init_from is one) and the starting
    params: those of TrainConfig.init_from, or a fresh initialisation when it is empty."""
    path = experiment.train.init_from
    if not path:
        fresh = jax.jit(lambda key: init_params(experiment.model, key))
        return experiment, fresh(jax.random.key(experiment.train.seed))
    if os.path.isdir(path) and is_hf_dir(path):
        from jaxlm.hf import load_hf

        cfg, params = load_hf(path)
        cfg = dataclasses.replace(cfg, dropout=experiment.model.dropout, remat=experiment.model.remat)
        return dataclasses.replace(experiment, model=cfg), params
    from jaxlm.checkpoint import load_params

    if not os.path.exists(path):
        raise CheckpointError(f"init_from {path} does not exist: train that run first, or fix --train.init-from")
    source, params = load_params(path)
    mine, theirs = _tokenizer_identity(experiment.data), _tokenizer_identity(source.data)
    for field in theirs:
        if mine.get(field) != theirs[field]:
            raise ConfigError(
                f"init_from {path} was trained with data.{field}={theirs[field]!r}, this run has "
                f"{getattr(experiment.data, field)!r}: token ids would mean different things; use the pretrained "
                "run's data config"
            )
    expected = jax.eval_shape(lambda: init_params(experiment.model, jax.random.key(0), seq_len=1))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != got:
        name, shape = sorted(set(want.items()) ^ set(got.items()))[0]
        raise CheckpointError(
            f"init_from {path}: parameter {name} does not match this run's model ({shape}): use the pretrained "
            "run's model config (its config.json)"
        )
    return experiment, params


def _tokenizer_identity(data) -> dict[str, Any]:
    """The data settings that decide which token id means what."""
    if data.tokenizer == "byte" or data.tokenizer.endswith(".model"):
        return {"tokenizer": data.tokenizer}
    fields = ["tokenizer", "source", "val_fraction", "text_field", "train_split"]
    if data.tokenizer.startswith("sentencepiece-"):
        fields += ["vocab_size", "tokenizer_sample_bytes"]
    return {f: getattr(data, f) for f in fields}


def load_tokenizer(experiment: Experiment):
    """The run's tokenizer; byte and .model tokenizers load directly, trained ones come from their corpus cache."""
    from jaxlm.data.tokenizer import ByteTokenizer, load_sentencepiece

    kind = experiment.data.tokenizer
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind.endswith(".model"):
        tokenizer = load_sentencepiece(kind)
    else:
        from jaxlm.data import prepare_data

        tokenizer = prepare_data(experiment.data).tokenizer
    if tokenizer.vocab_size > experiment.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {experiment.model.vocab_size}: "
            "use the pretrained run's data config"
        )
    return tokenizer


# -------------------------------------------------------------------------------------------- what is trained


def last_k_mask(cfg, params: Params, k: int, head_keys: tuple[str, ...] = ("lm_head",)) -> Params:
    """1/0 per parameter (per layer for scanned blocks): the last k blocks, the final norm and `head_keys`."""
    L = cfg.n_layers

    def mask(path, leaf):
        top = path[0].key
        if top == "blocks":
            layer = (np.arange(L) >= L - k).astype(np.float32)
            return layer.reshape(L, *([1] * (leaf.ndim - 1)))
        if top.startswith("block_"):
            return np.float32(int(top[len("block_"):]) >= L - k)
        return np.float32(top == "final_norm" or top in head_keys)

    return jax.tree_util.tree_map_with_path(mask, params)


def _split_trainable(
    experiment: Experiment, ft: FinetuneConfig, backbone: Params, head: Params | None, rng: jax.Array
) -> tuple[Params, Params, Params | None]:
    """(trainable, frozen, update mask or None) for full, last-k or LoRA finetuning."""
    spec = ft.lora
    extra = {} if head is None else {"head": head}
    if spec is not None:
        adapters = lora_lib.init_lora(experiment.model, backbone, spec, rng)
        return {"lora": adapters, **extra}, {"model": backbone}, None
    trainable = {"model": backbone, **extra}
    if ft.train_last_k < 0:
        return trainable, {}, None
    if ft.train_last_k > experiment.model.n_layers:
        raise ConfigError(
            f"FinetuneConfig.train_last_k={ft.train_last_k} exceeds the model's {experiment.model.n_layers} blocks"
        )
    layer_mask = last_k_mask(experiment.model, backbone, ft.train_last_k)
    # Entries with nothing to train (embeddings, early unscanned blocks) leave the gradient computation entirely;
    # the scanned blocks share one array per parameter, so there the mask picks the trained layers.
    moving = {k for k, m in layer_mask.items() if any(np.any(x) for x in jax.tree.leaves(m))}
    trainable = {"model": {k: v for k, v in backbone.items() if k in moving}, **extra}
    frozen = {"model": {k: v for k, v in backbone.items() if k not in moving}}
    mask = {"model": {k: m for k, m in layer_mask.items() if k in moving}}
    if head is not None:
        mask["head"] = jax.tree.map(lambda _: np.float32(1), head)
    return trainable, frozen, mask


def count_trainable(trainable: Params, mask: Params | None) -> int:
    if mask is None:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return sum(
        int(np.sum(np.broadcast_to(m, x.shape))) for x, m in zip(jax.tree.leaves(trainable), jax.tree.leaves(mask))
    )


# ------------------------------------------------------------------------------------------------------- loop


def _make_step(experiment: Experiment, loss_fn: Callable, mask: Params | None):
    """(state, frozen, batch) -> (state, metrics): one AdamW update of the trainable params, masked if asked."""
    tx = make_optimizer(experiment.optim, experiment.train.steps)
    schedule = make_schedule(experiment.optim, experiment.train.steps)
    seed = experiment.train.seed

    def apply_mask(tree):
        return tree if mask is None else jax.tree.map(lambda x, m: x * m, tree, mask)

    def step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.key(seed + 1), state["step"])
        (loss_sum, count), grads = jax.value_and_grad(
            lambda t: loss_fn(t, frozen, batch, rng), has_aux=True
        )(state["params"])
        count = jnp.maximum(count, 1.0)
        grads = apply_mask(jax.tree.map(lambda g: g / count, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        # Masked parameters must not move at all, which weight decay alone would make them do.
        params = optax.apply_updates(state["params"], apply_mask(updates))
        metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return tx, step


class _Metrics:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        open(self.path, "w").close()

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _fit(
    experiment: Experiment,
    trainable: Params,
    frozen: Params,
    mask: Params | None,
    loss_fn: Callable,
    batches: Iterator[dict[str, np.ndarray]],
    evaluate: Callable[[Params], dict[str, float]],
    metrics: _Metrics,
) -> tuple[Params, Any]:
    """Train for TrainConfig.steps; evaluate every eval_every steps and at the end. Returns (params, opt_state)."""
    from tqdm import tqdm

    tx, step_fn = _make_step(experiment, loss_fn, mask)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
    step_fn = jax.jit(step_fn, donate_argnums=0, compiler_options=compiler_options())
    steps, tc = experiment.train.steps, experiment.train
    with tqdm(total=steps, desc=experiment.name, dynamic_ncols=True) as bar:
        for step in range(1, steps + 1):
            state, m = step_fn(state, frozen, next(batches))
            bar.update(1)
            if step % tc.log_every == 0 or step == steps:
                m = jax.device_get(m)
                if not math.isfinite(float(m["loss"])):
                    raise NonFiniteError(
                        f"non-finite loss {float(m['loss'])} at step {step}: lower --optim.lr or raise "
                        "--optim.warmup-steps"
                    )
                metrics.write({"step": step, **{k: float(v) for k, v in m.items()}})
                bar.set_postfix(loss=f"{float(m['loss']):.3f}")
            if step % tc.eval_every == 0 or step == steps:
                row = evaluate(state["params"])
                if row:
                    metrics.write({"step": step, **row})
                    bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return state["params"], state["opt_state"]


# ---------------------------------------------------------------------------------------------- run directory


def _begin(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any] | None:
    """Write (or check) the run's configs; returns the summary of an already finished identical run."""
    from jaxlm.checkpoint import write_or_check_config

    run_dir = experiment.run_dir
    write_or_check_config(experiment)
    path = os.path.join(run_dir, FINETUNE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(ft.to_dict())):
            changed = [k for k in ft.to_dict() if old.get(k) != json.loads(json.dumps(ft.to_dict()[k]))]
            raise CheckpointError(
                f"{run_dir} holds a finetuning run of another config (finetune.{', finetune.'.join(changed[:3])}): "
                "use a new --train.out-dir, or delete the old run directory"
            )
    else:
        with open(path, "w") as f:
            json.dump(ft.to_dict(), f, indent=2)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            print(f"{run_dir} is finished; delete it or use a new --train.out-dir to run again")
            return json.load(f)
    return None


def _flatten(tree: Params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten(flat: dict[str, np.ndarray]) -> Params:
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree


def save_tree(path: str, tree: Params) -> None:
    tmp = path + ".tmp"
    save_file(_flatten(tree), tmp)
    os.replace(tmp, path)


def load_tree(path: str) -> Params:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: is this a finished finetuning run?")
    return _unflatten(load_file(path))


def _write_summary(run_dir: str, summary: dict[str, Any]) -> None:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _check_common(experiment: Experiment, ft: FinetuneConfig) -> None:
    _require(experiment.train.grad_accum == 1, "finetuning does not accumulate gradients: set --train.grad-accum 1")
    _require(
        ft.max_len <= experiment.model.max_seq_len,
        f"FinetuneConfig.max_len={ft.max_len} is beyond the model's context of {experiment.model.max_seq_len}: "
        f"lower --finetune.max-len",
    )


# ------------------------------------------------------------------------------------------------ classification


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
        print(f"{name}: {len(data)} examples ({', '.join(f'{l} {c}' for l, c in zip(labels, counts))}){cut}")

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


def _uses_dropout(experiment: Experiment, ft: FinetuneConfig) -> bool:
    return experiment.model.dropout > 0 or (ft.lora is not None and ft.lora.dropout > 0)


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


def _read_run(path: str) -> tuple[Experiment, FinetuneConfig | None]:
    from jaxlm.checkpoint import read_config

    experiment = read_config(path)
    if experiment is None:
        raise CheckpointError(f"{path} is not a jaxlm run directory (no config.json)")
    ft_path = os.path.join(path, FINETUNE_FILE)
    if not os.path.exists(ft_path):
        return experiment, None
    with open(ft_path) as f:
        return experiment, FinetuneConfig.from_dict(json.load(f))


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


def user_prompt(text: str, layout: str = "chat") -> str:
    """A single user request in the given layout's template, ready for the model's answer."""
    if layout == "alpaca":
        return alpaca_prompt(text)
    return chat_prompt([{"role": "user", "content": text}])


# ----------------------------------------------------------------------------------------------- command line


def train_finetune(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    if ft.task == "classify":
        return train_classifier(experiment, ft)
    return train_instruct(experiment, ft)


@dataclass(frozen=True)
class _Command:
    experiment: Annotated[Experiment, tyro.conf.arg(name="")]
    finetune: FinetuneConfig


def parse(
    experiment: Experiment, ft: FinetuneConfig, argv: Sequence[str] | None = None
) -> tuple[Experiment, FinetuneConfig]:
    """The configs a command line asks for: `--section.field` for the experiment, `--finetune.field` for ft."""
    main = sys.modules.get("__main__")
    doc = (getattr(main, "__doc__", None) or "").strip().split("\n\n")[0]
    argv = list(sys.argv[1:] if argv is None else argv)
    command = tyro.cli(_Command, default=_Command(experiment, ft), args=argv, description=doc)
    return command.experiment, command.finetune


def run_finetune(
    experiment: Experiment,
    ft: FinetuneConfig,
    argv: Sequence[str] | None = None,
    prepare: Callable[[Experiment, FinetuneConfig], None] | None = None,
) -> dict[str, Any]:
    """Parse overrides, call `prepare` (an experiment's own set-up, e.g. building its data files) with the
    parsed configs, and run. Errors a user can fix print one line on stderr and exit with status 2."""
    try:
        experiment, ft = parse(experiment, ft, argv)
        if prepare is not None:
            prepare(experiment, ft)
        return train_finetune(experiment, ft)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finetuning runs start over; delete the run directory or use a new --train.out-dir",
              file=sys.stderr)
        sys.exit(130)
