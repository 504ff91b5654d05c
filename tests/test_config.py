"""Config validation and the command line's handling of bad input."""

import dataclasses
import os
import subprocess
import sys

import pytest

from jaxlm.cli import parse
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.errors import ConfigError, JaxlmError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INVALID = [
    (lambda: ModelConfig(d_model=100, n_heads=3), "divisible by n_heads"),
    (lambda: ModelConfig(family="llama", n_heads=6, n_kv_heads=4, d_model=48), "divisible by n_kv_heads"),
    (lambda: Experiment(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=128)), "max_seq_len"),
    (lambda: OptimConfig(lr=0.0), "lr must be positive"),
    (lambda: OptimConfig(lr=-1e-3), "lr must be positive"),
    (lambda: TrainConfig(steps=0), "steps must be positive"),
    (lambda: DataConfig(batch_size=0), "batch_size must be positive"),
    (lambda: ModelConfig(family="gpt3"), "family='gpt3'"),
    (lambda: OptimConfig(schedule="linear"), "schedule='linear'"),
    (lambda: ModelConfig(remat="some"), "remat"),
    (lambda: MeshConfig(data=-1, fsdp=-1), "at most one"),
    (lambda: Experiment(data=DataConfig(vocab_size=8192), model=ModelConfig(vocab_size=4096)), "--model.vocab-size"),
    (lambda: Experiment(data=DataConfig(batch_size=6), train=TrainConfig(grad_accum=4)), "grad_accum"),
    (lambda: OptimConfig(lr=1e-3, min_lr=1e-2), "min_lr"),
]


@pytest.mark.parametrize("make,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_configs_raise_config_error(make, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        make()


def test_family_defaults_resolve():
    gpt2 = ModelConfig(family="gpt2", d_model=64, n_heads=4)
    llama = ModelConfig(family="llama", d_model=64, n_heads=4)
    assert (gpt2.d_ff, gpt2.n_kv_heads, gpt2.bias, gpt2.tie_embeddings) == (256, 4, True, True)
    assert (llama.d_ff, llama.bias, llama.tie_embeddings) == (256, False, False)


def test_derived_fields_follow_overrides_unless_set():
    cfg = ModelConfig(family="gpt2", d_model=128, n_heads=4)
    wider = cfg.replace(d_model=256)
    assert wider.d_ff == 1024 and wider.n_kv_heads == 4
    assert cfg.replace(d_model=256, d_ff=300).d_ff == 300
    gqa = ModelConfig(family="llama", d_model=128, n_heads=4, n_kv_heads=2, d_ff=384)
    assert gqa.replace(n_heads=8).n_kv_heads == 2 and gqa.replace(n_heads=8).d_ff == 384
    llama = cfg.replace(family="llama")
    assert (llama.bias, llama.tie_embeddings, llama.d_ff) == (False, False, 512)
    [exp] = parse(Experiment(model=cfg), ["--model.d-model", "192", "--model.n-heads", "6"])
    assert (exp.model.d_ff, exp.model.n_kv_heads) == (768, 6)


def test_config_round_trips_through_json():
    exp = Experiment(name="x", model=ModelConfig(family="llama", n_kv_heads=2), optim=OptimConfig(schedule="wsd"))
    import json

    assert Experiment.from_dict(json.loads(exp.to_json())) == exp


def test_overrides_apply_to_the_experiment_and_to_every_sweep_member():
    base = Experiment(name="a", train=TrainConfig(steps=10))
    [got] = parse(base, ["--train.steps", "50", "--model.n_layers", "2"])
    assert got.train.steps == 50 and got.model.n_layers == 2 and got.name == "a"
    sweep = tuple(dataclasses.replace(base, name=f"m{i}", model=ModelConfig(d_model=64 * (i + 1))) for i in range(5))
    members = parse(sweep, ["--sweep.members", "1:3", "--optim.lr", "0.01"])
    assert [m.name for m in members] == ["m1", "m2"]
    assert [m.model.d_model for m in members] == [128, 192]
    assert all(m.optim.lr == 0.01 for m in members)


def test_a_sweep_override_sets_every_member_even_where_it_equals_the_first():
    base = Experiment(name="a", train=TrainConfig(steps=10, out_dir="runs/sweep/a"))
    sweep = tuple(
        dataclasses.replace(base, name=f"m{i}", model=ModelConfig(n_layers=i + 1, scan_layers=i == 0),
                            train=TrainConfig(steps=10, out_dir=f"runs/sweep/m{i}"))
        for i in range(3)
    )
    members = parse(sweep, ["--model.n-layers", "1", "--model.no-scan-layers", "--train.out-dir", "elsewhere"])
    assert [m.model.n_layers for m in members] == [1, 1, 1]  # member 0's own value, set on all
    assert not any(m.model.scan_layers for m in members)
    assert [m.run_dir for m in members] == [os.path.join("elsewhere", f"m{i}") for i in range(3)]
    assert [m.train.steps for m in members] == [10, 10, 10]
    with pytest.raises(JaxlmError, match="drop --name"):
        parse(sweep, ["--name", "b"])


def run_quickstart(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )


def test_cli_turns_a_config_error_into_one_line_and_status_2():
    result = run_quickstart("--model.n_heads", "5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "n_heads" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_help_lists_the_overrides():
    result = run_quickstart("--help")
    assert result.returncode == 0
    for flag in ("--model.n-layers", "--train.steps", "--optim.lr", "--data.source", "--mesh.data"):
        assert flag in result.stdout.replace("_", "-"), flag
    # Each field's help is its own comment (tyro once gave scan_layers the remat comment above it).
    text = " ".join(result.stdout.replace("│", " ").split())
    remat = text[text.index("--model.remat STR") : text.index("--model.scan-layers")]
    scan = text[text.index("--model.scan-layers") : text.index("--model.attention STR")]
    assert "What the backward pass recomputes" in remat and "backward pass" not in scan
    assert "nn.scan over the blocks" in scan and "compile time stays flat in depth" in scan
