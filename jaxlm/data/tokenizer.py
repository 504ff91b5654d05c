"""Tokenizers: sentencepiece (trained here or loaded from a .model file), bytes, and characters.

Every tokenizer has the same small interface: `vocab_size`, the special ids `pad_id`, `unk_id`, `bos_id`,
`eos_id`, `encode(str) -> list[int]` (no bos/eos added), `encode_batch(list[str]) -> list[list[int]]` and
`decode(ids) -> str` (special ids decode to nothing). `eos_id` separates documents in packed rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from jaxlm.errors import ConfigError, DataError

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3 for trained and char tokenizers
# Code needs newlines and tabs as whole pieces; sentencepiece would otherwise byte-encode them.
CODE_SYMBOLS = ("\n", "\t")
# sentencepiece skips training sentences longer than max_sentence_length, so documents are cut into chunks.
_CHUNK_BYTES = 2048
_MARKER = "\u2581"  # sentencepiece's visible space
# A trained model holds the 4 specials, the code symbols and 256 byte pieces before its first learned piece.
MIN_TRAINED_VOCAB = len(SPECIALS) + len(CODE_SYMBOLS) + 256 + 1


def _ids_list(ids: Sequence[int] | np.ndarray) -> list[int]:
    return np.asarray(ids).reshape(-1).astype(np.int64).tolist()


class SentencePieceTokenizer:
    """A sentencepiece model (BPE or unigram), from its serialized proto."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        self.model_proto = model_proto
        self.name = name
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.unk_id = int(self._sp.unk_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        # Llama-2 style models have no pad piece (-1); padding never reaches the loss, so unk serves.
        self.pad_id = pad if pad >= 0 else self.unk_id
        if self.eos_id < 0:
            raise DataError(f"the sentencepiece model {name} has no end-of-sequence piece: use a model with </s>")
        # sentencepiece writes spaces as U+2581, so that character in a text would come back as a space. Models
        # that promise exact round trips (byte fallback, no dummy prefix: ours) encode it as its three bytes.
        spec = sp_model.ModelProto()
        spec.ParseFromString(model_proto)
        marker = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _MARKER.encode("utf-8")]
        exact = spec.trainer_spec.byte_fallback and not spec.normalizer_spec.add_dummy_prefix
        self._marker_ids = marker if exact and self.unk_id not in marker else None

    def __getstate__(self):
        return {"model_proto": self.model_proto, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["name"])

    def encode(self, text: str) -> list[int]:
        if self._marker_ids is None or _MARKER not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_MARKER)):
            if i:
                ids.extend(self._marker_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        out = self._sp.encode(texts, num_threads=num_threads)
        if self._marker_ids is not None:
            out = [self.encode(t) if _MARKER in t else ids for t, ids in zip(texts, out)]
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # A model whose vocabulary is padded beyond the tokenizer's may sample ids it has no piece for.
        return self._sp.decode([i for i in _ids_list(ids) if 0 <= i < self.vocab_size])


class ByteTokenizer:
    """UTF-8 bytes 0..255, then pad, unk, bos, eos."""

    name = "byte"
    vocab_size = 260
    pad_id, unk_id, bos_id, eos_id = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids).reshape(-1)
        # A sampled sequence may end inside a multi-byte character: replace rather than fail.
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class CharTokenizer:
    """The corpus's characters after the four specials; an unseen character encodes to unk."""

    name = "char"
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(SPECIALS) + len(self.chars)
        self._index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        index, unk = self._index, self.unk_id
        return [index.get(c, unk) for c in text]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        offset, chars = len(SPECIALS), self.chars
        return "".join(chars[i - offset] if i >= offset else "" for i in _ids_list(ids) if i < self.vocab_size)


Tokenizer = SentencePieceTokenizer | ByteTokenizer | CharTokenizer


def _chunks(texts: Iterable[str], sample_bytes: int) -> Iterator[str]:
    """Pieces of at most ~_CHUNK_BYTES cut at line ends (long lines cut anywhere), up to sample_bytes in all."""
    total = 0
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            step = _CHUNK_BYTES // 4  # chars <= 4 bytes each
            if len(line) > step:  # a very long line: cut it, by index (slicing off the rest each time is quadratic)
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                pieces = (len(line) - 1) // step  # whole pieces before the last, which joins the buffer
                for start in range(0, pieces * step, step):
                    head = line[start : start + step]
                    yield head
                    total += len(head.encode("utf-8"))
                    if total >= sample_bytes:
                        return
                line = line[pieces * step :]
            nbytes = len(line.encode("utf-8"))
            if size + nbytes > _CHUNK_BYTES and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += nbytes
            total += nbytes
            if total >= sample_bytes:
                break
        if buf:
            yield "".join(buf)
        if total >= sample_bytes:
            return


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """A vocabulary too small for a trained tokenizer is a ConfigError, before any data is read."""
    if kind.startswith("sentencepiece-") and vocab_size < MIN_TRAINED_VOCAB:
        raise ConfigError(
            f"DataConfig.vocab_size={vocab_size} is below the {MIN_TRAINED_VOCAB} pieces a trained sentencepiece "
            f"tokenizer needs (4 special, newline and tab, 256 bytes, then learned ones): set --data.vocab-size to at "
            f"least {MIN_TRAINED_VOCAB}, or use --data.tokenizer byte"
        )


def train_sentencepiece(texts: Iterable[str], model_type: str, vocab_size: int, sample_bytes: int) -> bytes:
    """Trains a byte-fallback sentencepiece model that reproduces code exactly; returns the model proto."""
    check_vocab_size(f"sentencepiece-{model_type}", vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts, sample_bytes),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            # Exact round trips: no normalisation, keep every space, no invented leading space.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=list(CODE_SYMBOLS),
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=SPECIALS[0], unk_piece=SPECIALS[1], bos_piece=SPECIALS[2], eos_piece=SPECIALS[3],
            max_sentence_length=4 * _CHUNK_BYTES,
            num_threads=max(1, min(os.cpu_count() or 1, 16)),
            minloglevel=2,
        )
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if "Vocabulary size" in reason or "vocab_size" in reason:
            limit = re.search(r"<= *(\d+)", reason)
            most = f"at most {limit.group(1)}" if limit else "a smaller value"
            raise DataError(
                f"DataConfig.vocab_size={vocab_size} is larger than this corpus supports: set --data.vocab-size to "
                f"{most}, or use a larger corpus"
            ) from None
        raise DataError(f"sentencepiece training failed ({reason}): check the corpus and --data.vocab-size") from None
    return model.getvalue()


def load_sentencepiece(path: str) -> SentencePieceTokenizer:
    """Loads an existing .model file, with a DataError if it is missing or does not parse."""
    if not os.path.isfile(path):
        raise DataError(f"tokenizer model file {path!r} does not exist: give the path of a sentencepiece .model file")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        return SentencePieceTokenizer(proto, name=os.path.basename(path))
    except DataError:
        raise
    except Exception:
        raise DataError(f"tokenizer model file {path!r} is not a sentencepiece model: check the file") from None


def tokenizer_key(kind: str, vocab_size: int, corpus_fingerprint: str) -> str:
    """The cache key of a tokenizer: what it was trained on and how."""
    if kind == "byte":
        return "byte"
    if kind.endswith(".model"):
        st = os.stat(kind) if os.path.isfile(kind) else None
        ident = json.dumps([os.path.abspath(kind), st and st.st_size, st and st.st_mtime_ns])
        return "file-" + hashlib.sha256(ident.encode()).hexdigest()[:16]
    if kind == "char":
        return f"char-{corpus_fingerprint}"
    return f"{kind}-{vocab_size}-{corpus_fingerprint}"


def make_cache_dir(path: str, cache_dir: str | None = None, write: bool = True) -> None:
    """Create `path`, a folder of the data cache `cache_dir` (default: `path` itself), and with `write` check that
    it is writable; else raise a DataError naming --data.cache-dir, before any long work reads or trains."""
    shown = cache_dir or path
    fix = "set --data.cache-dir to a directory you can write, or leave it empty for ~/.cache/jaxlm"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        where = e.filename or path
        is_file = os.path.exists(where) and not os.path.isdir(where)
        why = f"{where} is not a directory" if is_file else f"{e.strerror or type(e).__name__}: {where}"
        raise DataError(f"cannot use the data cache directory {shown} ({why}): {fix}") from None
    if write and not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"cannot use the data cache directory {shown} ({path} is not writable): {fix}")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TokenizerSpec:
    """What `build_tokenizer` needs besides the texts."""

    kind: str  # sentencepiece-bpe | sentencepiece-unigram | byte | char | <path>.model
    vocab_size: int
    sample_bytes: int
    corpus_fingerprint: str


def build_tokenizer(
    spec: TokenizerSpec, cache_dir: str, train_texts: Iterable[str], all_texts: Iterable[str]
) -> tuple[Tokenizer, bool]:
    """Loads the tokenizer from the cache or trains and caches it; returns (tokenizer, was_built)."""
    kind = spec.kind
    if kind == "byte":
        return ByteTokenizer(), False
    if kind.endswith(".model"):
        return load_sentencepiece(kind), False
    make_cache_dir(cache_dir, write=False)  # a read-only cache is fine while it holds the tokenizer
    key = tokenizer_key(kind, spec.vocab_size, spec.corpus_fingerprint)
    if kind == "char":
        path = os.path.join(cache_dir, key + ".json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return CharTokenizer(json.load(f)["chars"]), False
        make_cache_dir(cache_dir)
        chars: set[str] = set()
        for text in all_texts:
            chars.update(text)
        tok = CharTokenizer("".join(chars))
        _write_atomic(path, json.dumps({"chars": tok.chars}).encode("utf-8"))
        return tok, True
    if kind in ("sentencepiece-bpe", "sentencepiece-unigram"):
        path = os.path.join(cache_dir, key + ".model")
        if os.path.isfile(path):
            return load_sentencepiece(path), False
        make_cache_dir(cache_dir)  # before training, which takes a while
        proto = train_sentencepiece(train_texts, kind.split("-")[1], spec.vocab_size, spec.sample_bytes)
        _write_atomic(path, proto)
        return SentencePieceTokenizer(proto, name=os.path.basename(path)), True
    raise DataError(
        f"DataConfig.tokenizer={kind!r} is unknown: use sentencepiece-bpe, sentencepiece-unigram, byte, char "
        "or the path of a .model file"
    )
