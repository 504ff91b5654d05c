"""The input pipeline: prepare once (corpus, tokenizer, statistics), then stream packed batches.

Two ways to read, with the same batches out (rows of `seq_len + 1` tokens, documents joined by an
end-of-document token, a new shuffle per epoch) and the same iterator interface:

- Pre-tokenized (local corpora): preparation tokenizes every document once into a flat token file per split.
  Batches are then a pure function of (seed, batch index): epoch e visits the documents in a permutation drawn
  from (seed, e), cut into rows (the tail of an epoch shorter than a row is dropped). Global batch k is rows
  [k B, (k + 1) B) of that endless row stream, and process p reads only its rows [p B_local, (p + 1) B_local).
  The iterator state is one batch index.
- Sharded (`shards:` sources, jaxlm.data.shards): prepared once into token files per source file; batches as
  for pre-tokenized corpora, except that when the train split has at least one file per process, process p packs
  its own rows from its own files p, p + n, ... (so no host reads another's data), and the global batch then
  depends on the number of processes (a saved state is refused by another count).
- Streaming (TFDS catalog corpora, too large to tokenize up front): process p of n reads only its contiguous
  share of the split's records (its own files), shuffled per epoch, tokenized in worker processes (order
  preserved), and a packing iterator in the main process cuts its rows. The global batch is then the processes'
  rows side by side and depends on the number of processes (a saved state is refused by another count). The state
  is grain's (JSON-serialisable).

Otherwise the global batches depend only on the seed and the data, not on the number of workers or processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from jaxlm.config import DataConfig
from jaxlm.data.corpora import Corpus, damage, file_record, open_corpus, record_text, record_text_counting
from jaxlm.data.shards import ShardSet, prepare_shards, token_dtype
from jaxlm.data.tokenizer import (
    Tokenizer, TokenizerSpec, build_tokenizer, check_vocab_size, make_cache_dir, tokenizer_key,
)
from jaxlm.errors import DataError

SPLITS = ("train", "validation")
TOKENS_VERSION = 3  # bump when the token files change layout (3: their checksums in stats.json)
_ENCODE_CHUNK = 256  # documents per sentencepiece batch call
_STATS_SAMPLE_BYTES = 20_000_000  # streamed corpora: statistics come from this much text of each split


@dataclass
class Prepared:
    """Everything `make_iterator` needs, loaded from the cache."""

    tokenizer: Tokenizer
    stats: dict[str, Any]
    corpus: Corpus | None  # None for shards: sources
    tokens_dir: str
    fingerprint: str  # corpus and tokenizer; a checkpointed iterator state must match it
    streaming: bool  # True: tokenize while reading; False: read the pre-tokenized files
    shards: ShardSet | None = None  # shards: sources

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def token_files(self, split: str) -> tuple[str, str]:
        base = os.path.join(self.tokens_dir, split)
        return f"{base}.tokens.bin", f"{base}.offsets.npy"


def _streams(data_config: DataConfig) -> bool:
    """Whether batches tokenize on the fly: catalog corpora do (they can be huge), local corpora do not."""
    pretokenize = getattr(data_config, "pretokenize", None)
    if pretokenize is None:
        return data_config.source.startswith("tfds:")
    return not pretokenize


def _mp_options(num_workers: int, buffer: int) -> grain.MultiprocessingOptions:
    from absl import flags

    # grain's worker start reads an absl flag, which fails in programs that never parse absl flags (ours).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer)


def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _tokenize_split(corpus: Corpus, split: str, tokenizer: Tokenizer, tokens_path: str, offsets_path: str) -> dict:
    """Writes the tokens of every document of a split to a flat file, with document offsets; returns statistics."""
    src = corpus.source_of(split)
    dtype = token_dtype(tokenizer.vocab_size)
    lengths: list[int] = []
    nbytes = ntokens = bad_bytes = failures = 0
    tmp_tokens = f"{tokens_path}.tmp{os.getpid()}"
    tokens_sha = hashlib.sha256()
    with open(tmp_tokens, "wb") as f:
        for start in range(0, len(src), _ENCODE_CHUNK):
            stop = min(start + _ENCODE_CHUNK, len(src))
            decoded = [record_text_counting(src[i], corpus.text_field) for i in range(start, stop)]
            texts = [text for text, _ in decoded]
            encoded = tokenizer.encode_batch(texts, num_threads=_threads())
            for (text, bad), ids in zip(decoded, encoded):
                if not ids:
                    continue
                data = np.asarray(ids, dtype=dtype).tobytes()
                f.write(data)
                tokens_sha.update(data)
                lengths.append(len(ids))
                ntokens += len(ids)
                nbytes += len(text.encode("utf-8"))
                bad_bytes += bad
                if split == "validation" and tokenizer.decode(ids) != text:
                    failures += 1
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tmp_offsets = f"{offsets_path}.tmp{os.getpid()}.npy"
    np.save(tmp_offsets, offsets)
    files = {
        os.path.basename(tokens_path): file_record(tmp_tokens, tokens_sha.hexdigest()),
        os.path.basename(offsets_path): file_record(tmp_offsets),
    }
    os.replace(tmp_tokens, tokens_path)
    os.replace(tmp_offsets, offsets_path)
    stats = {
        "documents": len(lengths), "bytes": nbytes, "tokens": ntokens, "bytes_per_token": nbytes / max(ntokens, 1),
        "undecodable_bytes": bad_bytes, "token_dtype": dtype.name, "files": files,
    }
    if split == "validation":
        stats["roundtrip_failures"] = failures
    return stats


def _verify_token_files(prepared: Prepared, source: str) -> None:
    """A token file damaged since it was written (truncated, overwritten) is a DataError naming it and how to
    rebuild it, never a run on garbage."""
    for split in SPLITS:
        for path in prepared.token_files(split):
            why = damage(path, prepared.stats[split]["files"][os.path.basename(path)])
            if why:
                raise DataError(
                    f"the token cache file {path} {why}: delete {prepared.tokens_dir} and rerun to tokenize "
                    f"{source} again"
                )


def _sample_split(corpus: Corpus, split: str, tokenizer: Tokenizer, sample_bytes: int) -> dict:
    """Statistics of a streamed split, measured on its first documents (already shuffled by TFDS) and scaled up."""
    src = corpus.source_of(split)
    docs = nbytes = ntokens = bad_bytes = failures = 0
    while docs < len(src) and nbytes < sample_bytes:
        text, bad = record_text_counting(src[docs], corpus.text_field)
        ids = tokenizer.encode(text)
        docs += 1
        nbytes += len(text.encode("utf-8"))
        ntokens += len(ids)
        bad_bytes += bad
        if split == "validation" and tokenizer.decode(ids) != text:
            failures += 1
    scale = len(src) / max(docs, 1)
    stats = {
        "documents": len(src), "bytes": round(nbytes * scale), "tokens": round(ntokens * scale),
        "bytes_per_token": nbytes / max(ntokens, 1), "undecodable_bytes": bad_bytes, "sampled_documents": docs,
    }
    if split == "validation":
        stats["roundtrip_failures"] = failures
    return stats


def print_stats(source: str, stats: dict[str, Any]) -> None:
    print(f"corpus {source}: tokenizer {stats['tokenizer']} (vocab {stats['vocab_size']})")
    for split in SPLITS:
        s = stats[split]
        sampled = f" (estimated from {s['sampled_documents']:,} documents)" if "sampled_documents" in s else ""
        print(
            f"  {split:<10} {s['documents']:>9,} documents {s['bytes']:>14,} bytes {s['tokens']:>13,} tokens "
            f"{s['bytes_per_token']:6.3f} bytes/token{sampled}"
        )
    extra = [f"{stats['undecodable_bytes']:,} undecodable bytes (replaced with U+FFFD)"]
    if stats.get("skipped_lines"):
        extra.append(f"{stats['skipped_lines']:,} bad lines skipped")
    if stats.get("empty_documents"):
        extra.append(f"{stats['empty_documents']:,} empty documents skipped")
    extra.append(f"{stats['validation']['roundtrip_failures']} validation documents that do not round-trip")
    print("  " + "; ".join(extra))


def prepare_data(data_config: DataConfig, process_index: int = 0, process_count: int = 1) -> Prepared:
    """Builds (once) the corpus, the tokenizer and the token files; loads them from the cache afterwards.

    Sharded sources are tokenized by every process of a run together (process_index of process_count), each
    taking its share of the files; the other sources are built by the process that calls first."""
    check_vocab_size(data_config.tokenizer, data_config.vocab_size)
    if data_config.source.startswith("shards:"):
        return _prepare_sharded(data_config, process_index, process_count)
    corpus = open_corpus(data_config)
    cache_dir = data_config.resolved_cache_dir
    spec = TokenizerSpec(
        kind=data_config.tokenizer, vocab_size=data_config.vocab_size,
        sample_bytes=data_config.tokenizer_sample_bytes, corpus_fingerprint=corpus.fingerprint,
    )
    streaming = _streams(data_config)
    char_bytes = data_config.tokenizer_sample_bytes if corpus.large else None
    tokenizer, _ = build_tokenizer(
        spec, os.path.join(cache_dir, "tokenizers"), corpus.texts("train"),
        (t for split in SPLITS for t in corpus.texts(split, max_bytes=char_bytes)),
    )
    tok_key = tokenizer_key(data_config.tokenizer, data_config.vocab_size, corpus.fingerprint)
    mode = "stream" if streaming else "tokens"
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}/{tok_key}/{mode}/{TOKENS_VERSION}".encode()).hexdigest()[:16]
    tokens_dir = os.path.join(cache_dir, "tokens", fingerprint)
    prepared = Prepared(tokenizer, {}, corpus, tokens_dir, fingerprint, streaming)
    stats_path = os.path.join(tokens_dir, "stats.json")
    if os.path.isfile(stats_path):
        try:
            with open(stats_path, encoding="utf-8") as f:
                prepared.stats = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(
                f"the token cache file {stats_path} is damaged: delete {tokens_dir} and rerun to tokenize "
                f"{data_config.source} again"
            ) from None
        if not streaming:
            _verify_token_files(prepared, data_config.source)
    else:
        make_cache_dir(tokens_dir, cache_dir)
        stats: dict[str, Any] = {
            "source": data_config.source, "tokenizer": data_config.tokenizer,
            "tokenizer_file": getattr(tokenizer, "name", data_config.tokenizer), "vocab_size": tokenizer.vocab_size,
            "streaming": streaming,
        }
        for split in SPLITS:
            if streaming:
                stats[split] = _sample_split(corpus, split, tokenizer, _STATS_SAMPLE_BYTES)
            else:
                stats[split] = _tokenize_split(corpus, split, tokenizer, *prepared.token_files(split))
        stats["undecodable_bytes"] = sum(stats[s]["undecodable_bytes"] for s in SPLITS)
        stats["skipped_lines"] = corpus.stats.get("skipped_lines", 0)
        stats["empty_documents"] = corpus.stats.get("empty_documents", 0)
        stats["train_bytes_per_token"] = stats["train"]["bytes_per_token"]
        stats["val_bytes_per_token"] = stats["validation"]["bytes_per_token"]
        tmp = f"{stats_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp, stats_path)
        prepared.stats = stats
        print_stats(data_config.source, stats)
    for split in SPLITS:
        _check_one_batch(data_config, prepared, split)
    return prepared


def _prepare_sharded(data_config: DataConfig, process_index: int, process_count: int) -> Prepared:
    shard_set = prepare_shards(data_config, process_index, process_count)
    stats = shard_set.manifest["stats"]
    if shard_set.built:
        print_stats(data_config.source, stats)
    prepared = Prepared(
        shard_set.tokenizer, stats, None, shard_set.directory, shard_set.fingerprint, False, shards=shard_set
    )
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
        fix = "raise --data.val-fraction" if split == "validation" else "use a larger corpus"
        raise DataError(
            f"the {split} split ({s['tokens']:,} tokens) holds {rows} rows of seq_len+1={data_config.seq_len + 1} "
            f"tokens, fewer than one batch of {data_config.batch_size}: {fix}, or lower --data.batch-size or "
            "--data.seq-len"
        )


def _segments(slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1, 2, ... per row) and positions within each segment, from per-token document numbers."""
    length = slot.shape[1]
    segment = (slot - slot[:, :1] + 1) if slot.size else slot
    # Document numbers only grow along a row, so a change marks the start of a segment.
    starts = np.where(np.diff(slot, axis=1, prepend=slot[:, :1] - 1) != 0, np.arange(length), 0)
    first = np.maximum.accumulate(starts, axis=1)
    return segment.astype(np.int32), (np.arange(length) - first).astype(np.int32)


def _split_rows(rows: np.ndarray, slot: np.ndarray | None) -> dict[str, np.ndarray]:
    batch = {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}
    if slot is not None:
        segment, position = _segments(slot[:, :-1])
        # segment_ids count the documents of a row from 1 (0 is left for padding, which packing never needs).
        batch["segment_ids"], batch["positions"] = segment, position
    return batch


# --- pre-tokenized: batches as a pure function of the batch index ------------------------------------------


class BatchMaker:
    """Global batch index -> this process's rows (picklable for grain workers)."""

    def __init__(
        self, files: list[tuple[str, str]], dtype: str, *, seed: int, seq_len: int, batch_size: int,
        process_index: int, process_count: int, eos_id: int, document_mask: bool, shuffle_rows: bool = False,
    ):
        """`files`: (tokens, offsets) paths, read as one stream of documents in this order."""
        self.files, self.dtype = list(files), dtype
        self.shuffle_rows = shuffle_rows
        self.seed, self.seq_len, self.batch_size = seed, seq_len, batch_size
        self.local_batch = batch_size // process_count
        self.first_row = process_index * self.local_batch
        self.eos_id, self.document_mask = eos_id, document_mask
        self._arrays: tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray] | None = None
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        _, offsets, _, bases = self._load()
        self.rows_per_epoch = int((bases[-1] + offsets.size - 1) // (seq_len + 1))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_epochs"] = None, {}
        return state

    def _load(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """The token files (memory-mapped), document offsets into their concatenation, document lengths, and
        where each file starts in the concatenation."""
        if self._arrays is None:
            tokens, offsets = [], []
            for tokens_path, offsets_path in self.files:
                size = os.path.getsize(tokens_path)
                tokens.append(np.memmap(tokens_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype))
                offsets.append(np.load(offsets_path))
            bases = np.concatenate([[0], np.cumsum([t.size for t in tokens])]).astype(np.int64)
            starts = np.concatenate([o[:-1] + b for o, b in zip(offsets, bases)] + [bases[-1:]]).astype(np.int64)
            self._arrays = (tokens, starts, np.diff(starts), bases)
        return self._arrays

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        tokens, _, _, bases = self._load()
        if len(tokens) == 1:
            return tokens[0][idx]
        out = np.empty(idx.shape, self.dtype)
        which = np.searchsorted(bases, idx, side="right") - 1
        for f in np.unique(which):
            sel = which == f
            out[sel] = tokens[f][idx[sel] - bases[f]]
        return out

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The document order of an epoch, where each document (with its end token) ends in the stream, and with
        `shuffle_rows` the order in which the epoch's rows are read."""
        table = self._epochs.get(epoch)
        if table is None:
            lengths = self._load()[2]
            order = np.random.default_rng([self.seed, epoch]).permutation(lengths.size)
            ends = np.cumsum(lengths[order] + 1)
            rows = None
            if self.shuffle_rows:
                rows = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
            if len(self._epochs) >= 2:  # a batch spans at most two epochs
                self._epochs.pop(min(self._epochs))
            table = self._epochs[epoch] = (order, ends, rows)
        return table

    def epoch_of(self, batch_index: int) -> int:
        return (batch_index * self.batch_size) // self.rows_per_epoch

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        _, offsets, lengths, _ = self._load()
        width = self.seq_len + 1
        rows = batch_index * self.batch_size + self.first_row + np.arange(self.local_batch)
        out = np.empty((self.local_batch, width), np.int32)
        slot = np.empty((self.local_batch, width), np.int64)  # the document (number in the stream) of each token
        for epoch in np.unique(rows // self.rows_per_epoch):
            sel = rows // self.rows_per_epoch == epoch
            order, ends, row_order = self._epoch(int(epoch))
            in_epoch = rows[sel] % self.rows_per_epoch
            if row_order is not None:
                in_epoch = row_order[in_epoch]
            pos = in_epoch[:, None] * width + np.arange(width)
            k = np.searchsorted(ends, pos, side="right")
            doc = order[k]
            within = pos - (ends[k] - lengths[doc] - 1)
            is_eos = within == lengths[doc]
            idx = offsets[doc] + np.minimum(within, lengths[doc] - 1)
            out[sel] = np.where(is_eos, self.eos_id, self._gather(idx))
            slot[sel] = k + epoch * lengths.size
        return _split_rows(out, slot if self.document_mask else None)


# What a saved iterator state written before a key existed stands for.
_STATE_DEFAULTS = {"shuffle_rows": False}


class BatchIterator:
    """Batches of one process. `get_state`/`set_state` resume exactly; `epoch` is the last batch's epoch."""

    def __init__(self, meta: dict[str, Any], num_workers: int):
        self._meta = meta
        self._num_workers = num_workers
        self.epoch = 0

    def __iter__(self):
        return self

    def _check_state(self, state: dict[str, Any]) -> None:
        for key, value in self._meta.items():
            if state.get(key, _STATE_DEFAULTS.get(key)) != value:
                raise DataError(
                    f"the saved data-iterator state is for {key}={state.get(key)!r}, not {value!r}: resume with the "
                    "data config the checkpoint was written with"
                )

    def close(self) -> None:
        it, self._it = getattr(self, "_it", None), None
        if it is not None and hasattr(it, "close"):
            it.close()


class TokenBatchIterator(BatchIterator):
    """Pre-tokenized batches: the state is the next global batch index."""

    def __init__(self, maker: BatchMaker, meta: dict[str, Any], stop: int, num_workers: int):
        super().__init__(meta, num_workers)
        self._maker = maker
        self._stop = stop
        self._next = 0
        self._it = None

    @property
    def rows_per_epoch(self) -> int:
        return self._maker.rows_per_epoch

    def _start(self) -> None:
        ds = grain.MapDataset.range(self._next, self._stop).map(self._maker)
        # One reader thread overlaps batch assembly with the train step; numpy does the heavy lifting.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
        if self._num_workers > 0:
            ds = ds.mp_prefetch(_mp_options(self._num_workers, 2))
        self._it = iter(ds)

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
        self._check_state(state)
        self.close()
        self._next = int(state["next_batch"])
        self.epoch = self._maker.epoch_of(max(self._next - 1, 0))


# --- streaming: tokenize while reading -----------------------------------------------------------------------


class _Tokenize:
    """(index in the repeated stream, record) -> tokens and the stream index (picklable for grain workers)."""

    def __init__(self, tokenizer: Tokenizer, text_field: str):
        self.tokenizer, self.text_field = tokenizer, text_field

    def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        ids = self.tokenizer.encode(record_text(record, self.text_field))
        return {"tokens": np.asarray(ids, np.int32), "index": index}


class _PackRows(grain.IterDataset):
    """Concatenates documents, each followed by eos, and cuts rows of `width` tokens."""

    def __init__(self, parent: grain.IterDataset, width: int, eos_id: int, docs_per_epoch: int):
        super().__init__(parent)
        self._width, self._eos, self._docs = width, eos_id, docs_per_epoch

    def __iter__(self):
        return _PackRowsIterator(self._parent.__iter__(), self._width, self._eos, self._docs)


class _PackRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, width: int, eos_id: int, docs_per_epoch: int):
        super().__init__(parent)
        self._width, self._eos, self._docs = width, eos_id, docs_per_epoch
        self._doc: np.ndarray | None = None  # the document being cut, with its end token
        self._doc_index = 0
        self._offset = 0
        self._doc_state = self._parent.get_state()  # the parent's state just before the current document

    def _read_doc(self) -> None:
        while True:
            self._doc_state = self._parent.get_state()
            item = next(self._parent)
            if item["tokens"].size:
                break
        self._doc = np.append(item["tokens"], np.int32(self._eos))
        self._doc_index = int(item["index"])
        self._offset = 0

    def __next__(self) -> dict[str, Any]:
        row = np.empty(self._width, np.int32)
        slot = np.empty(self._width, np.int64)
        filled, epoch = 0, None
        while filled < self._width:
            if self._doc is None or self._offset == self._doc.size:
                self._read_doc()  # StopIteration at the end of the last epoch drops the part row
            if epoch is None:
                epoch = self._doc_index // self._docs
            take = min(self._width - filled, self._doc.size - self._offset)
            row[filled : filled + take] = self._doc[self._offset : self._offset + take]
            slot[filled : filled + take] = self._doc_index
            filled += take
            self._offset += take
        return {"row": row, "slot": slot, "epoch": np.int64(epoch)}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._doc_state, "offset": self._offset, "in_doc": self._doc is not None}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        self._doc_state = state["parent"]
        if state["in_doc"]:
            self._read_doc()
            self._offset = int(state["offset"])


class _LocalRows:
    """A global batch of packed rows -> this process's rows as model inputs."""

    def __init__(self, first_row: int, local_batch: int, document_mask: bool):
        self.first_row, self.local_batch, self.document_mask = first_row, local_batch, document_mask

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = slice(self.first_row, self.first_row + self.local_batch)
        out = _split_rows(batch["row"][rows], batch["slot"][rows] if self.document_mask else None)
        out["epoch"] = np.int64(batch["epoch"][0])
        return out


class StreamBatchIterator(BatchIterator):
    """Streamed batches: the state is grain's iterator state."""

    def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any], num_workers: int, rows_per_epoch: int):
        super().__init__(meta, num_workers)
        self._it = iter(dataset)
        self.rows_per_epoch = rows_per_epoch  # estimated from the statistics' sample

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.epoch = int(batch.pop("epoch"))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), **self._meta}

    def set_state(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self._it.set_state(state["grain"])


def _stream_dataset(
    data_config: DataConfig, prepared: Prepared, split: str, seed: int, process_index: int, process_count: int,
    epochs: int | None,
) -> grain.IterDataset:
    """Process p of n streams its own contiguous share of the split's records (so, of a sharded TFDS split, its own
    files), reshuffled every epoch, and packs its own rows: its local batch is batch_size / n rows of its share."""
    source = grain.MapDataset.source(prepared.corpus.source_of(split))
    first, stop = process_index * len(source) // process_count, (process_index + 1) * len(source) // process_count
    if stop == first:
        raise DataError(
            f"the {split} split has {len(source)} documents, fewer than the {process_count} processes reading it: "
            "use fewer processes or a larger split"
        )
    share = source[first:stop].shuffle(seed=seed % 2**32).repeat(epochs)
    ids = share.map_with_index(_Tokenize(prepared.tokenizer, prepared.corpus.text_field))
    ids = ids.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
    if data_config.num_workers > 0:
        # Workers read interleaved slices and grain restores the order, so packing after them is unaffected.
        ids = ids.mp_prefetch(_mp_options(data_config.num_workers, 16))
    rows = _PackRows(ids, data_config.seq_len + 1, prepared.tokenizer.eos_id, stop - first)
    local_batch = data_config.batch_size // process_count
    return rows.batch(local_batch, drop_remainder=True).map(_LocalRows(0, local_batch, data_config.document_mask))


def make_iterator(
    data_config: DataConfig, prepared: Prepared, split: str = "train", seed: int = 0, process_index: int = 0,
    process_count: int = 1, epochs: int | None = None, shuffle_rows: bool = False,
) -> BatchIterator:
    """Batches of `split` for process `process_index` of `process_count` (see the module docstring).

    `shuffle_rows` also reads each epoch's rows in a random order (drawn from the seed), so that the first few
    batches are rows from all over the split rather than from the few documents that open the epoch: what an
    evaluation on a fixed number of batches wants. Streamed corpora (TFDS catalog) ignore it: their documents are
    shuffled, their rows are not."""
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
    meta = {"fingerprint": prepared.fingerprint, "split": split, "seed": seed,
            "shuffle_rows": shuffle_rows and not prepared.streaming}  # another row order: another state
    if prepared.shards is not None:
        return _shard_iterator(data_config, prepared, split, seed, process_index, process_count, epochs, shuffle_rows,
                               meta)
    if prepared.streaming:
        ds = _stream_dataset(data_config, prepared, split, seed, process_index, process_count, epochs)
        rows = _rows_per_epoch(prepared, split, data_config.seq_len) // process_count
        # Each process packs its own share: a state saved with another process count is refused.
        return StreamBatchIterator(ds, {**meta, "processes": process_count}, data_config.num_workers, rows)
    maker = BatchMaker(
        [prepared.token_files(split)], prepared.stats[split]["token_dtype"], seed=seed, seq_len=data_config.seq_len,
        batch_size=data_config.batch_size, process_index=process_index, process_count=process_count,
        eos_id=prepared.tokenizer.eos_id, document_mask=data_config.document_mask, shuffle_rows=shuffle_rows,
    )
    stop = sys.maxsize if epochs is None else (epochs * maker.rows_per_epoch) // data_config.batch_size
    return TokenBatchIterator(maker, meta, stop, data_config.num_workers)


def _shard_iterator(
    data_config: DataConfig, prepared: Prepared, split: str, seed: int, process_index: int, process_count: int,
    epochs: int | None, shuffle_rows: bool, meta: dict[str, Any],
) -> TokenBatchIterator:
    """Batches of a sharded corpus: this process's own files when there is one per process (train), else every
    file and this process's rows of the global batch (validation, small corpora)."""
    files = prepared.shards.files(split)
    own = split == "train" and len(files) >= process_count > 1
    if own:
        files = files[process_index::process_count]
    # Own files make the rows depend on the process count: a state saved with another count is refused.
    meta = {**meta, "processes": process_count if own else 1}
    local = prepared.shards.local_paths(files, data_config.resolved_cache_dir)
    maker = BatchMaker(
        local, prepared.stats[split]["token_dtype"], seed=seed, seq_len=data_config.seq_len,
        batch_size=data_config.batch_size // process_count if own else data_config.batch_size,
        process_index=0 if own else process_index, process_count=1 if own else process_count,
        eos_id=prepared.tokenizer.eos_id, document_mask=data_config.document_mask, shuffle_rows=shuffle_rows,
    )
    if maker.rows_per_epoch < maker.batch_size:
        raise DataError(
            f"process {process_index}'s {len(files)} {split} files hold {maker.rows_per_epoch} rows of "
            f"seq_len+1={data_config.seq_len + 1} tokens, fewer than its batch of {maker.batch_size}: use fewer "
            "processes or more files, or lower --data.batch-size or --data.seq-len"
        )
    stop = sys.maxsize if epochs is None else (epochs * maker.rows_per_epoch) // maker.batch_size
    return TokenBatchIterator(maker, meta, stop, data_config.num_workers)
