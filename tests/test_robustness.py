"""What careless or hostile use must not do: inconsistent configs that run, advice the command line refuses, two
writers on one run directory, a tokenizer that hangs on one long line, a model that cannot fit, a full or
read-only disk, damaged prepared data."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from jaxlm import storage
from jaxlm.cli import parse
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.errors import ConfigError, RunInUseError
from jaxlm.runlock import LEASE_S, LOCK_FILE, RunLock
from tests.processes import process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------- advice the command line accepts

_FLAG = re.compile(r"--((?:model|data|optim|train|mesh|sweep)\.[a-z0-9-]+)(?:[ =](\S+))?")
# Prose after a flag ("set --data.vocab-size to at least ..."), and placeholders of a usage line.
_WORDS = {"to", "or", "and", "of", "moves", "shows", "with", "in", "for", "processes", "needs", "D", "K", "...",
          "(e.g.", "(e.g"}
# A value for each sweep flag whose message shows none.
_SWEEP_VALUES = {"sweep.retries": "0", "sweep.members": "0:2", "sweep.device": "cpu", "sweep.devices-per-member": "1",
                 "sweep.parallel": "0", "sweep.tpu-slice": "v4-16", "sweep.ray-address": "auto"}


def _string_constants(path: str) -> list[str]:
    """Every string literal of a module, the literal parts of f-strings joined with a placeholder for the rest."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
    return found


def _suggestions() -> list[tuple[str, str, str | None]]:
    """(file, flag, value or None) for each `--section.field [value]` that jaxlm's and its tools' text shows."""
    found = set()
    for folder in ("jaxlm", "tools", "experiments"):
        for directory, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                for text in _string_constants(path):
                    for flag, value in _FLAG.findall(text):
                        value = value.rstrip(".,;:)`'\"")
                        keep = value and value not in _WORDS and "{" not in value and not value.startswith("--")
                        found.add((os.path.relpath(path, ROOT), flag, value if keep else None))
    return sorted(found, key=lambda s: (s[0], s[1], s[2] or ""))


def _field(experiment: Experiment, flag: str) -> tuple[dataclasses.Field | None, object]:
    section, name = flag.split(".")
    owner = getattr(experiment, section, None)
    name = name.replace("-", "_")
    if owner is None:
        return None, None
    if name.startswith("no_") and not hasattr(owner, name):
        name = name[3:]
    fields = {f.name: f for f in dataclasses.fields(owner)}
    return fields.get(name), getattr(owner, name, None)


@pytest.mark.slow  # a hundred command-line parses
def test_every_flag_that_a_message_suggests_is_one_the_command_line_accepts():
    from experiments import chinchilla_cpu, quickstart

    suggestions = _suggestions()
    assert len(suggestions) > 40  # the scan finds the messages' flags
    refused, accepted = [], {}
    for path, flag, value in suggestions:
        if flag.startswith("sweep."):
            argv = [f"--{flag}"] + ([value or _SWEEP_VALUES[flag]] if value or flag in _SWEEP_VALUES else [])
            default = chinchilla_cpu.SWEEP
        else:
            field, current = _field(quickstart.EXPERIMENT, flag)
            if field is None:
                refused.append(f"{path}: --{flag} is no field")
                continue
            boolean = isinstance(current, bool) or flag.split(".")[1].startswith("no-")
            if boolean:
                argv = [f"--{flag}"] + ([value] if value in ("True", "False") else [])  # as the text gives it
            else:
                argv = [f"--{flag}", value if value else str(current)]
            default = quickstart.EXPERIMENT
        key = (default is quickstart.EXPERIMENT, tuple(argv))
        if key not in accepted:  # each command line parsed once, however many messages suggest it
            try:
                parse(default, argv, prog="check")
                accepted[key] = True
            except SystemExit:
                accepted[key] = False
            except ConfigError:
                accepted[key] = True  # a value that this experiment refuses (the flag itself was accepted)
        if not accepted[key]:
            refused.append(f"{path}: {' '.join(argv)}")
    assert not refused, "suggested flags the parser refuses:\n" + "\n".join(refused)


# ---------------------------------------------------------------------------------- inconsistent configurations


def test_a_vocabulary_too_small_for_a_trained_tokenizer_is_refused_before_any_data_is_read(tmp_path):
    from jaxlm.data import prepare_data
    from jaxlm.data.tokenizer import MIN_TRAINED_VOCAB

    # The corpus does not exist: only a check made before any reading can give the vocabulary's message.
    config = DataConfig(source=f"text:{tmp_path}/none/*.txt", vocab_size=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=rf"vocab_size=2 is below the {MIN_TRAINED_VOCAB} .*--data.vocab-size"):
        prepare_data(config)
    assert MIN_TRAINED_VOCAB == 4 + 2 + 256 + 1  # specials, newline and tab, bytes: the trained model's fixed pieces


def test_a_model_vocabulary_beyond_the_tokenizers_padding_is_refused():
    data = DataConfig(vocab_size=300)
    with pytest.raises(ConfigError, match=r"--model.vocab-size 300 \(up to 384 to pad\)"):
        Experiment(model=ModelConfig(vocab_size=2048), data=data)
    assert Experiment(model=ModelConfig(vocab_size=384), data=data).model.vocab_size == 384  # padding is fine
    assert Experiment(model=ModelConfig(vocab_size=2048), data=DataConfig(tokenizer="byte")).data.tokenizer == "byte"


def test_a_warmup_beyond_the_last_step_is_refused_when_the_command_line_sets_it():
    from experiments import quickstart

    with pytest.raises(ConfigError, match=r"warmup_steps=100 is longer than .*steps=20: set --optim.warmup-steps"):
        parse(quickstart.EXPERIMENT, ["--optim.warmup-steps", "100", "--train.steps", "20"])
    [ok] = parse(quickstart.EXPERIMENT, ["--optim.warmup-steps", "20", "--train.steps", "20"])
    assert ok.optim.warmup_steps == ok.train.steps == 20


def test_an_experiments_warmup_cut_by_a_shortened_run_is_said(capsys):
    from experiments import quickstart

    assert quickstart.EXPERIMENT.optim.warmup_steps > 20
    [short] = parse(quickstart.EXPERIMENT, ["--train.steps", "20"])
    assert short.train.steps == 20
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and f"warmup of {quickstart.EXPERIMENT.optim.warmup_steps} steps is cut to the run's 20" in said[0]
    assert "--optim.warmup-steps" in said[0]
    parse(quickstart.EXPERIMENT, ["--train.steps", str(quickstart.EXPERIMENT.optim.warmup_steps)])
    assert capsys.readouterr().err == ""  # a warmup that fits: nothing to say


def test_a_padded_vocabulary_decodes_ids_the_tokenizer_lacks():
    from jaxlm.data.tokenizer import train_sentencepiece, SentencePieceTokenizer

    texts = ["def f(x):\n    return x + 1\n", "import os\nclass A:\n    pass\n"] * 200
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts, "bpe", 300, 10**6))
    ids = tokenizer.encode("def f")
    assert tokenizer.decode(ids + [tokenizer.vocab_size, tokenizer.vocab_size + 50]) == "def f"


# ------------------------------------------------------------------------------------ one writer per run directory

@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A folder with a small corpus, prepared (so that the processes a test starts find it built)."""
    from jaxlm.data import prepare_data

    root = tmp_path_factory.mktemp("robust")
    (root / "corpus").mkdir()
    for i in range(40):
        (root / "corpus" / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    prepare_data(_tiny(root, str(root / "unused")).data)
    return root


HOLDER = """
import sys, time
from jaxlm.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(run_dir: str) -> subprocess.Popen:
    """A real process holding the run directory's lock until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)  # no chance to release anything
    child.wait()  # reaped: its pid no longer exists


EXPERIMENT_MODULE = """
from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig

EXPERIMENT = Experiment(
    name="tiny", model=ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=264, max_seq_len=16),
    data=DataConfig(source="text:{corpus}/corpus/*.txt", tokenizer="byte", seq_len=16, batch_size=8,
                    cache_dir="{corpus}/cache", val_fraction=0.25),
    optim=OptimConfig(warmup_steps=1), train=TrainConfig(steps=2, samples=0),
)

if __name__ == "__main__":
    run(EXPERIMENT)
"""


def _tiny(corpus, run_dir: str) -> Experiment:
    namespace: dict = {}
    exec(EXPERIMENT_MODULE.format(corpus=corpus), namespace)
    experiment = namespace["EXPERIMENT"]
    return dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, out_dir=run_dir))


@pytest.mark.slow
def test_a_second_run_on_a_local_run_directory_gets_one_line_naming_the_holder(tiny_corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    script = tmp_path / "tiny.py"
    script.write_text(EXPERIMENT_MODULE.format(corpus=tiny_corpus))
    holder = _holder(run_dir)
    try:
        # The command line of an experiment module, on the directory the holder has: refused before writing.
        second = subprocess.run([sys.executable, str(script), "--train.out-dir", run_dir], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"host {socket.gethostname()}, pid {holder.pid}, since " in lines[0] and "--train.out-dir" in lines[0]
        assert os.listdir(run_dir) == [LOCK_FILE]  # nothing else written: no config.json, no metrics
    finally:
        _kill(holder)
    with RunLock(run_dir) as lock:  # the kernel gave the dead holder's lock back
        assert lock.took_over["pid"] == holder.pid
    with RunLock(run_dir) as lock:  # a lock given back properly leaves no holder to take over from
        assert lock.took_over is None


def test_a_run_refuses_a_run_directory_whose_lock_is_held(tiny_corpus, tmp_path):
    from jaxlm.train import train

    run_dir = str(tmp_path / "run")
    with RunLock(run_dir):  # another open file description: flock refuses it even in this process
        with pytest.raises(RunInUseError, match=rf"pid {os.getpid()}, since .*: wait for it to end"):
            train(_tiny(tiny_corpus, run_dir))
        assert os.listdir(run_dir) == [LOCK_FILE]


@pytest.mark.slow  # starts the GCS API server
def test_the_emulator_honours_create_if_absent_among_concurrent_writers(gcs):
    path = f"{gcs}/once"
    winners = []

    def create(i):
        if storage.create_exclusive(path, f"writer {i}"):
            winners.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and storage.read_text(path) == f"writer {winners[0]}"
    assert not storage.create_exclusive(path, "late")
    text, generation = storage.read_generation(path)
    assert storage.replace_if_generation(path, "stale", generation + 1) is None  # precondition fails: unchanged
    assert storage.remove_if_generation(path, generation + 1) is False and storage.read_text(path) == text
    new = storage.replace_if_generation(path, "renewed", generation)
    assert new is not None and new != generation and storage.read_text(path) == "renewed"
    assert storage.remove_if_generation(path, new) and not storage.exists(path)


@pytest.mark.slow
def test_a_bucket_run_directory_has_one_writer_and_a_dead_holders_lease_is_taken_over(gcs):
    run_dir = f"{gcs}/run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunInUseError, match=rf"host {socket.gethostname()}, pid {holder.pid}, since "):
            RunLock(run_dir).acquire()
    finally:
        _kill(holder)  # its lease is still in the bucket, unrenewed; its pid is gone from this host
    with RunLock(run_dir) as lock:
        assert lock.took_over["pid"] == holder.pid
        with pytest.raises(RunInUseError, match=rf"pid {os.getpid()}"):
            RunLock(run_dir).acquire()
    assert not storage.exists(f"{run_dir}/{LOCK_FILE}")  # given back


@pytest.mark.slow  # the GCS API server
def test_a_lease_of_another_host_is_kept_while_renewed_and_taken_over_once_expired(gcs):
    run_dir = f"{gcs}/run"
    path = f"{run_dir}/{LOCK_FILE}"
    fresh = {"host": "tpu-vm-7", "pid": 4242, "since": "2026-12-07 01:00:00 UTC", "renewed": time.time()}
    assert storage.create_exclusive(path, json.dumps(fresh))
    with pytest.raises(RunInUseError, match="host tpu-vm-7, pid 4242, since 2026-12-07 01:00:00 UTC"):
        RunLock(run_dir).acquire()
    _, generation = storage.read_generation(path)
    expired = {**fresh, "renewed": time.time() - LEASE_S - 1}
    assert storage.replace_if_generation(path, json.dumps(expired), generation) is not None
    with RunLock(run_dir) as lock:
        assert lock.took_over["host"] == "tpu-vm-7"
        assert json.loads(storage.read_text(path))["pid"] == os.getpid()


@pytest.mark.slow  # the GCS API server
def test_a_bucket_lease_is_renewed_while_held_and_stops_when_taken_over(gcs, monkeypatch):
    from jaxlm import runlock

    monkeypatch.setattr(runlock, "RENEW_S", 0.2)
    run_dir = f"{gcs}/run"
    path = f"{run_dir}/{LOCK_FILE}"
    lock = RunLock(run_dir).acquire()
    first = json.loads(storage.read_text(path))["renewed"]
    deadline = time.monotonic() + 60
    while json.loads(storage.read_text(path))["renewed"] == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(storage.read_text(path))["renewed"] > first
    # Another process judged the lease stale and took it: the holder's next renewal fails its precondition.
    text, generation = storage.read_generation(path)
    assert storage.remove_if_generation(path, generation)
    assert storage.create_exclusive(path, json.dumps({"host": "other", "pid": 1, "since": "now", "renewed": 1e12}))
    time.sleep(1.0)
    assert json.loads(storage.read_text(path))["host"] == "other"  # not overwritten by the old holder
    lock.release()
    assert json.loads(storage.read_text(path))["host"] == "other"  # nor deleted


# -------------------------------------------------------------------------------- a state too large for memory


@pytest.mark.slow  # compiles the step of a model too large to build
def test_a_model_too_large_for_memory_stops_before_allocating_with_the_sizes(tiny_corpus, tmp_path):
    from jaxlm.train import train

    d, layers, vocab, seq = 16384, 2, 264, 16
    model = ModelConfig(family="gpt2", n_layers=layers, d_model=d, n_heads=64, vocab_size=vocab, max_seq_len=seq)
    experiment = Experiment(
        name="huge", model=model,
        data=DataConfig(source=f"text:{tiny_corpus}/corpus/*.txt", tokenizer="byte", seq_len=seq, batch_size=8,
                        cache_dir=str(tiny_corpus / "cache"), val_fraction=0.25),
        optim=OptimConfig(warmup_steps=1), train=TrainConfig(steps=2, out_dir=str(tmp_path / "run"), samples=0),
    )
    # GPT-2's parameters by hand: per block two LayerNorms, qkv and output projections, a 4x MLP; embeddings tied.
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d)
    params = layers * block + vocab * d + seq * d + 2 * d
    with pytest.raises(ConfigError) as error:
        train(experiment)
    message = str(error.value)
    assert f"params {params * 4 / 2**30:,.1f} GiB, optimizer state {2 * params * 4 / 2**30:,.1f} GiB" in message
    assert "--mesh.fsdp -1" in message and "--model.remat full" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


# ------------------------------------------------------------------------------- a full or read-only disk


def _mount_namespace_reason(tmp_path) -> str | None:
    """Why a tmpfs cannot be mounted here (None when it can): the disk tests mount one in a namespace of their own,
    which vanishes with the process, so nothing is left mounted whatever happens."""
    target = tmp_path / "probe"
    target.mkdir()
    try:
        probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
                               capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare(1) is not installed"
    return None if probe.returncode == 0 else f"mounting a tmpfs is not permitted: {probe.stderr.strip()}"


DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=64m tmpfs {mnt}
run() {{ {python} ${{script:-{script}}} --train.out-dir {mnt}/$1 --train.steps 6 --train.ckpt-every 2 --train.keep-checkpoints 3 \\
         >{out}/$2.out 2>{out}/$2.err; echo $? >{out}/$2.rc; }}
# One checkpoint's footprint here, from a run of the same model elsewhere on the disk.
run calibration calibration
checkpoint=$(du -sk {mnt}/calibration/checkpoints/2 | cut -f1)
rm -r {mnt}/calibration
# Room for the run's small files and two checkpoints: step 2's save fits (with what orbax writes beside it while
# it merges its files), and step 4's is refused, since jaxlm asks for twice the last checkpoint's footprint.
mount -o remount,size=$((checkpoint * 2 + 256))k {mnt}
run run full
ls {mnt}/run/checkpoints >{out}/full.ls
mount -o remount,size=64m {mnt}
run run resumed
# A disk that fills up during a save, after the room was checked (as when another process takes the space): the
# script skips the check; step 2's save fits, step 4's fails in orbax's background writes.
rm -r {mnt}/run
mount -o remount,size=$((checkpoint + checkpoint / 4))k {mnt}
script={midsave} run run midsave
ls {mnt}/run/checkpoints >{out}/midsave.ls
mount -o remount,ro {mnt}
run run readonly
"""

MIDSAVE_MODULE = """
import runpy
import sys

from jaxlm.checkpoint import Checkpoints

Checkpoints._check_room = lambda self, step, state: None  # the space goes after the check
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_and_a_read_only_run_directory_give_one_line_and_lose_nothing(tiny_corpus, tmp_path):
    reason = _mount_namespace_reason(tmp_path)
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    script = tmp_path / "tiny.py"
    script.write_text(EXPERIMENT_MODULE.format(corpus=tiny_corpus))
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    midsave = tmp_path / "midsave.py"
    midsave.write_text(MIDSAVE_MODULE.format(script=str(script)))
    commands = DISK_SCRIPT.format(mnt=mnt, out=out, python=sys.executable, script=script, midsave=midsave)
    # One CPU device, as a user's run has (with the session's eight, each save writes a variable number of shards).
    subprocess.run(["unshare", "-rm", "sh", "-c", commands], cwd=ROOT, timeout=600, check=True, env=process_env(1))

    def result(name):
        errors = [line for line in (out / f"{name}.err").read_text().splitlines() if line.startswith("error:")]
        return int((out / f"{name}.rc").read_text()), errors, (out / f"{name}.err").read_text()

    rc, _, stderr = result("calibration")
    assert rc == 0, stderr[-3000:]  # the run that measures one checkpoint's footprint
    # The save of step 4 is refused whole, before orbax writes any of it.
    rc, errors, stderr = result("full")
    assert rc == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "no space left for checkpoint 4 in" in errors[0] and "checkpoint 2 is intact" in errors[0]
    assert (out / "full.ls").read_text().split() == ["2"]  # no remains of the refused save
    # With room again, the run resumes from checkpoint 2, whole, and finishes.
    rc, errors, stderr = result("resumed")
    assert rc == 0 and not errors and "from step 2" in (out / "resumed.out").read_text(), stderr[-3000:]
    # A save that runs out of space in the background: one line naming it, not orbax's and asyncio's tracebacks.
    rc, errors, stderr = result("midsave")
    assert rc == 2 and len(errors) == 1 and "Traceback" not in stderr and "ERROR:" not in stderr, stderr[-3000:]
    assert f"no space left to write checkpoint {mnt}/run/checkpoints/4" in errors[0], errors
    assert "checkpoint 2 is intact" in errors[0]
    assert "2" in (out / "midsave.ls").read_text().split()
    # A read-only run directory: one line naming it.
    rc, errors, stderr = result("readonly")
    assert rc == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert f"{mnt}/run" in errors[0] and "read-only" in errors[0]


# ------------------------------------------------------------------------------------- one enormous line


@pytest.mark.slow  # trains a tokenizer
def test_tokenizer_training_reads_a_50_mb_single_line_document_in_linear_time():
    from jaxlm.data import tokenizer as tokenizers

    words = ["alpha", "beta", "gamma", "delta", "return", "lambda", "(x)", "+", "1"]
    unit = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(4096)) + " "
    line = (unit * (50 * 2**20 // len(unit) + 1))[: 50 * 2**20]  # 50 MiB, no newline
    done: list = []

    def work():
        # Every piece of the whole line, in order: cutting each piece off the rest would copy the rest each time,
        # some 100,000 copies of up to 50 MB (hours); cutting by index is one pass.
        pieces = list(tokenizers._chunks([line], sample_bytes=len(line)))
        done.append("".join(pieces) == line and max(map(len, pieces)) <= tokenizers._CHUNK_BYTES)
        done.append(tokenizers.train_sentencepiece([line], "bpe", 300, sample_bytes=2**20))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert len(done) == 2, "reading or training on one long line did not finish"
    assert done[0] is True
    tokenizer = tokenizers.SentencePieceTokenizer(done[1])
    assert tokenizer.decode(tokenizer.encode(line[:1000])) == line[:1000]


# --------------------------------------------------------------------------------------- damaged prepared data


def test_a_damaged_token_cache_or_corpus_is_detected_at_open_naming_the_file(tiny_corpus, tmp_path):
    import glob
    import shutil

    import numpy as np

    from jaxlm.data import prepare_data
    from jaxlm.errors import DataError

    shutil.copytree(tiny_corpus / "cache", tmp_path / "cache")
    config = dataclasses.replace(_tiny(tiny_corpus, "unused").data, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(config)  # all of it from the copied cache
    tokens_path, _ = prepared.token_files("train")
    original = open(tokens_path, "rb").read()
    rebuild = re.escape(f"delete {prepared.tokens_dir} and rerun")

    open(tokens_path, "wb").write(original[: len(original) // 2])  # a truncated file
    with pytest.raises(DataError, match=rf"{re.escape(tokens_path)} has {len(original) // 2:,} bytes.*{rebuild}"):
        prepare_data(config)
    # Ids within the vocabulary, where the tokens were: garbage a model would train on without a word.
    garbage = np.random.default_rng(0).integers(0, 256, len(original) // 2, dtype=np.uint16).tobytes()
    open(tokens_path, "wb").write(garbage + original[len(garbage):])
    with pytest.raises(DataError, match=rf"{re.escape(tokens_path)} does not match the checksum .*{rebuild}"):
        prepare_data(config)
    open(tokens_path, "wb").write(original)
    assert prepare_data(config).stats == prepared.stats  # whole again: accepted

    [record] = [p for p in glob.glob(f"{tmp_path}/cache/corpora/**/*train.array_record*", recursive=True)]
    data = bytearray(open(record, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the ArrayRecord file
    open(record, "wb").write(bytes(data))
    with pytest.raises(DataError, match=rf"corpus file {re.escape(record)} does not match the checksum.*delete"):
        prepare_data(config)


# ---------------------------------------------------------------------------------------------- advice that harms


@pytest.mark.slow  # writes and reads a checkpoint
def test_a_config_edited_by_hand_is_named_and_no_checkpoint_is_to_be_deleted(tmp_path):
    import jax

    from jaxlm.checkpoint import load_params, save_params, write_or_check_config
    from jaxlm.errors import CheckpointError
    from jaxlm.model import init_params

    model = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=264, max_seq_len=16)
    experiment = Experiment(name="edited", model=model, data=DataConfig(tokenizer="byte", seq_len=16),
                            train=TrainConfig(out_dir=str(tmp_path / "run")))
    write_or_check_config(experiment)
    save_params(experiment, init_params(model, jax.random.key(0), seq_len=1))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"].update(d_model=64, d_ff=256, head_dim=16)  # edited by hand after the run started
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_params(str(tmp_path / "run"))
    message = str(error.value)
    assert "other shapes than the model in" in message and "Put back the config" in message
    assert "delete" not in message
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0"]


# ------------------------------------------------------------------------------------------ a torn metrics file


def test_a_torn_last_metrics_line_is_dropped_and_said_and_a_damaged_middle_line_is_named(tmp_path, capsys):
    from jaxlm.errors import DataError
    from jaxlm.logging import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3, 4)]
    whole = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(whole + '{"step": 5, "lo')  # a crash in the middle of writing row 5
    MetricsWriter(str(tmp_path), resume_step=3)  # the resume from step 3's checkpoint
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    assert "its last line (5) was cut short" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p != "metrics.jsonl"]  # rewritten in place, no leftovers

    path.write_text(whole.replace('"step": 2', '"st-ep": 2', 1))
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 has no 'step'"):
        read_metrics(str(path), drop_torn_tail=True)
    path.write_text(whole.replace('{"step": 2', '{"step": 2,,', 1))
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not JSON: .* delete that line"):
        MetricsWriter(str(tmp_path), resume_step=3)


def test_samples_that_cannot_fit_the_context_are_refused_before_any_step(tiny_corpus, tmp_path):
    from jaxlm.train import train

    experiment = _tiny(tiny_corpus, str(tmp_path / "run"))
    model = dataclasses.replace(experiment.model, max_seq_len=4)
    data = dataclasses.replace(experiment.data, seq_len=4)
    # The byte tokenizer's prompts are an end-of-document token and "def " / "import " / "class ": 5 to 8 tokens.
    with pytest.raises(ConfigError, match=r"max_seq_len=4 leaves no room to sample after the 8-token sample "
                                          r"prompts: set --train.samples 0, or --model.max-seq-len to at least 9"):
        train(dataclasses.replace(experiment, model=model, data=data,
                                  train=dataclasses.replace(experiment.train, samples=3)))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------------------------- atomic writes


def test_a_file_written_through_storage_appears_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "samples.txt")
    storage.write_text(path, "old\n")
    with storage.open(path, "w") as f:
        f.write("new, first half\n")
        assert storage.read_text(path) == "old\n"  # a reader meanwhile sees the old file, not a part of the new
    assert storage.read_text(path) == "new, first half\n"
    with pytest.raises(RuntimeError):
        with storage.open(path, "wb") as f:
            f.write(b"cut short")
            raise RuntimeError("a crash in the middle of writing")
    assert storage.read_text(path) == "new, first half\n" and os.listdir(tmp_path) == ["samples.txt"]


# --------------------------------------------------------------------------------------- an unreachable bucket


def test_an_unreachable_bucket_is_one_line_and_exit_75_where_a_rerun_may_succeed(capsys):
    import asyncio

    import aiohttp

    from jaxlm.cli import guarded
    from jaxlm.errors import StorageUnavailableError

    with socket.socket() as s:  # a port that nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def connect():
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/storage/v1/b/jaxlm-test")

    with pytest.raises(aiohttp.ClientConnectorError) as refused:  # what gcsfs raises once its retries are spent
        asyncio.run(connect())
    error = storage.as_storage_error("gs://jaxlm-test/run/config.json", "write", refused.value)
    assert isinstance(error, StorageUnavailableError)
    assert str(error).startswith("cannot reach the bucket gs://jaxlm-test to write gs://jaxlm-test/run/config.json")

    def unreachable():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        guarded(unreachable)
    assert exit_info.value.code == 75
    assert capsys.readouterr().err.count("\n") == 1
