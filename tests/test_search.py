"""Hyperparameter searches (grids and seeded random draws over any config fields, and their report) and the parts
of sweeps on Ray that need no cluster: each member's command line and environment, a TPU slice's host launches,
failure messages, and the one-line error without Ray."""

import json
import math
import socket
import sys

import numpy as np
import pytest

from jaxlm.cli import parse, run, run_member
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.errors import ConfigError
from jaxlm.scaling import cluster
from jaxlm.scaling.search import Choice, LogUniform, Uniform, grid_search, plot_search, random_search, search_rows

BASE = Experiment(
    name="search",
    model=ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=2, vocab_size=260, max_seq_len=32),
    data=DataConfig(source="pystdlib", tokenizer="byte", seq_len=16, batch_size=8),
    optim=OptimConfig(lr=1e-3, warmup_steps=2),
    train=TrainConfig(steps=10, out_dir="/sweeps/search"),
)
SPACE = {"optim.lr": LogUniform(1e-4, 1e-1), "data.batch_size": Choice((4, 8, 16))}


def test_a_random_search_is_reproducible_from_its_seed():
    first, again, other = (random_search(BASE, SPACE, 6, seed) for seed in (7, 7, 8))
    assert first == again
    assert [m.optim.lr for m in first] != [m.optim.lr for m in other]
    lrs = [m.optim.lr for m in first]
    assert len(set(lrs)) == 6 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert {m.data.batch_size for m in first} <= {4, 8, 16}
    assert len({m.name for m in first}) == 6 and len({m.run_dir for m in first}) == 6
    assert all(m.run_dir == f"/sweeps/search/{m.name}" for m in first)
    assert first[0].name.startswith("search-0-lr") and f"batch_size{first[0].data.batch_size}" in first[0].name
    # Everything else is the base's.
    assert {(m.model, m.data.seq_len, m.train.steps) for m in first} == {(BASE.model, 16, 10)}


def test_log_uniform_draws_are_uniform_in_log():
    rng = np.random.default_rng(0)
    logs = np.log10([LogUniform(1e-4, 1e-2).draw(rng) for _ in range(4000)])
    # A uniform on [-4, -2]: each half of the interval holds half the draws, mean -3.
    assert abs(np.mean(logs) + 3) < 0.03 and abs(np.mean(logs < -3) - 0.5) < 0.03
    values = [Uniform(2.0, 3.0).draw(rng) for _ in range(4000)]
    assert 2 <= min(values) and max(values) <= 3 and abs(np.mean(values) - 2.5) < 0.02


def test_a_grid_covers_every_combination_and_derived_fields_follow():
    members = grid_search(BASE, {"optim.lr": [1e-3, 3e-3, 1e-2], "model.d_model": [32, 64]})
    assert [(m.optim.lr, m.model.d_model) for m in members] == [
        (1e-3, 32), (1e-3, 64), (3e-3, 32), (3e-3, 64), (1e-2, 32), (1e-2, 64)]
    assert members[1].name == "search-lr0.001-d_model64"
    assert [m.model.d_ff for m in members[:2]] == [128, 256]  # GPT-2's 4 x d_model, as for a width set by hand


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": [1e-3]}, "optim has no field 'lrr'"),
    ({"lr": [1e-3]}, "'lr' is not a config field"),
    ({"model.d_model": [33]}, "d_model"),  # not a whole number of its 2 heads
])
def test_a_bad_field_is_a_clear_error(space, message):
    with pytest.raises(ConfigError, match=message):
        grid_search(BASE, space)


def test_the_report_sorts_finished_members_by_validation_loss_and_plots_each_field(tmp_path):
    base = Experiment(**{**BASE.__dict__, "train": TrainConfig(steps=10, out_dir=str(tmp_path))})
    members = grid_search(base, {"optim.lr": [1e-3, 1e-2], "model.d_model": [32, 64]})
    val = {members[0].name: 3.0, members[1].name: 2.5, members[2].name: math.nan}  # members[3] is unfinished
    for m in members[:3]:
        run_dir = tmp_path / m.name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 2.0}) + "\n"
                                               + json.dumps({"step": 10, "val_loss": val[m.name]}) + "\n")
        (run_dir / "summary.json").write_text("{}")
    rows = search_rows(members, ["optim.lr", "model.d_model"])
    assert [r["name"] for r in rows] == [members[1].name, members[0].name, members[2].name]
    assert rows[0] == {"name": members[1].name, "optim.lr": 1e-3, "model.d_model": 64, "train_loss": 2.0,
                       "val_loss": 2.5}
    plot_search(rows, ["optim.lr", "model.d_model"], str(tmp_path / "search.png"))
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_host_of_a_tpu_slice_starts_the_same_member_as_its_own_process():
    launches = cluster.host_launches(BASE, "10.0.0.5", 4, port=8476, python="python3")
    assert len(launches) == 4
    for k, (command, env) in enumerate(launches):
        assert command[:3] == ["python3", "-m", "jaxlm.cli"]
        assert Experiment.from_dict(json.loads(command[3])) == BASE
        assert command[4:] == ["--mesh.coordinator-address", "10.0.0.5:8476", "--mesh.num-processes", "4",
                               "--mesh.process-id", str(k)]
        assert env == {"JAX_PLATFORMS": "tpu"}
        # The flags are what jaxlm's command line reads: host k is process k of 4, coordinated by the first host.
        (host,) = parse(Experiment.from_dict(json.loads(command[3])), command[4:])
        assert (host.mesh.coordinator_address, host.mesh.num_processes, host.mesh.process_id) == ("10.0.0.5:8476", 4, k)
        assert (host.model, host.data, host.optim, host.train) == (BASE.model, BASE.data, BASE.optim, BASE.train)
    single, = cluster.host_launches(BASE, "10.0.0.5", 1, python="python3")
    assert single[0] == ["python3", "-m", "jaxlm.cli", json.dumps(BASE.to_dict(), sort_keys=True)]


def test_a_cpu_member_sees_its_own_number_of_host_devices():
    env = cluster.member_env("cpu", 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1"})
    assert env == {"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"}
    assert cluster.member_env("gpu", 1, {}) == {"JAX_PLATFORMS": "cuda"}
    assert cluster.Placement("gpu", 2).task_options() == {"num_cpus": 1, "num_gpus": 2}
    assert cluster.Placement("tpu", 4).task_options() == {"num_cpus": 1, "resources": {"TPU": 4}}
    with pytest.raises(ConfigError, match="--sweep.tpu-slice v4-16 runs members on TPUs"):
        cluster.Placement("cpu", 1, tpu_slice="v4-16")


def test_a_failed_member_process_is_described_in_one_line():
    assert cluster.failure_message(-9, "step 3\n") == "its process was killed by SIGKILL"
    assert cluster.failure_message(2, "step 1\nerror: non-finite loss at step 2: lower the lr\n") == \
        "non-finite loss at step 2: lower the lr"
    tail = "Traceback (most recent call last):\n  File \"x.py\", line 1\nMemoryError: out of memory\n"
    assert cluster.failure_message(1, tail) == "MemoryError: out of memory (exit status 1)"


def test_without_ray_a_ray_sweep_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    members = [Experiment(**{**BASE.__dict__, "name": n, "train": TrainConfig(steps=10)}) for n in ("a", "b")]
    with pytest.raises(SystemExit) as exit_info:
        run(members, argv=["--train.out-dir", str(tmp_path), "--sweep.ray"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --sweep.ray needs Ray, which is not installed: pip install -e '.[ray]' "
                   "(or pip install ray)")


def test_a_member_process_given_no_experiment_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_member(["{not json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: give an experiment as JSON, then any overrides")


@pytest.mark.parametrize("flags, message", [
    (["--sweep.devices-per-member", "0"], "--sweep.devices-per-member 0"),
    (["--sweep.device", "npu"], "--sweep.device 'npu': use one of auto, cpu, gpu, tpu"),
    (["--sweep.device", "gpu", "--sweep.tpu-slice", "v4-16"], "--sweep.tpu-slice v4-16 runs members on TPUs"),
])
def test_bad_ray_flags_are_refused_before_ray_is_needed(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # the flags are checked first: no Ray is needed to refuse them
    members = [Experiment(**{**BASE.__dict__, "name": n, "train": TrainConfig(steps=10)}) for n in ("a", "b")]
    with pytest.raises(SystemExit) as exit_info:
        run(members, argv=["--train.out-dir", str(tmp_path), "--sweep.ray", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_cluster_holds_as_many_members_as_its_devices_allow():
    resources = {"CPU": 16.0, "GPU": 8.0, "TPU": 8.0, "TPU-v4-16-head": 3.0}
    assert cluster.Placement("cpu", 2).capacity(resources) == 8
    assert cluster.Placement("gpu", 3).capacity(resources) == 2
    assert cluster.Placement("tpu", 4).capacity(resources) == 2
    assert cluster.Placement("tpu", 4, tpu_slice="v4-16").capacity(resources) == 3
    assert cluster.Placement("gpu", 1).capacity({"CPU": 2.0}) == 1  # none yet (an autoscaler adds them): one waits


def test_a_ray_address_where_nothing_answers_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    members = [Experiment(**{**BASE.__dict__, "name": n, "train": TrainConfig(steps=10)}) for n in ("a", "b")]
    with pytest.raises(SystemExit) as exit_info:
        run(members, argv=["--train.out-dir", str(tmp_path), "--sweep.ray-address", f"127.0.0.1:{port}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --sweep.ray-address 127.0.0.1:{port}: nothing answers there") and "\n" not in err
