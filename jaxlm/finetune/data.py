"""Finetuning inputs: reading CSV/TSV/JSONL files, encoding classification examples and instruction
templates into token ids, packing rows, and the training and evaluation batches."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlm.errors import DataError
from jaxlm.finetune.config import ROLES, FinetuneConfig


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


def classify_epoch(data: ClassifySplit, seed: int, epoch: int, balanced: bool) -> dict[str, np.ndarray]:
    """One epoch of training examples: all of them shuffled, or (balanced) as many draws of a uniformly chosen
    class and then an example of it. A pure function of (seed, epoch), so a resumed run sees the same batches."""
    rng = np.random.default_rng([seed, epoch])
    if balanced:
        by_class = [np.flatnonzero(data.labels == c) for c in range(int(data.labels.max()) + 1)]
        by_class = [members for members in by_class if len(members)]
        classes = rng.integers(0, len(by_class), len(data))
        pick = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes])
    else:
        pick = rng.permutation(len(data))
    return {"tokens": data.tokens[pick], "lengths": data.lengths[pick], "labels": data.labels[pick]}


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


def instruct_epoch(data: InstructSplit, ft: FinetuneConfig, pad_id: int, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """One epoch of training rows: the examples shuffled (a pure function of seed and epoch), then padded or
    packed into rows."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    return pack_rows([data.ids[i] for i in order], [data.weights[i] for i in order], ft.max_len, pad_id, ft.pack)


class EpochBatches:
    """Endless training batches from epochs of rows (`epoch_rows(e)`, a pure function of e); a batch that
    outruns an epoch continues into the next. Its position (epoch, row) is saved with every checkpoint.

    Every process computes the same global batch and keeps its own slice of the rows.
    """

    def __init__(self, epoch_rows, batch_size: int, process_index: int = 0, process_count: int = 1):
        self.epoch_rows, self.batch_size = epoch_rows, batch_size
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.offset = 0, 0
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def _rows(self) -> dict[str, np.ndarray]:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.epoch_rows(self.epoch))
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts, need = [], self.batch_size
        while need:
            rows = self._rows()
            n = len(next(iter(rows.values())))
            if n == 0:
                raise DataError("an epoch of the training data has no rows: check the training file")
            take = min(need, n - self.offset)
            parts.append({k: v[self.offset : self.offset + take] for k, v in rows.items()})
            self.offset, need = self.offset + take, need - take
            if self.offset == n:
                self.epoch, self.offset = self.epoch + 1, 0
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return process_rows(batch, self.process_index, self.process_count)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def close(self) -> None:
        pass


def process_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global batch's rows (process i holds the i-th slice)."""
    per = len(next(iter(batch.values()))) // process_count
    return {k: v[process_index * per : (process_index + 1) * per] for k, v in batch.items()}


def fixed_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Batches of `batch_size` rows in order (the last padded by repeating row 0), with the count of real rows."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        idx = np.concatenate([np.arange(start, start + real), np.zeros(batch_size - real, np.int64)])
        yield {k: v[idx] for k, v in arrays.items()}, real
