"""Sharded web corpora: C4's and FineWeb's layouts, tokenized once in parallel, resumed, fingerprinted, trained on."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.data import make_iterator, prepare_data
from jaxlm.data.sources import ShardFile, read_documents
from jaxlm.errors import ConfigError, DataError
from tests.corpora import documents, write_c4, write_fineweb
from tests.processes import process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _c4_config(root, **kw) -> DataConfig:
    base = dict(
        source=f"shards:{root}/en/c4-train.*.json.gz", val_source=f"{root}/en/c4-validation.*.json.gz",
        tokenizer="byte", cache_dir=f"{root}/cache", seq_len=32, batch_size=4, prepare_workers=1,
    )
    return DataConfig(**{**base, **kw})


def _token_files(directory):
    """Every token and offsets file under a prepared directory, by relative path, with its bytes."""
    out = {}
    for split in ("train", "validation"):
        for name in sorted(os.listdir(os.path.join(directory, split))):
            if name.endswith((".tokens", ".offsets.npy")):
                with open(os.path.join(directory, split, name), "rb") as f:
                    out[f"{split}/{name}"] = f.read()
    with open(os.path.join(directory, "manifest.json"), "rb") as f:
        out["manifest.json"] = f.read()
    return out


# --- sources --------------------------------------------------------------------------------------------------


def test_every_format_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = documents(7, 30) + ["", "ünïcödé \t tabs\n\nand lines"]
    lines = "".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), tmp_path / "a.parquet", row_group_size=7)
    for name in ("a.jsonl", "a.jsonl.gz", "a.json.gz", "a.jsonl.zst", "a.parquet"):
        field = "body" if name.endswith("parquet") else "text"
        shard = ShardFile(str(tmp_path / name), 0, name, "train")
        assert [t for t, _ in read_documents(shard, field, False)] == docs, name
    with pytest.raises(DataError, match="no column 'text'.*id, body.*--data.text-field"):
        list(read_documents(ShardFile(str(tmp_path / "a.parquet"), 0, "a", "train"), "text", False))


def test_c4_layout_validation_files_are_the_validation_split(tmp_path):
    written = write_c4(str(tmp_path))
    config = _c4_config(tmp_path)
    prepared = prepare_data(config)
    train = [d for p, ds in written.items() if "c4-train" in p for d in ds]
    val = [d for p, ds in written.items() if "c4-validation" in p for d in ds]
    stats = prepared.stats
    assert stats["train"]["documents"] == len(train) and stats["validation"]["documents"] == len(val)
    assert stats["validation"]["bytes"] == sum(len(d.encode()) for d in val)
    # The byte tokenizer's token files are the documents' UTF-8 bytes, file by file, in file order.
    directory = prepared.tokens_dir
    for i, path in enumerate(sorted(p for p in written if "c4-train" in p)):
        tokens = np.fromfile(os.path.join(directory, "train", f"{i:05d}.tokens"), np.uint16)
        offsets = np.load(os.path.join(directory, "train", f"{i:05d}.offsets.npy"))
        got = [bytes(tokens[a:b].astype(np.uint8)).decode() for a, b in zip(offsets[:-1], offsets[1:])]
        assert got == written[path]
    # One epoch of validation rows holds validation documents only, each once.
    eos = prepared.tokenizer.eos_id
    it = make_iterator(dataclasses.replace(config, batch_size=1), prepared, "validation", epochs=1)
    stream = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).ravel() for b in it])
    complete = [prepared.tokenizer.decode(p[:-1]) for p in np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]]
    assert len(complete) == len(set(complete)) and set(complete) <= set(val) and len(complete) >= len(val) - 2


def test_without_validation_files_a_stable_hash_of_the_text_splits(tmp_path):
    written = write_fineweb(str(tmp_path))
    config = DataConfig(source=f"shards:{tmp_path}/**/*.parquet", tokenizer="byte", val_fraction=0.25,
                        cache_dir=f"{tmp_path}/cache", seq_len=16, batch_size=2, prepare_workers=1)
    prepared = prepare_data(config)
    docs = [d for ds in written.values() for d in ds]
    # The rule, computed here independently: sha256 of the text, its first 8 bytes as a fraction.
    val = [d for d in docs if int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") / 2**64 < 0.25]
    assert 0 < len(val) < len(docs) // 2
    assert prepared.stats["validation"]["documents"] == len(val)
    assert prepared.stats["validation"]["bytes"] == sum(len(d.encode()) for d in val)


def test_source_errors_are_one_line(tmp_path):
    write_c4(str(tmp_path), train_files=1, val_files=1, docs_per_file=5)
    with pytest.raises(DataError, match="no file matches"):
        prepare_data(_c4_config(tmp_path, source=f"shards:{tmp_path}/nothing/*.json.gz"))
    (tmp_path / "en" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a supported shard"):
        prepare_data(_c4_config(tmp_path, source=f"shards:{tmp_path}/en/*"))
    with pytest.raises(ConfigError, match="val_source is for shards"):
        DataConfig(source="pystdlib", val_source="x")
    with pytest.raises(ConfigError, match="char"):
        DataConfig(source="shards:x", tokenizer="char")


# --- the tokenizer, trained once on a sample across the train files ------------------------------------------


def test_tokenizer_sample_is_drawn_across_every_train_file(tmp_path):
    from jaxlm.data.sources import find_shards, tokenizer_sample

    write_c4(str(tmp_path), train_files=6, val_files=2, docs_per_file=40)
    config = _c4_config(tmp_path, tokenizer="sentencepiece-bpe", vocab_size=300, tokenizer_sample_bytes=30_000)
    sample = list(tokenizer_sample(config, find_shards(config)))
    seeds = {text.split("-")[0] for text in sample}  # documents start "doc <file seed>-<i>:"
    assert seeds == {f"doc {i}" for i in range(6)}  # every train file, no validation file (seeds 500, 501)
    assert 30_000 <= sum(map(len, sample)) < 40_000


def test_tokenizer_chunking_is_linear_in_a_long_line():
    from jaxlm.data.tokenizer import _chunks

    text = "日本語" * 2_000_000  # a 6M-character document without a line break
    start = time.perf_counter()
    pieces = list(_chunks([text, "short\n"], 10**9))
    assert time.perf_counter() - start < 5  # the quadratic version takes about 30 s
    assert "".join(pieces) == text + "short\n"
    assert max(len(p.encode()) for p in pieces) <= 2048


# --- fingerprints --------------------------------------------------------------------------------------------


def test_prepared_directory_of_other_data_is_refused(tmp_path):
    write_c4(str(tmp_path), train_files=2, val_files=1, docs_per_file=30)
    prepared = prepare_data(_c4_config(tmp_path))
    direct = _c4_config(tmp_path, data_dir=prepared.tokens_dir)
    assert prepare_data(direct).fingerprint == prepared.fingerprint  # the prepared directory itself is accepted
    with gzip.open(tmp_path / "en" / "c4-train.00007-of-01024.json.gz", "wt") as f:
        f.write(json.dumps({"text": "one more document " * 20}) + "\n")
    with pytest.raises(DataError, match=r"prepared from other data .*source, files differ.*--data.data-dir"):
        prepare_data(direct)
    other = prepare_data(_c4_config(tmp_path))  # under the default directory: a new fingerprint, prepared anew
    assert other.fingerprint != prepared.fingerprint


def test_a_damaged_token_shard_is_named_at_open_and_the_advice_repairs_it(tmp_path):
    import re

    write_c4(str(tmp_path), train_files=2, val_files=1, docs_per_file=30)
    config = _c4_config(tmp_path)
    prepared = prepare_data(config)
    want = next(make_iterator(config, prepared, "train", seed=2))["inputs"]
    path = os.path.join(prepared.tokens_dir, "train", "00001.tokens")
    original = open(path, "rb").read()

    def overwrite(data: bytes) -> None:  # a new file in its place: the iterator above still maps the old one
        open(path + ".new", "wb").write(data)
        os.replace(path + ".new", path)

    overwrite(original[:-6])  # truncated
    with pytest.raises(DataError, match=rf"token shard {re.escape(path)} has {len(original) - 6:,} bytes"):
        make_iterator(config, prepared, "train", seed=2)
    # In-range ids where the tokens were: the same size, garbage a model would learn from without a word.
    garbage = np.random.default_rng(0).integers(0, 256, len(original) // 2, dtype=np.uint16).tobytes()
    overwrite(garbage + original[len(garbage):])
    with pytest.raises(DataError, match=r"does not match the checksum") as refused:
        make_iterator(config, prepared, "train", seed=2)
    # The advice, followed: delete the manifest and that file's done marker, prepare again.
    advice = re.search(r"delete (\S+) and (\S+) and prepare again", str(refused.value))
    assert advice and "c4-train.00001-of-01024.json.gz" in str(refused.value)
    for victim in advice.groups():
        os.remove(victim)
    repaired = prepare_data(config)
    assert open(path, "rb").read() == original
    np.testing.assert_array_equal(next(make_iterator(config, repaired, "train", seed=2))["inputs"], want)


# --- resumed and parallel preparations give the same bytes --------------------------------------------------


def _prepare_command(root, data_dir, *extra):
    return [
        sys.executable, "-m", "tools.prepare_data", "--experiment", "quickstart",
        "--data.source", f"shards:{root}/en/c4-train.*.json.gz", "--data.val-source", f"{root}/en/c4-validation.*",
        "--data.tokenizer", "sentencepiece-bpe", "--data.vocab-size", "300", "--model.vocab-size", "384",
        "--data.tokenizer-sample-bytes",
        "40000", "--data.data-dir", str(data_dir), "--data.cache-dir", f"{root}/cache", "--data.seq-len", "32",
        "--data.batch-size", "4", *extra,
    ]


def _env():
    return process_env(8)


def _prepared_dir(data_dir):
    (name,) = [n for n in os.listdir(data_dir) if n != "tokenizers"]
    return os.path.join(data_dir, name)


def _prepare_here(root, data_dir, *extra):
    """The same command as _prepare_command's, run in this process (tools.prepare_data's main)."""
    from tools.prepare_data import main

    main(_prepare_command(root, data_dir, *extra)[3:])


@pytest.fixture(scope="module")
def c4_big(tmp_path_factory):
    """C4-layout shards large enough that a preparation can be stopped midway, and one preparation left alone
    (run in this process: what it is compared with is made by other processes)."""
    root = tmp_path_factory.mktemp("c4big")
    write_c4(str(root), train_files=16, val_files=2, docs_per_file=400)
    reference = root / "reference"
    _prepare_here(root, reference, "--data.prepare-workers", "1")
    return root, _token_files(_prepared_dir(reference))


@pytest.mark.slow
def test_preparation_killed_midway_resumes_to_the_same_bytes(c4_big, capsys):
    """A preparation process SIGKILLed after its first shards, then resumed (here, with two worker processes),
    gives the bytes of the one left alone."""
    root, want = c4_big
    data_dir = root / "killed"
    proc = subprocess.Popen(_prepare_command(root, data_dir, "--data.prepare-workers", "1"), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def done_files():
        folders = [os.path.join(data_dir, n, "done") for n in os.listdir(data_dir)] if data_dir.exists() else []
        return [f for d in folders if os.path.isdir(d) for f in os.listdir(d)]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(done_files()) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = done_files()  # counted after the kill: a shard may have finished between the last look and the signal
    directory = _prepared_dir(data_dir)
    assert 3 <= len(done) < 18 and not os.path.exists(os.path.join(directory, "manifest.json")), "not stopped midway"
    capsys.readouterr()
    _prepare_here(root, data_dir, "--data.prepare-workers", "2")
    assert f"tokenizing {18 - len(done)} of this process's 18" in capsys.readouterr().out
    assert _token_files(directory) == want


@pytest.mark.slow
def test_two_processes_preparing_together_give_the_same_bytes_as_one(c4_big, capsys):
    """Process 0 in a process of its own, process 1 in this one: together they give the bytes of one process."""
    root, want = c4_big
    data_dir = root / "two"
    args = ("--process-count", "2", "--data.prepare-workers", "1")
    other = subprocess.Popen(_prepare_command(root, data_dir, "--process-index", "0", *args), env=_env(), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        capsys.readouterr()
        # Process 1 starts first (process 0 is still importing): it waits for process 0's tokenizer.
        _prepare_here(root, data_dir, "--process-index", "1", *args)
        ours = capsys.readouterr().out
    finally:
        out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-1000:]
    assert "tokenizing 9 of this process's 9" in out and "tokenizing 9 of this process's 9" in ours
    assert _token_files(_prepared_dir(data_dir)) == want


# --- training reads its own rows -----------------------------------------------------------------------------


def test_each_process_reads_its_own_train_files(tmp_path):
    written = write_c4(str(tmp_path), train_files=4, val_files=1, docs_per_file=40)
    train_files = sorted(p for p in written if "c4-train" in p)
    config = _c4_config(tmp_path, batch_size=4)
    prepared = prepare_data(config)
    eos = prepared.tokenizer.eos_id
    for p in range(2):
        own = b"\x00".join(d.encode() for path in train_files[p::2] for d in written[path])  # files p, p + 2
        it = make_iterator(config, prepared, "train", seed=1, process_index=p, process_count=2)
        pieces = 0
        for _ in range(20):
            for row in next(it)["inputs"]:
                for piece in np.split(row, np.flatnonzero(row == eos)):
                    text = bytes(piece[piece < 256].astype(np.uint8))  # rows may cut a character
                    assert text in own  # a part of one of this process's documents
                    pieces += b"doc " in text
        assert pieces >= 2  # document starts, which name their file
        state = it.get_state()
        assert state["processes"] == 2
    whole = make_iterator(config, prepared, "train", seed=1)
    with pytest.raises(DataError, match="processes"):
        whole.set_state(state)


def _tiny(source_config: DataConfig, out_dir) -> Experiment:
    return Experiment(
        name="shards",
        model=ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, vocab_size=320, max_seq_len=32),
        data=source_config,
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=3, eval_every=3, eval_steps=1, ckpt_every=3, log_every=1, samples=0,
                          out_dir=str(out_dir)),
    )


@pytest.mark.slow  # compiles a model (about 30 s on two cores)
@pytest.mark.parametrize("layout", ["c4", "fineweb"])
def test_training_runs_on_synthetic_shards(tmp_path, layout):
    from jaxlm.train import train

    if layout == "c4":
        write_c4(str(tmp_path), train_files=3, val_files=1, docs_per_file=40)
        data = _c4_config(tmp_path, tokenizer="sentencepiece-bpe", vocab_size=300, seq_len=32, batch_size=8)
    else:
        write_fineweb(str(tmp_path))
        data = DataConfig(source=f"shards:{tmp_path}/sample/10BT/*.parquet", tokenizer="byte", val_fraction=0.2,
                          cache_dir=f"{tmp_path}/cache", seq_len=32, batch_size=8, prepare_workers=1)
    summary = train(_tiny(data, tmp_path / "run"))
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["val_loss"])


def test_prepared_in_a_bucket_and_trained_from_it(tmp_path, gcs):
    from jaxlm import storage

    written = write_c4(str(tmp_path / "local"), train_files=2, val_files=1, docs_per_file=30)
    for path in written:
        with open(path, "rb") as f:
            storage.write_bytes(f"{gcs}/c4/en/{os.path.basename(path)}", f.read())
    config = DataConfig(source=f"shards:{gcs}/c4/en/c4-train.*.json.gz", val_source=f"{gcs}/c4/en/c4-validation.*",
                        tokenizer="byte", data_dir=f"{gcs}/prepared", cache_dir=str(tmp_path / "cache"), seq_len=32,
                        batch_size=4, prepare_workers=1)
    prepared = prepare_data(config)
    assert prepared.tokens_dir.startswith(gcs) and storage.isfile(f"{prepared.tokens_dir}/manifest.json")
    local = prepare_data(_c4_config(tmp_path / "local"))
    assert prepared.fingerprint == local.fingerprint  # names relative to the corpus folder, wherever it lives
    got = next(make_iterator(config, prepared, "train", seed=3))
    want = next(make_iterator(_c4_config(tmp_path / "local"), local, "train", seed=3))
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
