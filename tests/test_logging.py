"""What a run records besides metrics.jsonl: TensorBoard event files, a W&B offline run, a profiler trace.

One small run (with a profiled window and W&B in offline mode), restarted from its middle checkpoint, is read
back with TensorBoard's own event reader and wandb's own record schema and compared with its metrics.jsonl.
"""

import glob
import gzip
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

from jaxlm.cli import run as cli_run
from tests.test_train import loop_experiment, read_rows
from tests.devices import use_first_devices

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n", "    "]


def tensorboard_tag(key):
    return f"eval/{key}" if key.startswith("val_") else f"train/{key}"


def logged_scalars(rows):
    """(tag, step, tokens, value) of every number in the rows (step and tokens are the axes)."""
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "tokens") and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield tensorboard_tag(key), row["step"], row.get("tokens"), float(value)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A 6-step run with steps 2-3 profiled and W&B offline, its last checkpoint deleted and the run resumed."""
    tmp_path = tmp_path_factory.mktemp("logged")
    rng = np.random.default_rng(0)
    (tmp_path / "corpus").mkdir()
    for i in range(30):
        (tmp_path / "corpus" / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS, size=200)))
    exp = loop_experiment(tmp_path, str(tmp_path / "corpus" / "*.txt"), samples=0, profile_steps="2:4",
                          tensorboard=True, wandb_project="jaxlm-test", wandb_tags=("tiny",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        from jaxlm.train import train

        # One CPU device, as on a user's CPU, not the test session's eight: what is tested is what the run records,
        # and a one-device step compiles and runs several times faster.
        use_first_devices(mp, 1)

        train(exp)
        first_rows = read_rows(exp.run_dir)
        shutil.rmtree(os.path.join(exp.run_dir, "checkpoints", "6"))
        os.remove(os.path.join(exp.run_dir, "summary.json"))
        train(exp)  # resumes from step 3
    return exp, first_rows, read_rows(exp.run_dir)


def accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_event_files_hold_the_metrics_rows_against_steps_and_tokens(logged_run):
    exp, first_rows, rows = logged_run
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # rows 4-6 of the first try dropped
    by_step, by_tokens = accumulator(exp.run_dir), accumulator(os.path.join(exp.run_dir, "by_tokens"))
    expected = list(logged_scalars(rows))
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/val_loss", "eval/val_bpb"} <= {t for t, *_ in expected}
    for tag in {t for t, *_ in expected}:
        # The resumed run's events replace those of the lost steps: each step once, with the metrics' value.
        want = sorted((step, value) for t, step, _, value in expected if t == tag)
        got = [(e.step, e.value) for e in by_step.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # float32 events
        want_tokens = sorted((tokens, value) for t, _, tokens, value in expected if t == tag)
        got_tokens = [(e.step, e.value) for e in by_tokens.Scalars(tag)]
        assert [s for s, _ in got_tokens] == [s for s, _ in want_tokens], tag
        assert [v for _, v in got_tokens] == pytest.approx([v for _, v in want_tokens], rel=1e-6), tag
    config_text = by_step.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config_text) == json.loads(exp.to_json())
    assert by_step.PluginTagToContent("hparams")  # the HParams dashboard's session of this run


def wandb_records(path):
    """The records of a .wandb file (wandb's framing: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header: checksum, length, type), decoded with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_rows_and_the_resumed_run_keeps_its_id(logged_run):
    exp, first_rows, rows = logged_run
    run_id = open(os.path.join(exp.run_dir, "wandb_id.txt")).read().strip()
    files = sorted(glob.glob(os.path.join(exp.run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # started, then resumed
    logged = []
    for path in files:
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_id == run_id and run.project == "jaxlm-test" and list(run.tags) == ["tiny"]
        for r in records:
            if r.WhichOneof("record_type") == "history":
                logged.append({
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item
                })
    # Every row of both tries, with the same numbers under the same names as in TensorBoard.
    tries = first_rows + [r for r in rows if r["step"] > 3]
    assert len(logged) == len(tries)
    for want, got in zip(tries, logged):
        assert got.get("step") == want["step"] and got.get("tokens") == want.get("tokens"), (want, got)
        scalars = {t: v for t, *_, v in logged_scalars([want])}
        assert {k: got[k] for k in scalars} == pytest.approx(scalars, rel=1e-12)


@pytest.mark.slow
def test_profile_trace_of_the_chosen_steps_names_the_train_step(logged_run):
    exp, _, _ = logged_run
    (trace_dir,) = glob.glob(os.path.join(exp.run_dir, "plugins", "profile", "*"))  # only the first try traced
    assert glob.glob(os.path.join(trace_dir, "*.xplane.pb"))  # TensorBoard's profile plugin, XProf
    with gzip.open(glob.glob(os.path.join(trace_dir, "*.trace.json.gz"))[0]) as f:  # Perfetto
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e.get("name", "") for e in events}
    assert any("(step)" in n for n in names)  # the train step's executions: PjitFunction(jit(step)) compiled ahead
    marked = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e)
    assert marked == [2, 3]


def test_bad_logging_flags_are_one_line_errors(tmp_path, monkeypatch, capsys):
    exp = loop_experiment(tmp_path, "/nowhere/*.txt")
    with pytest.raises(SystemExit) as exit_info:
        cli_run(exp, ["--train.profile-steps", "5:2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "profile_steps='5:2'" in err
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(SystemExit) as exit_info:
        cli_run(exp, ["--train.wandb-project", "p"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install" in err and "wandb" in err
    assert not os.path.exists(exp.run_dir)  # refused before anything was made
