"""The data side: corpora, tokenizers, packing, sharding, resumption, and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig

import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import make_iterator, prepare_data
from jaxlm.errors import DataError

SEQ_LEN = 64
BATCH = 8


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jaxlm_cache"))


@pytest.fixture(scope="session")
def pystdlib(stdlib_cache):
    """The embedded corpus with a 1024-piece BPE tokenizer, prepared once per test session."""
    config = DataConfig(cache_dir=stdlib_cache, vocab_size=1024, seq_len=SEQ_LEN, batch_size=BATCH)
    return config, prepare_data(config)


def _expected_stdlib_validation(val_fraction: float) -> dict[str, str]:
    """The validation documents by the rule in the spec, computed here from the files themselves."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs = {}
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        for n in names:
            if not n.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
            h = int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) / 2**64
            with open(os.path.join(d, n), "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            if h < val_fraction and text:
                docs[rel] = text
    return docs


def _rows(batch):
    """Packed rows of seq_len + 1 tokens, rebuilt from inputs and targets."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def test_pystdlib_validation_split_round_trips_exactly(pystdlib):
    config, prepared = pystdlib
    expected = _expected_stdlib_validation(config.val_fraction)
    assert len(expected) > 10
    texts = sorted(prepared.corpus.texts("validation"))
    assert texts == sorted(expected.values())
    tok = prepared.tokenizer
    total_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, np.int32)) == text
        total_tokens += len(ids)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert prepared.stats["val_bytes_per_token"] == pytest.approx(total_bytes / total_tokens)
    assert prepared.stats["validation"]["roundtrip_failures"] == 0


def test_tokenizer_keeps_whitespace_tabs_and_unicode(pystdlib):
    _, prepared = pystdlib
    tok = prepared.tokenizer
    assert prepared.vocab_size == tok.vocab_size == 1024
    assert len({tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id}) == 4
    texts = [" leading", "x  =  1\n\n\n", "\tif x:\r\n\t\treturn 'é☃🙂'  ", "   \n", "1234567890", "日本語 テキスト"]
    for text in texts + ["a\u2581b \u2581"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text


def test_prepare_is_cached(pystdlib, capsys):
    config, prepared = pystdlib
    again = prepare_data(config)
    assert again.stats == prepared.stats
    assert capsys.readouterr().out == ""  # statistics are printed only when the data is built


def test_batches_are_shifted_packed_documents(pystdlib):
    """One epoch of validation rows is the validation documents, each once, joined by eos."""
    config, prepared = pystdlib
    eos = prepared.tokenizer.eos_id
    it = make_iterator(config, prepared, "validation", seed=3, epochs=1)
    batches = list(it)
    assert batches, "one epoch must hold at least one batch"
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (BATCH, SEQ_LEN)
        assert b["inputs"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    stream = np.concatenate([_rows(b).reshape(-1) for b in batches])
    cuts = np.flatnonzero(stream == eos)
    pieces = np.split(stream, cuts + 1)
    complete = [prepared.tokenizer.decode(p[:-1]) for p in pieces[:-1]]
    expected = sorted(prepared.corpus.texts("validation"))
    assert len(complete) == len(set(complete))  # no document twice in an epoch
    assert set(complete) <= set(expected)
    missing = set(expected) - set(complete)
    tail = prepared.tokenizer.decode(pieces[-1])
    assert any(doc.startswith(tail) for doc in missing) or (not tail and not missing)
    # Only the epoch's tail (less than a batch of rows, plus the part row) is dropped.
    total = prepared.stats["validation"]["tokens"] + len(expected)
    assert stream.size % (BATCH * (SEQ_LEN + 1)) == 0
    assert 0 <= total - stream.size < (BATCH + 1) * (SEQ_LEN + 1)


def test_shuffled_rows_are_the_same_rows_in_a_random_order(pystdlib):
    config, prepared = pystdlib
    plain = np.concatenate([_rows(b) for b in make_iterator(config, prepared, "validation", seed=0, epochs=1)])
    shuffled = [_rows(b) for b in make_iterator(config, prepared, "validation", seed=0, epochs=1, shuffle_rows=True)]
    again = next(make_iterator(config, prepared, "validation", seed=0, shuffle_rows=True))
    np.testing.assert_array_equal(_rows(again), shuffled[0])  # a fixed order: every evaluation reads the same rows
    shuffled = np.concatenate(shuffled)
    assert shuffled.shape == plain.shape and not np.array_equal(shuffled, plain)
    # Apart from the epoch's dropped tail, the same rows: each row of the shuffled epoch is a row of the packed one.
    packed = {row.tobytes() for row in plain}
    tail = {row.tobytes() for row in shuffled} - packed
    assert len(tail) < BATCH
    # The first batch comes from all over the epoch, not from its first rows.
    positions = sorted(np.flatnonzero([row.tobytes() in {r.tobytes() for r in shuffled[:BATCH]} for row in plain]))
    assert positions and positions[-1] > len(plain) // 2


def test_shuffled_training_rows_resume_exactly_and_refuse_a_state_of_the_other_order(pystdlib):
    config, prepared = pystdlib
    it = make_iterator(config, prepared, "train", seed=3, shuffle_rows=True)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["inputs"] for _ in range(2)]
    again = make_iterator(config, prepared, "train", seed=3, shuffle_rows=True)
    again.set_state(state)
    for expected in want:
        np.testing.assert_array_equal(next(again)["inputs"], expected)
    with pytest.raises(DataError, match="shuffle_rows"):
        make_iterator(config, prepared, "train", seed=3).set_state(state)  # rows in the packed order: refused


def test_global_batch_is_split_between_processes(pystdlib):
    config, prepared = pystdlib
    whole = make_iterator(config, prepared, "train", seed=5)
    parts = [make_iterator(config, prepared, "train", seed=5, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        full = next(whole)
        halves = [next(p) for p in parts]
        for key in full:
            assert halves[0][key].shape[0] == BATCH // 2
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


def test_state_resumes_with_the_next_batch(pystdlib):
    config, prepared = pystdlib
    it = make_iterator(config, prepared, "train", seed=7)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    restored = make_iterator(config, prepared, "train", seed=7)
    restored.set_state(json.loads(json.dumps(state)))
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])


def test_seed_changes_the_order(pystdlib):
    config, prepared = pystdlib
    a = next(make_iterator(config, prepared, "train", seed=0))
    b = next(make_iterator(config, prepared, "train", seed=1))
    assert not np.array_equal(a["inputs"], b["inputs"])


def test_epochs_wrap_with_a_new_shuffle(pystdlib):
    config, prepared = pystdlib
    it = make_iterator(config, prepared, "validation", seed=0)
    per_epoch = it.rows_per_epoch // BATCH
    first = [_rows(next(it)) for _ in range(per_epoch)]
    assert it.epoch == 0
    second = [_rows(next(it)) for _ in range(per_epoch)]
    assert it.epoch >= 1
    assert not np.array_equal(first[0], second[0])


def test_document_mask_marks_segments_and_positions(pystdlib):
    config, prepared = pystdlib
    config = dataclasses.replace(config, document_mask=True)
    eos = prepared.tokenizer.eos_id
    batch = next(make_iterator(config, prepared, "validation", seed=1))
    for row, seg, pos in zip(batch["inputs"], batch["segment_ids"], batch["positions"]):
        want_seg, want_pos = [], []
        s, p = 1, 0
        for t, tok in enumerate(row):
            want_seg.append(s)
            want_pos.append(p)
            p += 1
            if tok == eos:  # the end token belongs to the document it ends
                s, p = s + 1, 0
        np.testing.assert_array_equal(seg, want_seg)
        np.testing.assert_array_equal(pos, want_pos)


# --- small text corpora and bad input ------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_vocab_larger_than_corpus_is_a_data_error(tmp_path):
    for i in range(6):
        _write(tmp_path / "docs" / f"{i}.txt", f"tiny document {i}\n")
    config = DataConfig(source=f"text:{tmp_path}/docs/*.txt", cache_dir=str(tmp_path / "cache"), vocab_size=5000,
                        val_fraction=0.5, seq_len=4, batch_size=1)
    with pytest.raises(DataError, match="vocab_size"):
        prepare_data(config)


def test_validation_split_too_small_for_a_batch(pystdlib):
    config, _ = pystdlib
    with pytest.raises(DataError, match="validation split.*fewer than one batch"):
        prepare_data(dataclasses.replace(config, batch_size=512, seq_len=1024))


def test_glob_matching_nothing(tmp_path):
    config = DataConfig(source=f"text:{tmp_path}/nothing/*.txt", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no file matches"):
        prepare_data(config)


def test_unusable_cache_dir_is_a_data_error_naming_the_flag(tmp_path):
    from jaxlm.data.tokenizer import TokenizerSpec, build_tokenizer

    (tmp_path / "a_file").write_text("x")
    for cache_dir in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(DataError, match=r"cannot use the data cache directory .*: set --data.cache-dir"):
            prepare_data(DataConfig(cache_dir=str(cache_dir)))  # fails before the standard library is read
    with pytest.raises(DataError, match="a_file is not a directory"):
        build_tokenizer(TokenizerSpec("char", 0, 1, "fp"), str(tmp_path / "a_file"), [], [])


def _text_corpus(root, n=40):
    """Code-like .txt documents and a .jsonl file; returns every non-empty document, as the files hold them."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "value", "é", "日本", "🙂", "1234", "if", "\t", "  ", "    ", "\n", "\u2581"]
    docs = []
    for i in range(n):
        text = f"# file {i}\n" + "".join(str(rng.choice(words)) + rng.choice([" ", "\n", ""]) for _ in range(80))
        _write(root / "txt" / f"{i:03d}.txt", text)
        docs.append(text)
    lines = []
    for i in range(n):
        body = f"line doc {i}:\n    indented {'ü' * (i % 3)}\tend"
        lines.append(json.dumps({"body": body, "other": i}))
        docs.append(body)
    _write(root / "jsonl" / "part.jsonl", "\n".join(lines) + "\n")
    return docs


def test_text_corpus_reads_txt_and_jsonl(tmp_path):
    docs = _text_corpus(tmp_path / "data")
    (tmp_path / "data" / "txt" / "empty.txt").write_text("")
    config = DataConfig(source=f"text:{tmp_path}/data/**/*.*", text_field="body", tokenizer="byte",
                        cache_dir=str(tmp_path / "cache"), val_fraction=0.25, seq_len=16, batch_size=2)
    prepared = prepare_data(config)
    train, val = list(prepared.corpus.texts("train")), list(prepared.corpus.texts("validation"))
    assert sorted(train + val) == sorted(docs)
    assert 0 < len(val) < len(docs) // 2
    assert prepared.stats["empty_documents"] == 1
    assert prepared.stats["validation"]["bytes"] == sum(len(t.encode()) for t in val)


def test_text_corpus_is_rebuilt_when_a_file_changes(tmp_path, capsys):
    for i in range(8):
        _write(tmp_path / "d" / f"{i}.txt", f"document number {i} " * 50)
    config = DataConfig(source=f"text:{tmp_path}/d/*.txt", tokenizer="byte", cache_dir=str(tmp_path / "c"),
                        val_fraction=0.4, seq_len=8, batch_size=2)
    first = prepare_data(config)
    capsys.readouterr()
    assert prepare_data(config).fingerprint == first.fingerprint
    assert capsys.readouterr().out == ""  # reused, not rebuilt
    changed = tmp_path / "d" / "3.txt"
    changed.write_text("a changed document " * 40)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    second = prepare_data(config)
    assert second.fingerprint != first.fingerprint
    texts = set(second.corpus.texts("train")) | set(second.corpus.texts("validation"))
    assert "a changed document " * 40 in texts and "document number 3 " * 50 not in texts


def test_bad_jsonl_line_is_reported_or_skipped(tmp_path):
    good = [json.dumps({"text": f"good document {i} " * 20}) for i in range(10)]
    lines = good[:3] + ["{not json"] + good[3:6] + [json.dumps({"title": "no text field"})] + good[6:]
    _write(tmp_path / "d" / "a.jsonl", "\n".join(lines) + "\n")
    config = DataConfig(source=f"text:{tmp_path}/d/*.jsonl", tokenizer="byte", cache_dir=str(tmp_path / "c"),
                        val_fraction=0.3, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match=r"a\.jsonl:4 .*--data\.skip-bad-lines"):
        prepare_data(config)
    prepared = prepare_data(dataclasses.replace(config, skip_bad_lines=True))
    assert prepared.stats["skipped_lines"] == 2
    assert prepared.stats["train"]["documents"] + prepared.stats["validation"]["documents"] == 10


def test_every_file_empty(tmp_path):
    for i in range(3):
        _write(tmp_path / "d" / f"{i}.txt", "")
    config = DataConfig(source=f"text:{tmp_path}/d/*.txt", tokenizer="byte", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="empty"):
        prepare_data(config)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    raw = [b"valid text " * 30, b"bad \xff\xfe bytes and a cut \xe2\x82 char " * 5, b"more \x80 bad " * 10]
    for i in range(12):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{i}.txt").write_bytes(raw[i % 3] + str(i).encode())
    # Python's own decoder, independently: every U+FFFD replaces at least one undecodable byte.
    expected_bad = sum(len(b) - len(b.decode("utf-8", "ignore").encode()) for i in range(12) for b in [raw[i % 3]])
    config = DataConfig(source=f"text:{tmp_path}/d/*.txt", tokenizer="byte", cache_dir=str(tmp_path / "c"),
                        val_fraction=0.3, seq_len=8, batch_size=2)
    prepared = prepare_data(config)
    assert prepared.stats["undecodable_bytes"] == expected_bad > 0
    texts = list(prepared.corpus.texts("train")) + list(prepared.corpus.texts("validation"))
    assert sorted(texts) == sorted((raw[i % 3] + str(i).encode()).decode("utf-8", "replace") for i in range(12))


# --- tokenizers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_corpus")
    _text_corpus(root / "data")
    return root


@pytest.mark.parametrize("kind", ["sentencepiece-bpe", "sentencepiece-unigram", "byte", "char"])
def test_every_tokenizer_round_trips_validation_documents(text_corpus, kind):
    config = DataConfig(source=f"text:{text_corpus}/data/**/*.*", text_field="body", tokenizer=kind, vocab_size=300,
                        cache_dir=str(text_corpus / "cache"), val_fraction=0.25, seq_len=16, batch_size=2)
    prepared = prepare_data(config)
    tok = prepared.tokenizer
    val = list(prepared.corpus.texts("validation"))
    assert val
    for text in val:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert prepared.stats["validation"]["roundtrip_failures"] == 0
    if kind == "byte":
        assert tok.vocab_size == 260 and tok.encode("é\t") == [0xC3, 0xA9, 9]
    if kind == "char":
        everything = "".join(prepared.corpus.texts("train")) + "".join(val)
        assert tok.vocab_size == 4 + len(set(everything))
        assert tok.encode("\u2603") == [tok.unk_id]  # a character the corpus never uses
    if kind.startswith("sentencepiece"):
        assert tok.vocab_size == 300
        # The same model, loaded from its file as a user-supplied tokenizer, encodes identically.
        path = os.path.join(config.resolved_cache_dir, "tokenizers")
        model = [f for f in os.listdir(path) if f.startswith(kind) and f.endswith(".model")]
        loaded = prepare_data(dataclasses.replace(config, tokenizer=os.path.join(path, model[0])))
        assert loaded.tokenizer.encode(val[0]) == tok.encode(val[0])


def test_missing_or_broken_model_file(tmp_path, text_corpus):
    config = DataConfig(source=f"text:{text_corpus}/data/**/*.*", text_field="body",
                        cache_dir=str(text_corpus / "cache"), val_fraction=0.25, seq_len=16, batch_size=2,
                        tokenizer=str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(config)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(DataError, match="not a sentencepiece model"):
        prepare_data(dataclasses.replace(config, tokenizer=str(broken)))


# --- TFDS catalog datasets, streamed -------------------------------------------------------------------------

import tensorflow_datasets as tfds  # noqa: E402


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset with a text feature named `content` and splits `train` and `dev`."""

    VERSION = tfds.core.Version("1.2.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        features = tfds.features.FeaturesDict({"content": tfds.features.Text(), "n": np.int32})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(200, 0), "dev": self._generate_examples(60, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for i in range(count):
            words = " ".join(str(w) for w in rng.integers(0, 60, rng.integers(1, 50)))
            yield i, {"content": f"doc {seed}-{i}:\n  {words}", "n": i}


@pytest.fixture(scope="module")
def tfds_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    TinyCorpus(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare()
    config = DataConfig(source="tfds:tiny_corpus", tfds_data_dir=str(root / "tfds"), text_field="content",
                        val_split="dev", cache_dir=str(root / "cache"), vocab_size=280, seq_len=24, batch_size=4)
    return config, prepare_data(config)


def _one_epoch_is_every_document_once(config, prepared, split, seed):
    eos = prepared.tokenizer.eos_id
    batches = list(make_iterator(config, prepared, split, seed=seed, epochs=1))
    stream = np.concatenate([_rows(b).reshape(-1) for b in batches])
    pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)
    complete = [prepared.tokenizer.decode(p[:-1]) for p in pieces[:-1]]
    expected = list(prepared.corpus.texts(split))
    assert len(complete) == len(set(complete)) and set(complete) <= set(expected)
    assert len(expected) - len(complete) <= config.batch_size + 1  # only the tail is dropped
    return complete


def test_tfds_source_streams_packed_documents(tfds_corpus):
    config, prepared = tfds_corpus
    assert prepared.streaming
    assert prepared.stats["train"]["documents"] == 200 and prepared.stats["validation"]["documents"] == 60
    src = tfds.data_source("tiny_corpus", data_dir=config.tfds_data_dir)["dev"]
    assert sorted(prepared.corpus.texts("validation")) == sorted(src[i]["content"].decode() for i in range(60))
    order = _one_epoch_is_every_document_once(config, prepared, "validation", seed=0)
    assert order != _one_epoch_is_every_document_once(config, prepared, "validation", seed=1)
    batch = next(make_iterator(dataclasses.replace(config, document_mask=True), prepared, "train"))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


@pytest.mark.slow
def test_batches_do_not_depend_on_workers_or_processes(text_corpus):
    config = DataConfig(source=f"text:{text_corpus}/data/**/*.*", text_field="body", tokenizer="byte",
                        cache_dir=str(text_corpus / "cache"), val_fraction=0.25, seq_len=16, batch_size=4,
                        document_mask=True)
    prepared = prepare_data(config)
    reference = make_iterator(config, prepared, "train", seed=2)  # read in this process
    want = [next(reference) for _ in range(6)]
    # Two worker processes give the batches of one reader (one worker count only: each worker is a Python process
    # that imports grain and jaxlm, about 2.5 CPU-s).
    it = make_iterator(dataclasses.replace(config, num_workers=2), prepared, "train", seed=2)
    for w in want:
        got = next(it)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
    it.close()
    halves = [make_iterator(config, prepared, "train", seed=2, process_index=p, process_count=2) for p in range(2)]
    for w in want:
        got = [next(h) for h in halves]
        for key in w:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), w[key])


@pytest.mark.slow
def test_streamed_processes_read_only_their_share_and_not_depend_on_workers(tfds_corpus):
    config, prepared = tfds_corpus
    config = dataclasses.replace(config, document_mask=True)
    src = tfds.data_source("tiny_corpus", data_dir=config.tfds_data_dir)["train"]
    records = [src[i]["content"].decode() for i in range(len(src))]
    for p in range(2):
        it = make_iterator(config, prepared, "train", seed=2, process_index=p, process_count=2, epochs=1)
        batches = list(it)
        assert all(len(b["inputs"]) == config.batch_size // 2 for b in batches)
        stream = np.concatenate([_rows(b).reshape(-1) for b in batches])
        pieces = np.split(stream, np.flatnonzero(stream == prepared.tokenizer.eos_id) + 1)
        read = {prepared.tokenizer.decode(piece[:-1]) for piece in pieces[:-1]}
        share = records[p * 100 : (p + 1) * 100]  # process p's contiguous half of the 200 records
        assert read <= set(share) and len(read) >= len(share) - config.batch_size
        if p == 1:  # the share that does not start at the first record, read again by two worker processes
            again = make_iterator(dataclasses.replace(config, num_workers=2), prepared, "train", seed=2,
                                  process_index=p, process_count=2, epochs=1)
            for want in batches[:4]:
                got = next(again)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key])
            again.close()
    one = make_iterator(config, prepared, "train", seed=2)
    next(one)
    with pytest.raises(DataError, match="processes"):
        make_iterator(config, prepared, "train", seed=2, process_index=0, process_count=2).set_state(one.get_state())


def test_streamed_state_resumes_mid_document(tfds_corpus):
    config, prepared = tfds_corpus
    it = make_iterator(config, prepared, "train", seed=4)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["inputs"] for _ in range(4)]
    restored = make_iterator(config, prepared, "train", seed=4)
    restored.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(restored)["inputs"], w)
    other_seed = make_iterator(config, prepared, "train", seed=5)
    with pytest.raises(DataError, match="seed"):
        other_seed.set_state(state)


def test_streamed_epochs_wrap_and_are_counted(tfds_corpus):
    config, prepared = tfds_corpus
    it = make_iterator(config, prepared, "validation", seed=0)
    epochs = [it.epoch]
    for _ in range(3 * it.rows_per_epoch // config.batch_size + 2):
        next(it)
        epochs.append(it.epoch)
    assert epochs[0] == 0 and max(epochs) >= 2 and epochs == sorted(epochs)


def test_tfds_unknown_name_split_or_field(tfds_corpus):
    config, _ = tfds_corpus
    with pytest.raises(DataError, match="tiny_corpus:1.2.0"):
        prepare_data(dataclasses.replace(config, source="tfds:no_such_dataset"))
    with pytest.raises(DataError, match="no split 'validation'.*dev, train"):
        prepare_data(dataclasses.replace(config, val_split="validation"))
    with pytest.raises(DataError, match="no feature 'text'.*content"):
        prepare_data(dataclasses.replace(config, text_field="text"))


def test_loader_tokens_per_sec_counts_input_tokens(pystdlib):
    from tools.bench.bench import loader_tokens_per_sec

    config, prepared = pystdlib
    rate = loader_tokens_per_sec(config, prepared, seconds=0.2)
    assert rate > 0 and np.isfinite(rate)


def test_pysrc_reads_the_standard_library_and_site_packages_once_per_content(tmp_path):
    from jaxlm.data.corpora import _pysrc_documents, pysrc_files

    roots, files = pysrc_files()
    stdlib, site = sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]
    names = set(files)
    assert os.path.join(os.path.realpath(stdlib), "json", "__init__.py") in names
    assert os.path.join(os.path.realpath(site), "numpy", "__init__.py") in names
    assert not any("__pycache__" in f for f in files) and len(names) == len(files)

    for name, text in [("a.py", "x = 1\n"), ("b.py", "x = 1\n"), ("c.py", "y = 2\n"), ("d.py", "")]:
        (tmp_path / name).write_text(text)
    docs = list(_pysrc_documents([str(tmp_path / n) for n in ("a.py", "b.py", "c.py", "d.py")], 0.5)())
    assert [d.text for d in docs] == ["x = 1\n", "y = 2\n", ""]  # the copy b.py counts once
    assert [d.key for d in docs] == [hashlib.sha256(t.encode()).hexdigest()[:32] for t in ("x = 1\n", "y = 2\n", "")]
    again = list(_pysrc_documents([str(tmp_path / n) for n in ("c.py", "a.py")], 0.5)())
    assert {d.key: d.split for d in again} == {d.key: d.split for d in docs[:2]}  # split by content, not by path
