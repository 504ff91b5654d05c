"""Sweeps that outlive a failing member: the failure is recorded and the sweep goes on; reruns retry failed
members a limited number of times and skip finished ones; --sweep.status shows every member; a member reruns
afresh with other settings; an IsoFLOP sweep fits its finished members and names the failed ones."""

import dataclasses

import pytest

from jaxlm import storage
from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.scaling.status import read_status
from tests.devices import use_first_devices

# A learning rate of 1e30 makes the first update overflow the next forward pass: a non-finite stop at step 2.
DIVERGING = OptimConfig(lr=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0)
# The finishing members differ from the diverging one in the learning rate alone: the failing member rerun with
# `--optim.lr 3e-3` is then the same program as "good", and the file compiles two training programs, not three.
CONVERGING = dataclasses.replace(DIVERGING, lr=3e-3)


def tiny(name, corpus, cache, optim=CONVERGING, d_model=32):
    return Experiment(
        name=name,
        model=ModelConfig(family="gpt2", n_layers=2, d_model=d_model, n_heads=2, vocab_size=264, max_seq_len=32),
        data=DataConfig(source=f"text:{corpus}", tokenizer="byte", seq_len=16, batch_size=8, cache_dir=str(cache),
                        val_fraction=0.2),
        optim=optim,
        train=TrainConfig(steps=6, eval_every=6, eval_steps=1, ckpt_every=100, log_every=1, samples=0),
    )


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
    """The members train on one CPU device, as on a user's CPU, not split over the test session's eight: what is
    tested is the sweep's bookkeeping, and a one-device step compiles and runs several times faster."""
    use_first_devices(monkeypatch, 1)


@pytest.fixture
def sweep(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    return (tiny("bad", corpus / "*.txt", tmp_path / "cache", DIVERGING), tiny("good", corpus / "*.txt",
                                                                              tmp_path / "cache"))


def run_exit(sweep, argv):
    with pytest.raises(SystemExit) as exit_info:
        run(sweep, argv=argv)
    return exit_info.value.code


@pytest.mark.slow
def test_a_failing_member_is_recorded_retried_and_rerun_with_other_settings(sweep, tmp_path, capsys):
    out = ["--train.out-dir", str(tmp_path / "sweep")]
    assert run_exit(sweep, out) == 1  # the sweep went on past the failure, then reported it
    status = read_status(str(tmp_path / "sweep"))
    assert status["bad"]["state"] == "failed" and status["bad"]["failures"] == 1
    assert "non-finite loss" in status["bad"]["error"] and "at step 2" in status["bad"]["error"]
    assert status["good"] == {"state": "finished"}
    assert (tmp_path / "sweep" / "good" / "summary.json").exists()
    err = capsys.readouterr().err
    assert "bad failed: non-finite loss" in err and "1 member(s) failed: bad" in err

    summary = (tmp_path / "sweep" / "good" / "summary.json").stat().st_mtime_ns
    assert run_exit(sweep, out) == 1  # retried once (--sweep.retries 1), failing again; the finished one skipped
    assert read_status(str(tmp_path / "sweep"))["bad"]["failures"] == 2
    assert (tmp_path / "sweep" / "good" / "summary.json").stat().st_mtime_ns == summary
    assert "good is finished: skipped" in capsys.readouterr().out

    assert run_exit(sweep, out) == 1  # retries spent: not run again
    assert read_status(str(tmp_path / "sweep"))["bad"]["failures"] == 2
    assert "bad: skipped, it failed 2 times (non-finite loss" in capsys.readouterr().err

    assert run(sweep, argv=[*out, "--sweep.status"]) == []
    table = capsys.readouterr().out.splitlines()
    assert "sweep_status.json" in table[0]
    assert table[1].split()[:6] == ["#", "member", "state", "failures", "step", "loss"]
    bad_row, good_row = table[3].split(), table[4].split()
    assert bad_row[:5] == ["0", "bad", "failed", "2", "1/6"] and "non-finite" in table[3]
    assert good_row[:5] == ["1", "good", "finished", "0", "6/6"]

    # Other settings for member 0 alone: its old run (of another config) is refused unless restarted.
    assert run_exit(sweep, [*out, "--sweep.members", "0", "--optim.lr", "3e-3", "--sweep.retries", "5"]) == 1
    assert "holds a run of another config" in read_status(str(tmp_path / "sweep"))["bad"]["error"]
    summaries = run(sweep, argv=[*out, "--sweep.members", "0", "--optim.lr", "3e-3", "--sweep.restart"])
    assert len(summaries) == 1 and summaries[0]["name"] == "bad"
    assert read_status(str(tmp_path / "sweep"))["bad"] == {"state": "finished"}
    assert storage.exists(str(tmp_path / "sweep" / "bad" / "summary.json"))


def test_bad_sweep_flags_are_one_line(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(sweep, argv=["--train.out-dir", str(tmp_path / "s"), "--sweep.retries", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --sweep.retries -1: use 0 or more"


@pytest.mark.slow
def test_an_isoflop_sweep_fits_its_finished_members_and_names_the_failed(sweep, tmp_path, capsys):
    from jaxlm.cli import run_isoflop_sweep
    from jaxlm.scaling import member_flops

    _, good = sweep
    # The failed member here fails before it compiles anything (its corpus does not exist): what fails it is
    # the other test's subject; this one is about the fit leaving it out and naming it.
    missing = dataclasses.replace(good.data, source=f"text:{tmp_path / 'missing' / '*.txt'}")
    members = (dataclasses.replace(good, name="bad", data=missing),) + tuple(
        dataclasses.replace(good, name=f"d{d}", model=good.model.replace(d_model=d)) for d in (16, 32, 48)
    )
    budget_of = {m.name: member_flops(m) for m in members}
    fits = str(tmp_path / "sweep" / "fits")
    with pytest.raises(SystemExit) as exit_info:
        run_isoflop_sweep(members, budget_of, fits, bootstrap=0, unfittable="skip",
                          argv=["--train.out-dir", str(tmp_path / "sweep")])
    captured = capsys.readouterr()
    assert "fitting the 3 finished members (failed: bad)" in captured.out and "--allow-unfinished" in captured.out
    assert exit_info.value.code in (1, 2), captured.err
