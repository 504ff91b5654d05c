"""Web-corpus shards as people have them: JSON lines (.jsonl, .jsonl.gz, .jsonl.zst, .json.gz) and parquet files,
local or gs://, named by globs (`shards:<glob>[,<glob>...]`, `DataConfig.val_source`).

A shard file's documents go to its split: the validation globs' files are validation (C4's own
c4-validation.*), and without validation globs a stable hash of each document's text decides (val_fraction), so
duplicated documents never straddle the splits.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.data.corpora import decode_counting, stable_fraction
from jaxlm.errors import DataError

JSON_LINES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
FORMATS = JSON_LINES + (".parquet",)
HASH_SPLIT = ""  # ShardFile.split of a file whose documents are split by hash
_SAMPLE_FILES = 64  # the tokenizer sample reads this many train files at most, spread over all of them


@dataclass(frozen=True)
class ShardFile:
    path: str  # local path or gs:// URI
    size: int
    name: str  # relative to the folder that holds every matched file: the same wherever the corpus is copied
    split: str  # "train", "validation" or HASH_SPLIT


def _globs(spec: str) -> list[str]:
    return [g.strip() for g in spec.split(",") if g.strip()]


def _match(pattern: str) -> list[tuple[str, int]]:
    found = storage.glob(pattern)
    if not found:
        raise DataError(f"no file matches {pattern!r}: check the glob (use ** for subfolders)")
    for path, _ in found:
        if not path.endswith(FORMATS):
            raise DataError(
                f"{path} is not a supported shard ({', '.join(FORMATS)}): narrow the glob to those files"
            )
    return found


def _common_folder(paths: list[str]) -> str:
    folders = [p.rsplit("/", 1)[0] if "/" in p else "" for p in paths]
    common = posixpath.commonpath(folders) if all(f.startswith("/") for f in folders) else ""
    if not common:  # URIs: compare as text, component by component
        parts = [f.split("/") for f in folders]
        same = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            same.append(level[0])
        common = "/".join(same)
    return common


def find_shards(data_config: DataConfig) -> list[ShardFile]:
    """Every shard file of the source, train files first (then validation), each in name order."""
    train = {p: s for g in _globs(data_config.source[len("shards:") :]) for p, s in _match(g)}
    val = {p: s for g in _globs(data_config.val_source) for p, s in _match(g)}
    if not train:
        raise DataError(f"DataConfig.source={data_config.source!r} names no glob: use shards:<glob>[,<glob>...]")
    train = {p: s for p, s in train.items() if p not in val}  # `en/*` with val_source `en/*validation*` is fine
    if val and not train:
        raise DataError("every file of the source is also a validation file: give the train files' glob as source")
    root = _common_folder(sorted(train) + sorted(val))
    cut = len(root) + 1 if root else 0
    train_split = "train" if val else HASH_SPLIT
    files = [ShardFile(p, train[p], p[cut:], train_split) for p in sorted(train)]
    files += [ShardFile(p, val[p], p[cut:], "validation") for p in sorted(val)]
    return files


def split_of(text: str, shard: ShardFile, val_fraction: float) -> str:
    if shard.split != HASH_SPLIT:
        return shard.split
    return "validation" if stable_fraction(text) < val_fraction else "train"


class SkipCounter:
    """Bad lines skipped while reading (with skip_bad_lines)."""

    def __init__(self):
        self.lines = 0


def _decompressed(raw: IO[bytes], path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
    return raw


def _json_lines(f: IO[bytes], shard: ShardFile, text_field: str, skip_bad: bool, skipped: SkipCounter):
    for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        line, bad = decode_counting(raw)
        try:
            value = json.loads(line)[text_field]
            if not isinstance(value, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, IndexError):
            if skip_bad:
                skipped.lines += 1
                continue
            raise DataError(
                f"{shard.path}:{lineno} is not a JSON object with a string {text_field!r} field: fix the line, set "
                "--data.text-field, or pass --data.skip-bad-lines"
            ) from None
        yield value, bad


def _parquet(f: IO[bytes], shard: ShardFile, text_field: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(f)
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{shard.path} has no column {text_field!r}; its columns are {', '.join(columns)}: set --data.text-field"
        )
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                yield decode_counting(value)
            else:
                yield ("" if value is None else str(value)), 0


def read_documents(
    shard: ShardFile, text_field: str, skip_bad_lines: bool, skipped: SkipCounter | None = None
) -> Iterator[tuple[str, int]]:
    """(text, undecodable bytes) of each document of a shard file, in file order (empty ones included)."""
    skipped = skipped or SkipCounter()
    with storage.open(shard.path, "rb") as raw:
        if shard.path.endswith(".parquet"):
            yield from _parquet(raw, shard, text_field)
            return
        f = _decompressed(raw, shard.path)
        try:
            yield from _json_lines(f, shard, text_field, skip_bad_lines, skipped)
        except (OSError, EOFError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise DataError(f"{shard.path} is not a readable {shard.path.rsplit('.', 1)[-1]} file ({e}): "
                            "replace the file") from None


def tokenizer_sample(data_config: DataConfig, shards: list[ShardFile]) -> Iterator[str]:
    """Train documents drawn across the train files (up to _SAMPLE_FILES of them, evenly spaced), an equal share
    of `tokenizer_sample_bytes` from each, rather than the first bytes of the first file."""
    train = [s for s in shards if s.split != "validation"]
    count = min(len(train), _SAMPLE_FILES)
    picked = [train[(i * len(train)) // count] for i in range(count)]
    share = data_config.tokenizer_sample_bytes // count + 1
    for shard in picked:
        taken = 0
        for text, _ in read_documents(shard, data_config.text_field, data_config.skip_bad_lines):
            if not text or split_of(text, shard, data_config.val_fraction) != "train":
                continue
            yield text
            taken += len(text)
            if taken >= share:
                break
