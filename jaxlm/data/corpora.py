"""Corpora as TFDS datasets: local files built once into the cache as ArrayRecord, or TFDS catalog datasets.

`open_corpus(data_config)` returns a `Corpus` whose splits are random-access sources of documents. Local corpora
(`pystdlib`, `pysrc`, `text:<glob>`) are prepared by `LocalCorpus`, a TFDS builder, into
`<cache>/corpora/<kind>-<fingerprint>/`; the fingerprint covers the matched files (paths, sizes, mtimes), the
Python version and every setting that changes the documents or the split, so a changed corpus is rebuilt and an
unchanged one reused. A document goes to validation when a stable hash of its key falls below `val_fraction`.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.config import DataConfig
from jaxlm.data.tokenizer import make_cache_dir
from jaxlm.errors import DataError

CORPUS_VERSION = "1.0.0"  # bump when the document layout or split rule changes: old caches are then ignored
# Folders of the standard library that are not library source: third-party packages and test suites.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Document:
    key: str  # unique within the corpus (a path, or path:line for .jsonl)
    text: str
    undecodable_bytes: int
    split: str


@dataclass
class Corpus:
    """A prepared corpus: where it lives and how to read each split."""

    source: str
    fingerprint: str
    text_field: str
    splits: dict[str, str]  # jaxlm split ("train" | "validation") -> the dataset's split name
    stats: dict[str, Any]  # documents, bytes, undecodable bytes, skipped lines per split
    dataset_dir: str = ""
    _open: Callable[[str], Sequence[Any]] | None = field(default=None, repr=False)
    large: bool = False  # too big to read whole for a character vocabulary (catalog datasets)

    def source_of(self, split: str) -> Sequence[Any]:
        """A random-access sequence of records (dicts) of one jaxlm split ("train" or "validation")."""
        return self._open(self.splits[split])

    def texts(self, split: str, max_bytes: int | None = None) -> Iterator[str]:
        """The documents of a split in stored order (TFDS stores them shuffled), up to about max_bytes."""
        src = self.source_of(split)
        total = 0
        for i in range(len(src)):
            text = record_text(src[i], self.text_field)
            yield text
            total += len(text)
            if max_bytes is not None and total >= max_bytes:
                return


def _field(record: dict[str, Any], text_field: str) -> Any:
    value = record[text_field]
    if isinstance(value, np.ndarray):
        value = value.item()
    return value


def record_text(record: dict[str, Any], text_field: str) -> str:
    value = _field(record, text_field)
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def record_text_counting(record: dict[str, Any], text_field: str) -> tuple[str, int]:
    """The text of a record and how many of its bytes were not valid UTF-8."""
    value = _field(record, text_field)
    if isinstance(value, bytes):
        text, bad = decode_counting(value)
        # Local corpora were decoded (and counted) when they were built; the stored text is valid UTF-8.
        if "undecodable_bytes" in record:
            bad += int(_field(record, "undecodable_bytes"))
        return text, bad
    return str(value), 0


def decode_counting(data: bytes) -> tuple[str, int]:
    """UTF-8 decoding that replaces invalid bytes with U+FFFD and counts them."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts: list[str] = []
    bad = 0
    start = 0
    while True:
        try:
            parts.append(data[start:].decode("utf-8"))
            return "".join(parts), bad
        except UnicodeDecodeError as e:
            parts.append(data[start : start + e.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += e.end - e.start
            start += e.end


def stable_fraction(key: str) -> float:
    """A hash of `key` mapped to [0, 1), the same on every machine and Python run."""
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_of(key: str, val_fraction: float) -> str:
    return "validation" if stable_fraction(key) < val_fraction else "train"


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _file_identity(paths: list[str]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


# --- the embedded corpus -------------------------------------------------------------------------------------


def stdlib_files() -> tuple[str, list[str]]:
    """The running interpreter's standard-library .py files outside tests and third-party packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP_DIRS)
        files.extend(os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))
    return root, files


def pysrc_files() -> tuple[list[str], list[str]]:
    """The folders of the running interpreter's sys.path that hold installed Python (the standard library and
    the environment's site-packages) and every .py file under them (the standard library's own test suites
    included; the base interpreter's site-packages, which a virtual environment does not see, left out)."""
    paths = sysconfig.get_paths()
    roots = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib") if os.path.isdir(paths[k])})
    skip = {"__pycache__", "site-packages", "dist-packages"}
    files = []
    for root in roots:
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip or os.path.join(d, x) in roots)
            files.extend(os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))
    return roots, files


def _pysrc_documents(files: list[str], val_fraction: float) -> Callable[[], Iterator[Document]]:
    """One document per distinct content (vendored copies of a module count once), keyed and split by it."""

    def documents() -> Iterator[Document]:
        seen: set[str] = set()
        for path in files:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # a broken link among the installed files
            key = hashlib.sha256(data).hexdigest()[:32]
            if key in seen:
                continue
            seen.add(key)
            text, bad = decode_counting(data)
            yield Document(key, text, bad, _split_of(key, val_fraction))

    return documents


def _stdlib_documents(root: str, files: list[str], val_fraction: float) -> Callable[[], Iterator[Document]]:
    def documents() -> Iterator[Document]:
        for path in files:
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            with open(path, "rb") as f:
                text, bad = decode_counting(f.read())
            yield Document(rel, text, bad, _split_of(rel, val_fraction))

    return documents


# --- text:<glob> ---------------------------------------------------------------------------------------------


def _text_documents(
    files: list[str], text_field: str, val_fraction: float, skip_bad_lines: bool, skipped: list[int]
) -> Callable[[], Iterator[Document]]:
    """Documents of .txt files (one per file) and .jsonl files (one per line); skipped[0] counts bad lines."""

    def documents() -> Iterator[Document]:
        skipped[0] = 0
        for path in files:
            if path.endswith(".jsonl"):
                with open(path, "rb") as f:
                    for lineno, raw in enumerate(f, start=1):
                        if not raw.strip():
                            continue
                        line, bad = decode_counting(raw)
                        try:
                            obj = json.loads(line)
                            value = obj[text_field]
                            if not isinstance(value, str):
                                raise TypeError
                        except (ValueError, KeyError, TypeError, IndexError):
                            if skip_bad_lines:
                                skipped[0] += 1
                                continue
                            raise DataError(
                                f"{path}:{lineno} is not a JSON object with a string {text_field!r} field: fix the "
                                "line, set --data.text-field, or pass --data.skip-bad-lines"
                            ) from None
                        # Content decides the split, so duplicated documents never straddle train and validation.
                        yield Document(f"{path}:{lineno}", value, bad, _split_of(value, val_fraction))
            else:
                with open(path, "rb") as f:
                    text, bad = decode_counting(f.read())
                yield Document(path, text, bad, _split_of(text, val_fraction))

    return documents


def glob_files(pattern: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    return sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))


# --- the TFDS builder ----------------------------------------------------------------------------------------


class LocalCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents of local files, one example per document."""

    VERSION = tfds.core.Version(CORPUS_VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksum or metadata files live beside this class; tfds's search for them fails inside a package.
        return None

    def __init__(self, *, documents: Callable[[], Iterator[Document]] | None = None, **kwargs):
        self._documents = documents
        super().__init__(**kwargs)

    def _info(self):
        # dataset_info_from_configs needs package metadata files; a plain DatasetInfo does not.
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "key": tfds.features.Text(), "undecodable_bytes": np.int32}
        )
        return tfds.core.DatasetInfo(builder=self, features=features, description="jaxlm local corpus")

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split):
        for doc in self._documents():
            if doc.split == split:
                yield doc.key, {"text": doc.text, "key": doc.key, "undecodable_bytes": doc.undecodable_bytes}


def _scan(documents: Callable[[], Iterator[Document]]) -> dict[str, Any]:
    """Counts documents, bytes and undecodable bytes per split (and finds bad input before building)."""
    stats: dict[str, Any] = {}
    for split in ("train", "validation"):
        stats[split] = {"documents": 0, "bytes": 0, "undecodable_bytes": 0}
    empty = 0
    for doc in documents():
        if not doc.text:
            empty += 1
            continue
        s = stats[doc.split]
        s["documents"] += 1
        s["bytes"] += len(doc.text.encode("utf-8"))
        s["undecodable_bytes"] += doc.undecodable_bytes
    stats["empty_documents"] = empty
    return stats


def _nonempty(documents: Callable[[], Iterator[Document]]) -> Callable[[], Iterator[Document]]:
    return lambda: (d for d in documents() if d.text)


class SplitSource:
    """One split of a prepared TFDS dataset, opened lazily so that grain can send it to worker processes."""

    def __init__(self, dataset_dir: str, split: str):
        self.dataset_dir, self.split = dataset_dir, split
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            self._source = tfds.builder_from_directory(self.dataset_dir).as_data_source(split=self.split)
        return self._source

    def __getstate__(self):
        return {"dataset_dir": self.dataset_dir, "split": self.split, "_source": None, "_len": self._len}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._open()[index]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return self._open().__getitems__(indices)

    def __repr__(self) -> str:
        return f"SplitSource({self.dataset_dir!r}, {self.split!r})"


def file_record(path: str, sha256: str | None = None) -> dict[str, Any]:
    """What a prepared file must still be when it is opened: its size and SHA-256 (computed unless given)."""
    if sha256 is None:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": sha256}


def damage(path: str, expected: dict[str, Any]) -> str | None:
    """How a prepared file differs from its `file_record` at writing (None: it does not)."""
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"has {size:,} bytes, not the {expected['bytes']:,} written"
    if file_record(path)["sha256"] != expected["sha256"]:
        return "does not match the checksum it was written with"
    return None


def _dataset_files(dataset_dir: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), dataset_dir) for d, _, names in os.walk(dataset_dir) for n in names
    )


def _open_local(dataset_dir: str) -> Callable[[str], Sequence[Any]]:
    return lambda split: SplitSource(dataset_dir, split)


def _prepare_local(
    source: str, kind: str, fingerprint: str, documents: Callable[[], Iterator[Document]], cache_dir: str,
    skipped: list[int] | None = None, describe: str = "",
) -> Corpus:
    data_dir = os.path.join(cache_dir, "corpora", f"{kind}-{fingerprint}")
    dataset_dir = os.path.join(data_dir, "local_corpus", CORPUS_VERSION)
    meta_path = os.path.join(data_dir, "corpus.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            stats = json.load(f)
        for name, expected in stats.get("files", {}).items():
            why = damage(os.path.join(dataset_dir, name), expected)
            if why:
                raise DataError(
                    f"the prepared corpus file {os.path.join(dataset_dir, name)} {why}: delete {data_dir} and rerun "
                    f"to prepare {source} again"
                )
    else:
        make_cache_dir(data_dir, cache_dir)  # before the scan: an unusable cache fails at once
        stats = _scan(documents)
        if skipped is not None:
            stats["skipped_lines"] = skipped[0]
        if stats["train"]["documents"] + stats["validation"]["documents"] == 0:
            raise DataError(f"every document of {describe or source} is empty: point the source at files with text")
        if stats["train"]["documents"] == 0:
            raise DataError(f"the train split of {source} is empty: lower --data.val-fraction or add documents")
        if stats["validation"]["documents"] == 0:
            raise DataError(
                f"the validation split of {source} is empty ({stats['train']['documents']} documents, val_fraction "
                "too small): raise --data.val-fraction or add documents"
            )
        builder = LocalCorpus(documents=_nonempty(documents), data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
        stats["files"] = {name: file_record(os.path.join(dataset_dir, name)) for name in _dataset_files(dataset_dir)}
        os.makedirs(data_dir, exist_ok=True)
        tmp = f"{meta_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp, meta_path)
    return Corpus(
        source=source, fingerprint=fingerprint, text_field="text",
        splits={"train": "train", "validation": "validation"}, stats=stats, dataset_dir=dataset_dir,
        _open=_open_local(dataset_dir),
    )


def open_corpus(data_config: DataConfig) -> Corpus:
    """Prepares (once) and opens the corpus named by `data_config.source`."""
    source = data_config.source
    cache_dir = data_config.resolved_cache_dir
    make_cache_dir(cache_dir, write=False)  # the tokenizer and token files go there too, whatever the source
    if source == "pystdlib":
        root, files = stdlib_files()
        if not files:
            raise DataError(f"no .py files under the standard library at {root}: use --data.source text:<glob>")
        ident = {
            "kind": "pystdlib", "python": sys.version, "root": root, "files": _file_identity(files),
            "val_fraction": data_config.val_fraction, "version": CORPUS_VERSION,
        }
        documents = _stdlib_documents(root, files, data_config.val_fraction)
        return _prepare_local(source, "pystdlib", _fingerprint(ident), documents, cache_dir, describe=root)
    if source == "pysrc":
        roots, files = pysrc_files()
        ident = {
            "kind": "pysrc", "python": sys.version, "roots": roots, "files": _file_identity(files),
            "val_fraction": data_config.val_fraction, "version": CORPUS_VERSION,
        }
        documents = _pysrc_documents(files, data_config.val_fraction)
        return _prepare_local(source, "pysrc", _fingerprint(ident), documents, cache_dir,
                              describe=f"the {len(files)} .py files under {', '.join(roots)}")
    if source.startswith("text:"):
        pattern = source[len("text:") :]
        files = glob_files(pattern)
        if not files:
            raise DataError(f"no file matches {pattern!r}: check the glob (use ** for subfolders)")
        ident = {
            "kind": "text", "files": _file_identity([os.path.abspath(p) for p in files]),
            "text_field": data_config.text_field, "skip_bad_lines": data_config.skip_bad_lines,
            "val_fraction": data_config.val_fraction, "version": CORPUS_VERSION,
        }
        skipped = [0]
        documents = _text_documents(
            files, data_config.text_field, data_config.val_fraction, data_config.skip_bad_lines, skipped
        )
        return _prepare_local(
            source, "text", _fingerprint(ident), documents, cache_dir, skipped=skipped,
            describe=f"the {len(files)} files matching {pattern!r}",
        )
    if source.startswith("tfds:"):
        return _open_tfds(data_config)
    raise DataError(f"unknown data source {source!r}: use pystdlib, pysrc, text:<glob> or tfds:<name>[:<version>]")


def _prepared_tfds_datasets(data_dir: str) -> list[str]:
    """`name[/config]:version` of every dataset prepared under a TFDS data directory."""
    found = []
    for info in sorted(globlib.glob(os.path.join(data_dir, "**", "dataset_info.json"), recursive=True)):
        rel = os.path.relpath(os.path.dirname(info), data_dir).replace(os.sep, "/")
        name, _, version = rel.rpartition("/")
        if name and not name.startswith("downloads"):
            found.append(f"{name}:{version}")
    return found


def _open_tfds(data_config: DataConfig) -> Corpus:
    """A TFDS dataset already prepared (as ArrayRecord) in `data_config.tfds_data_dir`."""
    spec = data_config.source[len("tfds:") :]
    name, _, version = spec.partition(":")
    data_dir = os.path.expanduser(data_config.tfds_data_dir) if data_config.tfds_data_dir else None
    where = data_dir or "the default TFDS data directory"

    def available() -> str:
        names = _prepared_tfds_datasets(data_dir) if data_dir and os.path.isdir(data_dir) else []
        return ", ".join(names) if names else "none"

    if not name:
        raise DataError(f"DataConfig.source={data_config.source!r} names no dataset: use tfds:<name>[:<version>]")
    try:
        builder = tfds.builder(f"{name}:{version}" if version else name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for names it cannot resolve
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"TFDS dataset {spec!r} is not available in {where} ({reason[:200]}); prepared there: {available()}"
        ) from None
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {spec!r} is not prepared in {where} (prepared there: {available()}): build it with "
            f"`tfds build {name} --data_dir <dir> --file_format array_record` and set --data.tfds-data-dir"
        )
    info = builder.info
    splits = sorted(info.splits.keys())
    for wanted, option in ((data_config.train_split, "train_split"), (data_config.val_split, "val_split")):
        if wanted not in info.splits:
            raise DataError(
                f"TFDS dataset {spec!r} has no split {wanted!r}; its splits are {', '.join(splits)}: "
                f"set --data.{option}"
            )
    features = list(info.features.keys()) if hasattr(info.features, "keys") else []
    if data_config.text_field not in features:
        raise DataError(
            f"TFDS dataset {spec!r} has no feature {data_config.text_field!r}; its features are "
            f"{', '.join(features) or 'none'}: set --data.text-field"
        )
    if str(info.file_format).split(".")[-1].lower() != "array_record":
        raise DataError(
            f"TFDS dataset {spec!r} is stored as {info.file_format}, which grain cannot read at random: rebuild it "
            "with --file_format array_record"
        )
    ident = {
        "kind": "tfds", "name": name, "version": str(info.version), "data_dir": os.path.abspath(builder.data_dir),
        "splits": {s: info.splits[s].num_examples for s in (data_config.train_split, data_config.val_split)},
        "text_field": data_config.text_field, "version_jaxlm": CORPUS_VERSION,
    }
    split_names = {"train": data_config.train_split, "validation": data_config.val_split}

    stats = {s: {"documents": info.splits[split_names[s]].num_examples} for s in split_names}
    return Corpus(
        source=data_config.source, fingerprint=_fingerprint(ident), text_field=data_config.text_field,
        splits=split_names, stats=stats, dataset_dir=str(builder.data_dir), _open=_open_local(str(builder.data_dir)),
        large=True,
    )
