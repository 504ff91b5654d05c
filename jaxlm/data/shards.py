"""Sharded corpora tokenized once, in parallel, into token shards (local or gs://).

Layout under the data directory (`DataConfig.data_dir`, default `<cache_dir>/prepared`):

    tokenizers/<source fingerprint>-<kind>-<vocab>-<sample bytes>.model   trained once, by process 0
    <fingerprint>/
        fingerprint.json          what the fingerprint covers
        <split>/<i>.tokens        the tokens of source file i's documents of that split (uint16 or int32)
        <split>/<i>.offsets.npy   where each document starts in it (int64, one more than documents)
        done/<i>.json             written last for file i: its statistics and its files' sizes and SHA-256s;
                                  marks the file done
        tokenizer.model           a copy of the tokenizer (trained ones), read by every process
        manifest.json             written at the end by process 0: every file's statistics and the totals

The fingerprint covers the source files (names relative to their common folder, sizes, splits), the reading
options (text field, validation rule), the tokenizer file's SHA-256 and the tokenizer options. Process p of n
tokenizes the files i = p, p + n, ..., over `prepare_workers` processes of its own; each output file is written
whole (renamed into place, or one upload), so a preparation that is stopped resumes with the files already done
and gives the same bytes as one left alone. A run checks the size and SHA-256 of each token file it reads
against the manifest before it reads it: a damaged file is one line naming it and how to tokenize it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.data.corpora import damage
from jaxlm.data.sources import ShardFile, SkipCounter, find_shards, read_documents, split_of, tokenizer_sample
from jaxlm.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    is_named_kind,
    load_pretrained,
    train_sentencepiece,
)
from jaxlm.errors import DataError

SHARDS_VERSION = 1  # bump when the token shards change layout
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
_ENCODE_BATCH = 256  # documents per encode call
_POLL_S = 1.0


_SUFFIXES = {"tokens": ".tokens", "offsets": ".offsets.npy"}  # a source file's two token files per split


def _token_file(split: str, index: int, key: str) -> str:
    return f"{split}/{index:05d}{_SUFFIXES[key]}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers (and a resumed preparation) see the whole file or none: one upload, or a local rename."""
    if storage.is_uri(path):
        storage.write_bytes(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with storage.local_copy(path, "w") as tmp, open(tmp, "wb") as f:
        f.write(data)


def _wait_for(path: str, what: str) -> None:
    shown = 0.0
    start = time.monotonic()
    while not storage.exists(path):
        if time.monotonic() - start > shown + 60:
            shown += 60
            print(f"waiting for {what} ({path}), {shown / 60:.0f} min so far", file=sys.stderr, flush=True)
        time.sleep(_POLL_S)


@dataclass
class ShardSet:
    """A prepared sharded corpus: where it is, its tokenizer, its files and statistics."""

    directory: str
    fingerprint: str
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    built: bool = False  # this call wrote the manifest

    def files(self, split: str) -> list[dict[str, Any]]:
        """The non-empty token files of a split: {"index", "name", "tokens", "offsets", "documents",
        "tokens_count", "checksums"} (checksums: {"tokens"|"offsets": {"bytes", "sha256"}}; None in older manifests)."""
        out = []
        for entry in self.manifest["files"]:
            stats = entry[split]
            if stats["documents"]:
                i = entry["index"]
                out.append({
                    "index": i, "name": entry["name"], **{key: _token_file(split, i, key) for key in _SUFFIXES},
                    "documents": stats["documents"], "tokens_count": stats["tokens"],
                    "checksums": stats.get("checksums"),
                })
        return out

    def local_paths(self, files: list[dict[str, Any]], cache_dir: str) -> list[tuple[str, str]]:
        """(tokens, offsets) local paths of `files`: the files themselves, or copies of a bucket's in the cache;
        each checked against the size and SHA-256 it was written with."""
        return [(self._checked(f, "tokens", cache_dir), self._checked(f, "offsets", cache_dir)) for f in files]

    def _checked(self, f: dict[str, Any], key: str, cache_dir: str) -> str:
        path = storage.join(self.directory, f[key])
        expected = (f["checksums"] or {}).get(key)
        local = path
        if storage.is_uri(path):
            local = os.path.join(cache_dir, "prepared", self.fingerprint, f[key])
            if os.path.isfile(local) and not (expected and damage(local, expected)):
                return local  # a whole copy from an earlier run
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with storage.local_copy(path) as src, storage.local_copy(local, "w") as dst:
                with open(src, "rb") as a, open(dst, "wb") as b:
                    b.write(a.read())
        why = expected and damage(local, expected)
        if why:
            marker = storage.join(self.directory, "done", f"{f['index']:05d}.json")
            raise DataError(
                f"the token shard {path} {why}: delete {storage.join(self.directory, MANIFEST)} and {marker}"
                f" and prepare again (python -m tools.prepare_data, or the run) to tokenize {f['name']} again"
            )
        return local


# --- the tokenizer, once -------------------------------------------------------------------------------------


def _tokenizer_options(cfg: DataConfig) -> dict[str, Any]:
    trained = cfg.tokenizer.startswith("sentencepiece-")
    return {
        "kind": cfg.tokenizer if is_named_kind(cfg.tokenizer) else "file",
        "vocab_size": cfg.vocab_size if trained else None,
        "sample_bytes": cfg.tokenizer_sample_bytes if trained else None,
    }


def _load_tokenizer(proto: bytes, name: str) -> SentencePieceTokenizer:
    try:
        return SentencePieceTokenizer(proto, name=name)
    except DataError:
        raise
    except Exception:
        raise DataError(f"tokenizer model file {name!r} is not a sentencepiece model: check the file") from None


def _tokenizer(
    cfg: DataConfig, root: str, source_fp: str, shards: list[ShardFile], process_index: int
) -> tuple[Tokenizer, bytes | None]:
    """The tokenizer and its file's bytes (None for bytes): a given .model file, a Hugging Face tokenizer (its
    tokenizer.json, as `HFTokenizer` holds it), or one trained by process 0."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer(), None
    if not is_named_kind(cfg.tokenizer) and not storage.is_uri(cfg.tokenizer):
        tokenizer = load_pretrained(cfg.tokenizer)
        if isinstance(tokenizer, HFTokenizer):
            return tokenizer, tokenizer.tokenizer_json.encode("utf-8")
        return tokenizer, tokenizer.model_proto
    if cfg.tokenizer.endswith(".model"):
        if not storage.isfile(cfg.tokenizer):
            raise DataError(
                f"tokenizer model file {cfg.tokenizer!r} does not exist: give the path of a sentencepiece .model file"
            )
        proto = storage.read_bytes(cfg.tokenizer)
        return _load_tokenizer(proto, os.path.basename(cfg.tokenizer)), proto
    if cfg.tokenizer not in ("sentencepiece-bpe", "sentencepiece-unigram"):
        raise DataError(
            f"DataConfig.tokenizer={cfg.tokenizer!r} cannot prepare shards: use sentencepiece-bpe, "
            "sentencepiece-unigram, byte, the path of a .model or tokenizer.json file or a model directory"
        )
    name = f"{source_fp}-{cfg.tokenizer}-{cfg.vocab_size}-{cfg.tokenizer_sample_bytes}.model"
    path = storage.join(root, "tokenizers", name)
    if not storage.exists(path):
        if process_index == 0:
            texts = tokenizer_sample(cfg, shards)
            proto = train_sentencepiece(texts, cfg.tokenizer.split("-")[1], cfg.vocab_size, cfg.tokenizer_sample_bytes)
            _write_bytes_atomic(path, proto)
        else:
            _wait_for(path, "the tokenizer that process 0 trains")
    proto = storage.read_bytes(path)
    return _load_tokenizer(proto, name), proto


# --- tokenizing one file -------------------------------------------------------------------------------------

def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype) for t in texts]
    return [np.asarray(ids, dtype) for ids in tokenizer.encode_batch(texts)]


@dataclass(frozen=True)
class _Job:
    shard: ShardFile
    index: int
    directory: str
    tokenizer: Tokenizer
    text_field: str
    skip_bad_lines: bool
    val_fraction: float
    dtype: str


def _empty_stats() -> dict[str, int]:
    return {"documents": 0, "bytes": 0, "tokens": 0, "undecodable_bytes": 0, "roundtrip_failures": 0}


def tokenize_file(job: _Job) -> dict[str, Any]:
    """Tokenizes one source file into its token files and writes its done marker; returns its statistics."""
    tokenizer = job.tokenizer
    dtype = np.dtype(job.dtype)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    stats: dict[str, Any] = {s: _empty_stats() for s in SPLITS}
    skipped = SkipCounter()
    empty = 0
    pending: list[tuple[str, int, str]] = []

    def flush() -> None:
        encoded = _encode(tokenizer, [t for t, _, _ in pending], dtype)
        for (text, bad, split), ids in zip(pending, encoded):
            s = stats[split]
            s["documents"] += 1
            s["bytes"] += len(text.encode("utf-8"))
            s["tokens"] += ids.size
            s["undecodable_bytes"] += bad
            if split == "validation" and tokenizer.decode(ids) != text:
                s["roundtrip_failures"] += 1
            parts[split].append(ids)
        pending.clear()

    for text, bad in read_documents(job.shard, job.text_field, job.skip_bad_lines, skipped):
        if not text:
            empty += 1
            continue
        pending.append((text, bad, split_of(text, job.shard, job.val_fraction)))
        if len(pending) >= _ENCODE_BATCH:
            flush()
    flush()
    for split in SPLITS:
        docs = [p for p in parts[split] if p.size]  # a document of no tokens has nothing to learn from
        stats[split]["documents"] = len(docs)
        lengths = np.array([d.size for d in docs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        written = {
            "tokens": np.concatenate(docs).astype(dtype).tobytes() if docs else b"",
            "offsets": _npy_bytes(offsets),
        }
        for key, data in written.items():
            _write_bytes_atomic(storage.join(job.directory, _token_file(split, job.index, key)), data)
        stats[split]["checksums"] = {
            key: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for key, data in written.items()
        }
    entry = {"index": job.index, "name": job.shard.name, "size": job.shard.size, **stats,
             "skipped_lines": skipped.lines, "empty_documents": empty}
    _write_bytes_atomic(storage.join(job.directory, "done", f"{job.index:05d}.json"),
                        json.dumps(entry, sort_keys=True).encode())
    return entry


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


# --- preparing, and opening what is prepared ------------------------------------------------------------------


def _done(directory: str) -> set[int]:
    folder = storage.join(directory, "done")
    if not storage.isdir(folder):
        return set()
    return {int(n.split(".")[0]) for n in storage.listdir(folder) if n.endswith(".json") and n[:5].isdigit()}


def _run_jobs(jobs: list[_Job], workers: int) -> None:
    if not jobs:
        return
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        for job in jobs:
            tokenize_file(job)
        return
    # spawn: the caller may hold JAX's threads, which forked children must not inherit.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(tokenize_file, jobs):
            pass


def _totals(entries: list[dict[str, Any]], tokenizer: Tokenizer, cfg: DataConfig) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "source": cfg.source, "val_source": cfg.val_source, "tokenizer": cfg.tokenizer,
        "tokenizer_file": getattr(tokenizer, "name", cfg.tokenizer), "vocab_size": tokenizer.vocab_size,
        "streaming": False, "files": len(entries),
    }
    for split in SPLITS:
        s = {k: sum(e[split][k] for e in entries) for k in _empty_stats()}
        s["bytes_per_token"] = s["bytes"] / max(s["tokens"], 1)
        s["token_dtype"] = token_dtype(tokenizer.vocab_size).name
        stats[split] = s
    stats["undecodable_bytes"] = sum(stats[s]["undecodable_bytes"] for s in SPLITS)
    stats["skipped_lines"] = sum(e["skipped_lines"] for e in entries)
    stats["empty_documents"] = sum(e["empty_documents"] for e in entries)
    stats["train_bytes_per_token"] = stats["train"]["bytes_per_token"]
    stats["val_bytes_per_token"] = stats["validation"]["bytes_per_token"]
    return stats


def _check_manifest(directory: str, fingerprint: str, ingredients: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads(storage.read_bytes(storage.join(directory, MANIFEST)))
    if manifest.get("fingerprint") != fingerprint:
        theirs = manifest.get("ingredients", {})
        differ = [k for k in ingredients if theirs.get(k) != ingredients[k]] or ["version"]
        raise DataError(
            f"the data directory {directory} was prepared from other data (fingerprint {manifest.get('fingerprint')},"
            f" this config's is {fingerprint}; {', '.join(differ)} differ): set --data.data-dir to another directory"
            " or remove it"
        )
    return manifest


def prepare_shards(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> ShardSet:
    """Tokenizes (once, this process's share: files i = process_index mod process_count) and opens the corpus."""
    shards = find_shards(cfg)
    root = cfg.data_dir or os.path.join(cfg.resolved_cache_dir, "prepared")
    storage.makedirs(root)
    source = {
        "files": [[s.name, s.size, s.split or "hash"] for s in shards], "text_field": cfg.text_field,
        "skip_bad_lines": cfg.skip_bad_lines, "val_fraction": None if cfg.val_source else cfg.val_fraction,
        "version": SHARDS_VERSION,
    }
    source_fp = _sha(source)
    direct = cfg.data_dir and storage.isfile(storage.join(root, MANIFEST))
    if direct and cfg.tokenizer.startswith("sentencepiece-"):
        # A prepared directory given as it is: its own tokenizer copy is the trained one.
        proto = storage.read_bytes(storage.join(root, "tokenizer.model"))
        tokenizer: Tokenizer = _load_tokenizer(proto, "tokenizer.model")
    else:
        tokenizer, proto = _tokenizer(cfg, root, source_fp, shards, process_index)
    ingredients = {
        "source": source_fp, "files": len(shards),
        "tokenizer_sha256": hashlib.sha256(proto).hexdigest() if proto is not None else "byte",
        "tokenizer_options": _tokenizer_options(cfg), "version": SHARDS_VERSION,
    }
    fingerprint = _sha(ingredients)
    directory = root if direct else storage.join(root, fingerprint)
    if storage.isfile(storage.join(directory, MANIFEST)):
        manifest = _check_manifest(directory, fingerprint, ingredients)
        return ShardSet(directory, fingerprint, tokenizer, manifest)
    if direct:
        raise DataError(f"the data directory {root} has no {MANIFEST}: prepare it again")
    dtype = token_dtype(tokenizer.vocab_size).name
    if process_index == 0:
        _write_bytes_atomic(storage.join(directory, "fingerprint.json"),
                            json.dumps({"fingerprint": fingerprint, "ingredients": ingredients, "source": source},
                                       indent=1, sort_keys=True).encode())
    done = _done(directory)
    jobs = [
        _Job(s, i, directory, tokenizer, cfg.text_field, cfg.skip_bad_lines, cfg.val_fraction, dtype)
        for i, s in enumerate(shards) if i % process_count == process_index and i not in done
    ]
    if jobs:
        mine = sum(1 for i in range(len(shards)) if i % process_count == process_index)
        print(f"tokenizing {len(jobs)} of this process's {mine} source files into {directory}", flush=True)
    _run_jobs(jobs, cfg.prepare_workers or os.cpu_count() or 1)
    manifest_path = storage.join(directory, MANIFEST)
    if process_index != 0:
        _wait_for(manifest_path, "process 0 to write the manifest")
        return ShardSet(directory, fingerprint, tokenizer, _check_manifest(directory, fingerprint, ingredients))
    while len(_done(directory)) < len(shards):
        time.sleep(_POLL_S)  # the other processes' files
    entries = [json.loads(storage.read_bytes(storage.join(directory, "done", f"{i:05d}.json")))
               for i in range(len(shards))]
    stats = _totals(entries, tokenizer, cfg)
    for split in SPLITS:
        if stats[split]["documents"] == 0:
            fix = "raise --data.val-fraction or add documents" if split == "validation" else "add train files"
            if stats["train"]["documents"] + stats["validation"]["documents"] == 0:
                fix = "point the source at files with text"
            raise DataError(f"the {split} split of {cfg.source} has no documents: {fix}")
    if isinstance(tokenizer, SentencePieceTokenizer):
        _write_bytes_atomic(storage.join(directory, "tokenizer.model"), proto)
    manifest = {"fingerprint": fingerprint, "ingredients": ingredients, "stats": stats,
                "files": [{k: e[k] for k in ("index", "name", "size", *SPLITS)} for e in entries]}
    _write_bytes_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return ShardSet(directory, fingerprint, tokenizer, manifest, built=True)
