"""Tokenizers: sentencepiece (trained here or loaded from a .model file), Hugging Face `tokenizers` (a
tokenizer.json, or a model directory that holds one), bytes, and characters.

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
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_model

from jaxlm import storage
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


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...}, or null."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


# End-of-text names of well-known tokenizers, for a bare tokenizer.json with no tokenizer_config.json beside it.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (GPT-2's, Llama 3's, Qwen's byte-level BPE, or any other), with the
    special tokens its model directory declares.

    `encode` adds no special tokens and reads text as text: a literal "<|endoftext|>" in a document is encoded
    as characters, never as the end-of-text token, so `decode` (which drops special tokens) gives the text back.
    The special ids come from tokenizer_config.json beside the file (bos_token, eos_token, pad_token), then from
    the model's config.json and generation_config.json (bos_token_id, eos_token_id), then from the tokenizer
    itself (the token its post-processor puts before a text is bos; a single special token, or one of the usual
    end-of-text names, is eos). bos_id is -1 when there is none (GPT-2 and Qwen put nothing before a text).
    """

    def __init__(
        self,
        tokenizer_json: str,
        name: str = "tokenizer.json",
        settings: dict[str, Any] | None = None,
        tokenizer_config: dict[str, Any] | None = None,
    ):
        self.tokenizer_json, self.name, self.settings = tokenizer_json, name, settings or {}
        self.tokenizer_config = tokenizer_config or {}  # written back beside tokenizer.json by `save_hf_tokenizer`
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{name} is not a Hugging Face tokenizer.json ({reason}): check the file") from None
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = self._special_id("eos", self._default_eos(vocab))
        if self.eos_id < 0:
            raise DataError(
                f"the tokenizer {name} has no end-of-sequence token: give its model directory (with "
                "tokenizer_config.json naming eos_token) rather than the tokenizer.json alone"
            )
        prefix = self._tok.encode("", add_special_tokens=True).ids
        self.bos_id = self._special_id("bos", prefix[0] if prefix else -1)
        self.pad_id = self._special_id("pad", self.eos_id)  # padding never reaches the loss: eos serves
        unk = getattr(self._tok.model, "unk_token", None)
        self.unk_id = vocab.get(unk, -1) if unk else -1

    def _special_id(self, role: str, default: int) -> int:
        """The id of the bos, eos or pad token named in the settings, else `default`."""
        token = _token_name(self.settings.get(f"{role}_token"))
        if token is not None:
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise DataError(f"the {role}_token {token!r} of {self.name} is not in its vocabulary: check the files")
            return token_id
        token_id = self.settings.get(f"{role}_token_id")
        if isinstance(token_id, list):  # several stop ids: the first is the end of a text
            token_id = token_id[0] if token_id else None
        return token_id if isinstance(token_id, int) and 0 <= token_id < self.vocab_size else default

    def _default_eos(self, vocab: dict[str, int]) -> int:
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        if len(specials) == 1:
            return vocab[specials[0]]
        return next((vocab[n] for n in _EOS_NAMES if n in specials), -1)

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("tokenizer_json", "name", "settings", "tokenizer_config")}

    def __setstate__(self, state):
        self.__init__(**state)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=True)

    def decode_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (a special token's name)."""
        return self._tok.id_to_token(token_id)


Tokenizer = SentencePieceTokenizer | HFTokenizer | ByteTokenizer | CharTokenizer

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_FILE = "tokenizer.model"
# Files of a model directory that name its special tokens, read in this order (the first to name one wins).
_SETTINGS_FILES = (HF_TOKENIZER_CONFIG, "config.json", "generation_config.json")
NAMED_KINDS = ("sentencepiece-bpe", "sentencepiece-unigram", "byte", "char")


def _read_json(path: str) -> dict[str, Any]:
    try:
        value = json.loads(storage.read_text(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read as JSON ({e}): check the file") from None
    return value if isinstance(value, dict) else {}


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """A tokenizer.json file, with the special tokens named by the JSON settings files beside it."""
    if not storage.isfile(path):
        raise DataError(f"tokenizer file {path!r} does not exist: give a tokenizer.json or a Hugging Face model "
                        "directory")
    text = storage.read_text(path)
    folder = storage.dirname(storage.abspath(path))
    settings: dict[str, Any] = {}
    found = {name: _read_json(storage.join(folder, name)) for name in _SETTINGS_FILES
             if storage.isfile(storage.join(folder, name))}
    for values in found.values():
        for role in ("bos", "eos", "pad"):
            for key in (f"{role}_token", f"{role}_token_id"):
                if values.get(key) is not None:
                    settings.setdefault(key, values[key])
    return HFTokenizer(text, storage.basename(path), settings, found.get(HF_TOKENIZER_CONFIG))


def save_hf_tokenizer(tokenizer: HFTokenizer, folder: str) -> None:
    """Write tokenizer.json and a tokenizer_config.json naming its special tokens, as transformers'
    `AutoTokenizer.from_pretrained(folder)` and `load_hf_tokenizer` read them."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.tokenizer_config}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id")
        config[f"{role}_token"] = tokenizer.decode_token(token_id) if token_id >= 0 else None
    storage.makedirs(folder)
    storage.write_text_atomic(storage.join(folder, HF_TOKENIZER_FILE), tokenizer.tokenizer_json)
    storage.write_text_atomic(storage.join(folder, HF_TOKENIZER_CONFIG), json.dumps(config, indent=2))


def is_named_kind(kind: str) -> bool:
    """Whether DataConfig.tokenizer names a kind built here (trained or fixed) rather than a file or directory."""
    return kind in NAMED_KINDS


def tokenizer_file(kind: str) -> str:
    """The file that holds a given tokenizer: a .model or .json path as it is, or in a Hugging Face model
    directory its tokenizer.model (sentencepiece, as Llama 2 ships it) or else its tokenizer.json."""
    if kind.endswith((".model", ".json")) and not storage.isdir(kind):
        return kind
    if storage.isdir(kind):
        for name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE):
            if storage.isfile(storage.join(kind, name)):
                return storage.join(kind, name)
        raise DataError(
            f"DataConfig.tokenizer={kind!r} is a directory without {HF_TOKENIZER_FILE} or {SENTENCEPIECE_FILE}: "
            "give a Hugging Face model directory that holds its tokenizer, or a tokenizer file"
        )
    raise DataError(
        f"DataConfig.tokenizer={kind!r} is unknown: use sentencepiece-bpe, sentencepiece-unigram, byte, char, "
        "the path of a .model or tokenizer.json file, or a Hugging Face model directory"
    )


def load_pretrained(kind: str) -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer a DataConfig.tokenizer path names (see `tokenizer_file`)."""
    path = tokenizer_file(kind)
    return load_sentencepiece(path) if path.endswith(".model") else load_hf_tokenizer(path)


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
    if not is_named_kind(kind):
        path = tokenizer_file(kind)
        st = os.stat(path) if os.path.isfile(path) else None
        ident = json.dumps([os.path.abspath(path), st and st.st_size, st and st.st_mtime_ns])
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

    kind: str  # sentencepiece-bpe | sentencepiece-unigram | byte | char | <path>.model | <path>.json | <directory>
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
    if not is_named_kind(kind):
        return load_pretrained(kind), False
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
    path = os.path.join(cache_dir, key + ".model")  # sentencepiece-bpe or sentencepiece-unigram
    if os.path.isfile(path):
        return load_sentencepiece(path), False
    make_cache_dir(cache_dir)  # before training, which takes a while
    proto = train_sentencepiece(train_texts, kind.split("-")[1], spec.vocab_size, spec.sample_bytes)
    _write_atomic(path, proto)
    return SentencePieceTokenizer(proto, name=os.path.basename(path)), True
