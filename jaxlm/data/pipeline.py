"""The input pipeline: prepare once (corpus, tokenizer, token arrays, statistics), then stream packed batches.

Preparation tokenizes every document once into a flat token array per split (cached beside the statistics).
Batches are then a pure function of (seed, batch index): epoch e visits the documents in a permutation drawn
from (seed, e), joined with an end-of-document token, and cut into rows of `seq_len + 1` tokens (the tail of an
epoch shorter than a row is dropped). Global batch k holds rows [k B, (k + 1) B) of that endless row stream, and
process p reads only rows [p B_local, (p + 1) B_local) of it. Because nothing depends on what came before, the
batches do not depend on the number of workers or processes, and the iterator state is one batch index.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from jaxlm.config import DataConfig
from jaxlm.data.corpora import Corpus, open_corpus, record_text
from jaxlm.data.tokenizer import Tokenizer, TokenizerSpec, build_tokenizer, tokenizer_key
from jaxlm.errors import DataError

SPLITS = ("train", "validation")
TOKENS_VERSION = 1  # bump when the token files change layout
_ENCODE_CHUNK = 256  # documents per sentencepiece batch call


@dataclass
class Prepared:
    """Everything `make_iterator` needs, loaded from the cache."""

    tokenizer: Tokenizer
    stats: dict[str, Any]
    corpus: Corpus
    tokens_dir: str
    fingerprint: str  # corpus and tokenizer; a checkpointed iterator state must match it

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def token_files(self, split: str) -> tuple[str, str]:
        return os.path.join(self.tokens_dir, f"{split}.tokens.npy"), os.path.join(self.tokens_dir, f"{split}.offsets.npy")


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _tokenize_split(corpus: Corpus, split: str, tokenizer: Tokenizer, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokens of every document of a split, flat, with document offsets; and the split's statistics."""
    src = corpus.source_of(split)
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    nbytes = 0
    failures = 0
    threads = max(1, min(os.cpu_count() or 1, 8))
    for start in range(0, len(src), _ENCODE_CHUNK):
        texts = [record_text(src[i], corpus.text_field) for i in range(start, min(start + _ENCODE_CHUNK, len(src)))]
        encoded = tokenizer.encode_batch(texts, num_threads=threads)
        for text, ids in zip(texts, encoded):
            if not ids:
                continue
            pieces.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
            nbytes += len(text.encode("utf-8"))
            if split == "validation" and tokenizer.decode(ids) != text:
                failures += 1
    tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stats = {
        "documents": len(lengths), "bytes": nbytes, "tokens": int(tokens.size),
        "bytes_per_token": nbytes / max(int(tokens.size), 1),
    }
    if split == "validation":
        stats["roundtrip_failures"] = failures
    return tokens, offsets, stats


def _print_stats(source: str, stats: dict[str, Any]) -> None:
    print(f"corpus {source}: tokenizer {stats['tokenizer']} (vocab {stats['vocab_size']})")
    for split in SPLITS:
        s = stats[split]
        print(
            f"  {split:<10} {s['documents']:>9,} documents {s['bytes']:>14,} bytes {s['tokens']:>13,} tokens "
            f"{s['bytes_per_token']:6.3f} bytes/token"
        )
    extra = [f"{stats['undecodable_bytes']:,} undecodable bytes (replaced with U+FFFD)"]
    if stats.get("skipped_lines"):
        extra.append(f"{stats['skipped_lines']:,} bad lines skipped")
    if stats.get("empty_documents"):
        extra.append(f"{stats['empty_documents']:,} empty documents skipped")
    extra.append(f"{stats['validation']['roundtrip_failures']} validation documents that do not round-trip")
    print("  " + "; ".join(extra))


def prepare_data(data_config: DataConfig) -> Prepared:
    """Builds (once) the corpus, the tokenizer and the token arrays; loads them from the cache afterwards."""
    corpus = open_corpus(data_config)
    cache_dir = data_config.resolved_cache_dir
    spec = TokenizerSpec(
        kind=data_config.tokenizer, vocab_size=data_config.vocab_size,
        sample_bytes=data_config.tokenizer_sample_bytes, corpus_fingerprint=corpus.fingerprint,
    )
    tokenizer, _ = build_tokenizer(
        spec, os.path.join(cache_dir, "tokenizers"), corpus.texts("train"),
        (t for split in SPLITS for t in corpus.texts(split)),
    )
    tok_key = tokenizer_key(data_config.tokenizer, data_config.vocab_size, corpus.fingerprint)
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}/{tok_key}/{TOKENS_VERSION}".encode()).hexdigest()[:16]
    tokens_dir = os.path.join(cache_dir, "tokens", fingerprint)
    prepared = Prepared(tokenizer, {}, corpus, tokens_dir, fingerprint)
    stats_path = os.path.join(tokens_dir, "stats.json")
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            prepared.stats = json.load(f)
    else:
        os.makedirs(tokens_dir, exist_ok=True)
        dtype = _token_dtype(tokenizer.vocab_size)
        stats: dict[str, Any] = {
            "source": data_config.source, "tokenizer": getattr(tokenizer, "name", data_config.tokenizer),
            "vocab_size": tokenizer.vocab_size,
        }
        for split in SPLITS:
            tokens, offsets, split_stats = _tokenize_split(corpus, split, tokenizer, dtype)
            tokens_path, offsets_path = prepared.token_files(split)
            _save_npy(tokens_path, tokens)
            _save_npy(offsets_path, offsets)
            stats[split] = split_stats
        stats["undecodable_bytes"] = sum(corpus.stats[s].get("undecodable_bytes", 0) for s in SPLITS)
        stats["skipped_lines"] = corpus.stats.get("skipped_lines", 0)
        stats["empty_documents"] = corpus.stats.get("empty_documents", 0)
        stats["train_bytes_per_token"] = stats["train"]["bytes_per_token"]
        stats["val_bytes_per_token"] = stats["validation"]["bytes_per_token"]
        tmp = f"{stats_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp, stats_path)
        prepared.stats = stats
        _print_stats(data_config.source, stats)
    for split in SPLITS:
        _check_one_batch(data_config, prepared, split)
    return prepared


def _rows_per_epoch(prepared: Prepared, split: str, seq_len: int) -> int:
    s = prepared.stats[split]
    return (s["tokens"] + s["documents"]) // (seq_len + 1)  # one end-of-document token per document


def _check_one_batch(data_config: DataConfig, prepared: Prepared, split: str) -> None:
    rows = _rows_per_epoch(prepared, split, data_config.seq_len)
    if rows < data_config.batch_size:
        s = prepared.stats[split]
        fix = "raise --data.val_fraction" if split == "validation" else "use a larger corpus"
        raise DataError(
            f"the {split} split ({s['tokens']:,} tokens) holds {rows} rows of seq_len+1={data_config.seq_len + 1} "
            f"tokens, fewer than one batch of {data_config.batch_size}: {fix}, or lower --data.batch_size or "
            "--data.seq_len"
        )


class BatchMaker:
    """Global batch index -> this process's rows, as a pure function (picklable for grain workers)."""

    def __init__(
        self, tokens_path: str, offsets_path: str, *, seed: int, seq_len: int, batch_size: int, process_index: int,
        process_count: int, eos_id: int, document_mask: bool,
    ):
        self.tokens_path, self.offsets_path = tokens_path, offsets_path
        self.seed, self.seq_len, self.batch_size = seed, seq_len, batch_size
        self.local_batch = batch_size // process_count
        self.first_row = process_index * self.local_batch
        self.eos_id, self.document_mask = eos_id, document_mask
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.rows_per_epoch = int((self._load()[0].size + self._load()[2].size) // (seq_len + 1))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_epochs"] = None, {}
        return state

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            tokens = np.load(self.tokens_path, mmap_mode="r")
            offsets = np.load(self.offsets_path)
            self._arrays = (tokens, offsets, np.diff(offsets))
        return self._arrays

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The document order of an epoch and where each document (with its end token) ends in the stream."""
        table = self._epochs.get(epoch)
        if table is None:
            lengths = self._load()[2]
            order = np.random.default_rng([self.seed, epoch]).permutation(lengths.size)
            ends = np.cumsum(lengths[order] + 1)
            if len(self._epochs) >= 2:  # a batch spans at most two epochs
                self._epochs.pop(min(self._epochs))
            table = self._epochs[epoch] = (order, ends)
        return table

    def epoch_of(self, batch_index: int) -> int:
        return (batch_index * self.batch_size) // self.rows_per_epoch

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        tokens, offsets, lengths = self._load()
        width = self.seq_len + 1
        rows = batch_index * self.batch_size + self.first_row + np.arange(self.local_batch)
        out = np.empty((self.local_batch, width), np.int32)
        slot = np.empty((self.local_batch, width), np.int64)  # which document (in epoch order) each token is from
        for epoch in np.unique(rows // self.rows_per_epoch):
            sel = rows // self.rows_per_epoch == epoch
            order, ends = self._epoch(int(epoch))
            pos = (rows[sel] % self.rows_per_epoch)[:, None] * width + np.arange(width)
            k = np.searchsorted(ends, pos, side="right")
            doc = order[k]
            within = pos - (ends[k] - lengths[doc] - 1)
            is_eos = within == lengths[doc]
            idx = offsets[doc] + np.minimum(within, lengths[doc] - 1)
            out[sel] = np.where(is_eos, self.eos_id, tokens[idx])
            slot[sel] = k + epoch * (lengths.size + 1)
        batch = {"inputs": out[:, :-1], "targets": out[:, 1:]}
        if self.document_mask:
            slot = slot[:, :-1]
            # Segments count from 1 in each row (0 would be padding); positions restart with each segment.
            segment = slot - slot[:, :1] + 1
            first = np.maximum.accumulate(
                np.where(np.diff(slot, axis=1, prepend=-1) != 0, np.arange(self.seq_len), 0), axis=1
            )
            batch["segment_ids"] = np.ascontiguousarray(segment, np.int32)
            batch["positions"] = (np.arange(self.seq_len) - first).astype(np.int32)
        return {key: np.ascontiguousarray(v) for key, v in batch.items()}


class BatchIterator:
    """Batches of one process; `get_state`/`set_state` resume exactly; `epoch` is the last batch's epoch."""

    def __init__(self, maker: BatchMaker, *, fingerprint: str, split: str, seed: int, stop: int, num_workers: int):
        self._maker = maker
        self._meta = {"fingerprint": fingerprint, "split": split, "seed": seed}
        self._stop = stop
        self._num_workers = num_workers
        self._next = 0
        self._it = None
        self.epoch = 0

    @property
    def rows_per_epoch(self) -> int:
        return self._maker.rows_per_epoch

    def _start(self) -> None:
        ds = grain.MapDataset.range(self._next, self._stop).map(self._maker)
        # One reader thread overlaps batch assembly with the train step; numpy does the heavy lifting.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
        if self._num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers, per_worker_buffer_size=2))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= self._stop:
            raise StopIteration
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.epoch = self._maker.epoch_of(self._next)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next, **self._meta}

    def set_state(self, state: dict[str, Any]) -> None:
        for key, value in self._meta.items():
            if state.get(key) != value:
                raise DataError(
                    f"the saved data-iterator state is for {key}={state.get(key)!r}, not {value!r}: resume with the "
                    "data config the checkpoint was written with"
                )
        self.close()
        self._next = int(state["next_batch"])
        self.epoch = self._maker.epoch_of(max(self._next - 1, 0))

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def make_iterator(
    data_config: DataConfig, prepared: Prepared, split: str = "train", seed: int = 0, process_index: int = 0,
    process_count: int = 1, epochs: int | None = None,
) -> BatchIterator:
    """Batches of `split` for process `process_index` of `process_count` (see the module docstring)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if data_config.batch_size % process_count:
        raise DataError(
            f"DataConfig.batch_size={data_config.batch_size} is not divisible by {process_count} processes: "
            "make the global batch a multiple of the process count"
        )
    _check_one_batch(data_config, prepared, split)
    tokens_path, offsets_path = prepared.token_files(split)
    maker = BatchMaker(
        tokens_path, offsets_path, seed=seed, seq_len=data_config.seq_len, batch_size=data_config.batch_size,
        process_index=process_index, process_count=process_count, eos_id=prepared.tokenizer.eos_id,
        document_mask=data_config.document_mask,
    )
    stop = sys.maxsize if epochs is None else (epochs * maker.rows_per_epoch) // data_config.batch_size
    return BatchIterator(
        maker, fingerprint=prepared.fingerprint, split=split, seed=seed, stop=stop, num_workers=data_config.num_workers
    )


def loader_tokens_per_sec(data_config: DataConfig, prepared: Prepared, seconds: float = 3.0) -> float:
    """Tokens per second the train iterator delivers to one process, after a short warm-up."""
    it = make_iterator(data_config, prepared, "train", seed=0)
    try:
        for _ in range(3):
            next(it)
        tokens = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            tokens += batch["inputs"].size
        return tokens / (time.perf_counter() - start)
    finally:
        it.close()
