"""Sweeps on a local Ray: members side by side, each in a process of its own on one CPU device, with the same
results as one after another; a member whose process is SIGKILLed is retried and resumes from its checkpoint; a
member that always fails is recorded failed while the others finish."""

import dataclasses
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.logging import read_metrics
from jaxlm.scaling.status import read_status
from jaxlm.train import Pretraining, fit

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

# One learning rate under a constant schedule, members told apart by their seed: every member, whatever its length,
# is then the same program, compiled once for the whole module (the processes share the compilation cache).
OPTIM = OptimConfig(lr=1e-2, min_lr=0.0, warmup_steps=0, schedule="constant")


def tiny(name, corpus, cache, seed, steps=6):
    return Experiment(
        name=name,
        model=ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=2, vocab_size=264, max_seq_len=32,
                          scan_layers=False),
        data=DataConfig(source=f"text:{corpus}", tokenizer="byte", seq_len=16, batch_size=8, cache_dir=str(cache),
                        val_fraction=0.2),
        optim=OPTIM,
        train=TrainConfig(steps=steps, eval_every=steps, eval_steps=1, ckpt_every=100, log_every=1, samples=0,
                          seed=seed),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Four members, their results trained one after another in this process on one device (which also prepares
    the corpus they share), and a local Ray of two CPUs."""
    root = tmp_path_factory.mktemp("ray_sweeps")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    members = tuple(tiny(f"seed{seed}", corpus / "*.txt", root / "cache", seed) for seed in range(4))
    reference = {}
    for m in members:
        alone = dataclasses.replace(m, train=dataclasses.replace(m.train, out_dir=str(root / "sequential" / m.name)))
        reference[m.name] = fit(Pretraining(alone), devices=jax.devices()[:1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root, members, reference
    ray.shutdown()


def test_members_run_two_at_a_time_with_the_results_of_one_after_another(setup, capsys):
    root, members, reference = setup
    out = ["--train.out-dir", str(root / "side_by_side"), "--sweep.ray", "--sweep.table-every", "2"]
    summaries = run(members, argv=out)
    assert [s["name"] for s in summaries] == [m.name for m in members]
    for s in summaries:
        np.testing.assert_allclose(s["train_loss"], reference[s["name"]]["train_loss"], rtol=1e-6)
        np.testing.assert_allclose(s["val_loss"], reference[s["name"]]["val_loss"], rtol=1e-6)
    assert len({round(s["val_loss"], 4) for s in summaries}) == 4  # four different runs, not one four times

    status = read_status(str(root / "side_by_side"))
    spans = sorted((status[m.name]["started"], status[m.name]["ended"]) for m in members)
    at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert at_once == 2  # members overlapped, and never more than the two CPUs allow (four were ready)
    table = capsys.readouterr().out
    assert "seed3" in table and "finished" in table and "6/6" in table

    assert run(members, argv=out) == summaries  # a rerun skips the finished members
    assert capsys.readouterr().out.count("is finished: skipped") == 4
    assert read_status(str(root / "side_by_side")) == status


def _member_processes(run_dir):
    """Process ids of the member processes training in `run_dir`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if "jaxlm.cli" in cmdline and json.dumps(run_dir) in cmdline:
            pids.append(int(pid))
    return pids


def test_a_killed_member_resumes_and_a_failing_one_is_recorded_while_the_others_finish(setup, capsys):
    root, members, reference = setup
    sweep_dir = root / "faults"
    corpus = members[0].data.source.removeprefix("text:")
    long = tiny("killed", corpus, root / "cache", seed=0, steps=80)
    long = dataclasses.replace(long, train=dataclasses.replace(long.train, ckpt_every=10))
    missing = str(root / "missing" / "*.txt")
    bad = tiny("bad", missing, root / "cache", seed=0)  # fails in every try: its corpus does not exist
    sweep = (long, bad, members[1], members[2])
    killed_dir = str(sweep_dir / "killed")
    kills = []

    def kill_mid_run():
        deadline = time.time() + 120
        while time.time() < deadline:
            steps = [r["step"] for r in read_metrics(os.path.join(killed_dir, "metrics.jsonl"), drop_torn_tail=True)
                     if "loss" in r]
            if steps and steps[-1] >= 25:
                for pid in _member_processes(killed_dir):
                    os.kill(pid, signal.SIGKILL)
                    kills.append((pid, steps[-1]))
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_run)
    killer.start()
    with pytest.raises(SystemExit) as exit_info:
        run(sweep, argv=["--train.out-dir", str(sweep_dir), "--sweep.ray", "--sweep.retries", "1"])
    killer.join()
    assert exit_info.value.code == 1  # one member failed for good
    assert len(kills) == 1 and kills[0][1] < 80

    status = read_status(str(sweep_dir))
    assert status["killed"]["state"] == "finished" and status["killed"]["failures"] == 1
    log = (sweep_dir / "killed" / "member.log").read_text()
    assert f"resuming {killed_dir} from step " in log
    resumed_at = int(log.split(f"resuming {killed_dir} from step ")[1].split()[0])
    assert 10 <= resumed_at < 80 and resumed_at % 10 == 0
    assert json.loads((sweep_dir / "killed" / "summary.json").read_text())["tokens"] == 80 * 8 * 16

    assert status["bad"]["state"] == "failed" and status["bad"]["failures"] == 2  # tried, then retried once
    assert status["bad"]["error"] == f"no file matches {missing!r}: check the glob (use ** for subfolders)"
    for other in (members[1].name, members[2].name):  # the others finish, as they would alone
        assert status[other] == {"state": "finished", **{k: status[other][k] for k in ("started", "ended", "host")}}
        summary = json.loads((sweep_dir / other / "summary.json").read_text())
        np.testing.assert_allclose(summary["val_loss"], reference[other]["val_loss"], rtol=1e-6)
    err = capsys.readouterr().err
    assert "killed failed: its process was killed by SIGKILL; retrying it" in err
    assert "bad failed: no file matches" in err and "giving up after 2 failures" in err
