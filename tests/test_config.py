"""Config validation and the command line's handling of bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from jaxlm.cli import parse
from jaxlm.config import PRESETS, DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
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
    (lambda: ModelConfig(family="gpt3"), "ModelConfig.family='gpt3' is not one of gpt2, llama, qwen3"),
    (lambda: ModelConfig(norm="batchnorm"), "ModelConfig.norm='batchnorm' is not one of layernorm, rmsnorm"),
    (lambda: ModelConfig(family="llama", positions="alibi"), "ModelConfig.positions='alibi' is not one of learned, rope"),
    (lambda: ModelConfig(mlp="relu"), "ModelConfig.mlp='relu' is not one of gelu, swiglu"),
    (lambda: ModelConfig(family="qwen3", head_dim=7), "RoPE needs an even head_dim"),
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
    qwen3 = ModelConfig(family="qwen3", d_model=64, n_heads=4, n_kv_heads=2, head_dim=32)
    assert (gpt2.d_ff, gpt2.n_kv_heads, gpt2.bias, gpt2.tie_embeddings) == (256, 4, True, True)
    assert (gpt2.positions, gpt2.norm, gpt2.mlp, gpt2.qk_norm, gpt2.head_dim) == ("learned", "layernorm", "gelu", False, 16)
    assert (llama.d_ff, llama.bias, llama.tie_embeddings) == (256, False, False)
    assert (llama.positions, llama.norm, llama.mlp, llama.qk_norm) == ("rope", "rmsnorm", "swiglu", False)
    assert (qwen3.positions, qwen3.norm, qwen3.mlp, qwen3.qk_norm) == ("rope", "rmsnorm", "swiglu", True)
    assert (qwen3.bias, qwen3.qkv_bias, qwen3.head_dim, qwen3.d_ff) == (False, False, 32, 256)
    # A feature the config gives is kept; the rules that hang on it follow it (d_ff on the MLP).
    gelu_llama = ModelConfig(family="llama", d_model=64, n_heads=4, mlp="gelu", qk_norm=True)
    assert (gelu_llama.mlp, gelu_llama.d_ff, gelu_llama.qk_norm, gelu_llama.positions) == ("gelu", 256, True, "rope")
    assert ModelConfig(family="llama", d_model=384, mlp="gelu").d_ff == 1536
    assert ModelConfig(family="gpt2", d_model=384, mlp="swiglu").d_ff == 1024  # 8/3 x 384 rounded up to 256
    assert gelu_llama.architecture == "llama (mlp=gelu, qk_norm=True)" and llama.architecture == "llama"


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
    assert (exp.model.d_ff, exp.model.n_kv_heads, exp.model.head_dim) == (768, 6, 32)
    # Features follow the family unless set; head_dim follows d_model unless set (Qwen3's 128 is set).
    qwen3 = cfg.replace(family="qwen3")
    assert (qwen3.qk_norm, qwen3.norm, qwen3.tie_embeddings, qwen3.head_dim) == (True, "rmsnorm", True, 32)
    assert cfg.replace(family="llama", norm="layernorm").norm == "layernorm"
    assert cfg.replace(mlp="swiglu").d_ff == 512 and cfg.replace(mlp="swiglu", family="llama").mlp == "swiglu"
    assert cfg.replace(family="llama", mlp="gelu").replace(family="gpt2").mlp == "gelu"  # no longer Llama's rule
    wide = PRESETS["qwen3-0.6b"].replace(d_model=2048)
    assert (wide.head_dim, wide.d_ff, wide.n_kv_heads, wide.qk_norm) == (128, 3072, 8, True)
    [exp] = parse(Experiment(model=cfg), ["--model.family", "llama"])
    assert exp.model == ModelConfig(family="llama", d_model=128, n_heads=4)
    [exp] = parse(Experiment(model=cfg), ["--model.family", "qwen3", "--model.head-dim", "64", "--model.d-model", "256"])
    assert (exp.model.qk_norm, exp.model.head_dim, exp.model.d_ff, exp.model.positions) == (True, 64, 768, "rope")


def test_config_round_trips_through_json():
    exp = Experiment(name="x", model=ModelConfig(family="llama", n_kv_heads=2), optim=OptimConfig(schedule="wsd"))
    assert Experiment.from_dict(json.loads(exp.to_json())) == exp


# The model sections of config.json files written before ModelConfig named its features (family only).
OLD_MODEL_JSON = {
    "llama": {
        "attention": "auto", "bias": False, "d_ff": 384, "d_model": 128, "dropout": 0.0, "dtype": "float32",
        "family": "llama", "init_std": 0.02, "max_seq_len": 256, "n_heads": 4, "n_kv_heads": 2, "n_layers": 4,
        "norm_eps": 1e-05, "qkv_bias": False, "remat": "auto", "rope_high_freq_factor": 4.0,
        "rope_low_freq_factor": 1.0, "rope_original_max_len": 8192, "rope_scaling_factor": 0.0,
        "rope_theta": 10000.0, "scan_layers": True, "tie_embeddings": False, "vocab_size": 2048,
    },
    "gpt2": {
        "attention": "auto", "bias": True, "d_ff": 512, "d_model": 128, "dropout": 0.0, "dtype": "float32",
        "family": "gpt2", "init_std": 0.02, "max_seq_len": 256, "n_heads": 4, "n_kv_heads": 4, "n_layers": 4,
        "norm_eps": 1e-05, "qkv_bias": True, "remat": "auto", "rope_high_freq_factor": 4.0,
        "rope_low_freq_factor": 1.0, "rope_original_max_len": 8192, "rope_scaling_factor": 0.0,
        "rope_theta": 10000.0, "scan_layers": True, "tie_embeddings": True, "vocab_size": 2048,
    },
}


@pytest.mark.parametrize("family", sorted(OLD_MODEL_JSON))
def test_a_config_json_from_before_features_loads_and_resumes(family, tmp_path):
    from jaxlm.checkpoint import write_or_check_config

    model = ModelConfig(family=family, n_layers=4, d_model=128, n_heads=4, vocab_size=2048, max_seq_len=256,
                        **(dict(n_kv_heads=2, d_ff=384) if family == "llama" else {}))
    experiment = Experiment(
        name="old", model=model, data=DataConfig(vocab_size=2048, seq_len=128), train=TrainConfig(out_dir=str(tmp_path))
    )
    old = {**experiment.to_dict(), "model": OLD_MODEL_JSON[family]}
    assert Experiment.from_dict(old) == experiment
    # A run directory of the old config resumes under the new code, and vice versa nothing else does.
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert write_or_check_config(experiment) is True
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(JaxlmError, match="model.qk_norm: False -> True"):
        write_or_check_config(dataclasses.replace(experiment, model=model.replace(qk_norm=True)))


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
