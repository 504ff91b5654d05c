"""tools.bench runs end to end on tiny configs, and tools.bench.torch_reference computes what jaxlm computes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.model import forward, init_params
from tests.devices import use_first_devices
from tools.bench import bench

TINY = [
    "--experiment", "quickstart", "--model.n-layers", "1", "--model.d-model", "32", "--model.n-heads", "2",
    "--model.n-kv-heads", "2", "--model.d-ff", "64", "--model.vocab-size", "61", "--model.max-seq-len", "16",
    "--data.tokenizer", "char", "--data.seq-len", "16", "--data.batch-size", "8",
]
REQUIRED = {"tokens_per_sec", "step_ms", "mfu", "compile_s", "peak_flops", "vocab_size"}


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


@pytest.mark.slow
def test_train_ends_with_json_of_the_run(capsys):
    bench.main(["train", *TINY, "--steps", "2", "--warmup", "1", "--peak-flops", "1e12"])
    record = _last_json(capsys)
    assert REQUIRED <= set(record)
    assert record["vocab_size"] == 61 and record["seq_len"] == 16 and record["batch_size"] == 8
    assert record["steps"] == 2 and record["peak_flops"] == 1e12
    # The figures must agree with each other: tokens/s from the step time, MFU from tokens/s.
    assert record["tokens_per_sec"] == pytest.approx(8 * 16 / (record["step_ms"] / 1e3))
    assert record["mfu"] == pytest.approx(record["tokens_per_sec"] * record["flops_per_token"] / 1e12)
    assert record["compile_s"] > 0 and record["temp_bytes"] >= 0


@pytest.mark.slow
def test_train_with_torch_reports_the_ratio(capsys):
    pytest.importorskip("torch")
    bench.main(["train", *TINY, "--steps", "2", "--warmup", "0", "--peak-flops", "1e12", "--torch"])
    record = _last_json(capsys)
    assert record["torch_params"] == record["params"]
    assert record["ratio_vs_torch"] == pytest.approx(record["tokens_per_sec"] / record["torch_tokens_per_sec"])


@pytest.mark.slow
def test_train_versus_times_each_variant_as_configured(capsys):
    bench.main(["train", *TINY, "--steps", "2", "--warmup", "0", "--peak-flops", "1e12",
                "--versus", "--model.remat none --model.attention xla --data.batch-size 16"])
    record = _last_json(capsys)
    assert record["remat"] == "dots (auto)" and record["attention"] == "xla (auto)"  # one block of 16 queries
    [variant] = record["versus"]
    assert (variant["remat"], variant["attention"]) == ("none", "xla")
    assert variant["ratio_vs_base"] == pytest.approx(variant["tokens_per_sec"] / record["tokens_per_sec"])
    # The variant's batch has another shape: it counts its own tokens.
    assert variant["tokens_per_sec"] == pytest.approx(16 * 16 / (variant["step_ms"] / 1e3))


@pytest.mark.slow
def test_compile_ends_with_json_per_depth_and_policy(capsys):
    bench.main(["compile", *TINY, "--depths", "2", "--remat", "full"])
    record = _last_json(capsys)
    assert [(r["n_layers"], r["remat"]) for r in record["rows"]] == [(2, "full")]
    assert record["rows"][0]["compile_s"] > 0 and record["rows"][0]["temp_bytes"] > 0


def test_unknown_experiment_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["train", "--experiment", "no_such_experiment"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_experiment" in err[0]


def test_torch_without_pytorch_fails_before_compiling(monkeypatch):
    experiment = bench.load_experiment("quickstart", TINY[2:])

    def compile_step(*args):
        raise AssertionError("compiled jaxlm's step before checking for PyTorch")

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setattr(bench, "build_train_step", compile_step)
    with pytest.raises(ConfigError, match="--torch needs PyTorch: pip install torch"):
        bench.bench_train(experiment, steps=1, with_torch=True)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=16),
        ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=16, bias=False),
        ModelConfig(
            family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16,
            rope_scaling_factor=8.0, rope_original_max_len=8,
        ),
        ModelConfig(
            family="qwen3", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=12, vocab_size=50,
            max_seq_len=16, tie_embeddings=False,
        ),
    ],
    ids=["gpt2", "gpt2-nobias", "llama-gqa", "qwen3"],
)
def test_torch_reference_computes_jaxlm_logits(cfg):
    """The reference must be the same model: with jaxlm's weights copied in, the same logits."""
    torch = pytest.importorskip("torch")
    from tools.bench import torch_reference

    params = init_params(cfg, jax.random.key(3))
    # Non-trivial norms and biases, and activations large enough that a mix-up of scale and shift, of q, k, v,
    # or of the exact and tanh GELU (1e-3 apart here) would show.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape, dtype=np.float32), params)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    expected = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(params, tokens))

    model = torch_reference.TorchTransformer(cfg)
    torch_reference.load_jaxlm_params(model, params)
    assert torch_reference.count_params(model) == sum(x.size for x in jax.tree.leaves(params))
    with torch.no_grad():
        got = model(torch.from_numpy(tokens.astype(np.int64))).numpy()
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=5e-5)


def test_torch_reference_refuses_what_it_does_not_implement():
    pytest.importorskip("torch")
    from tools.bench import torch_reference

    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=50, max_seq_len=16)
    object.__setattr__(cfg, "positions", "alibi")  # a feature value jaxlm might learn before the reference does
    with pytest.raises(ConfigError, match="does not implement positions='alibi'"):
        torch_reference.TorchTransformer(cfg)


@pytest.mark.slow
def test_profile_puts_each_operation_in_a_model_part(capsys):
    pytest.importorskip("torch")
    bench.main(["train", *TINY, "--steps", "1", "--warmup", "1", "--peak-flops", "1e12", "--torch", "--profile", "2"])
    profile = _last_json(capsys)["profile"]
    parts = profile["jax"]["parts"]
    # Each part of the model works forward and backward, and the matmuls are found where the model has them.
    for name in ("attention", "attention projections", "mlp", "norms and residuals", "embeddings and logits"):
        assert parts[name]["forward_ms"] > 0 and parts[name]["backward_ms"] > 0, name
    for name in ("attention", "attention projections", "mlp", "embeddings and logits"):
        assert parts[name]["matmul_ms"] > 0, name
    assert parts["norms and residuals"]["matmul_ms"] == 0
    assert parts["optimizer"]["total_ms"] > 0 and parts["optimizer"]["matmul_ms"] == 0
    # Nearly all the time lands in a named part, and the summary adds up.
    jaxlm = profile["jax"]
    assert parts["other"]["total_ms"] < 0.2 * jaxlm["total_ms"]
    assert jaxlm["total_ms"] == pytest.approx(sum(p["total_ms"] for p in parts.values()))
    assert jaxlm["total_ms"] == pytest.approx(jaxlm["matmul_ms"] + jaxlm["attention_ms"] + jaxlm["other_ms"])
    torch = profile["torch"]
    assert torch["matmul_ms"] > 0 and torch["attention_ms"] > 0


def test_operations_without_a_source_path_take_their_operands():
    from tools.bench import step_profile

    hlo = """
  %dot.1 = f32[8,4,16,16]{3,2,1,0} dot(%p.0, %p.1), lhs_batch_dims={0,1}, metadata={op_name="f/blocks/attn/dot"}
  %wrapped_reduce-window.3 = f32[8,4,16,2]{3,2,1,0} fusion(%dot.1, %c.2), kind=kLoop, metadata={stack_frame_id=3}
  ROOT %dot.2 = f32[64,32]{1,0} dot(%a.5, %b.6), metadata={op_name="f/transpose(jvp(T))/blocks/mlp/fc/dot"}
  %add.7 = f32[64,32]{1,0} add(%x.8, %y.9), metadata={op_name="jit(f)/add"}
"""
    table = step_profile.hlo_instructions(hlo)
    assert step_profile.part_of(table["wrapped_reduce-window.3"].path) == "attention"
    assert not table["wrapped_reduce-window.3"].is_matmul
    assert table["dot.2"].is_matmul and step_profile.part_of(table["dot.2"].path) == "mlp"
    assert step_profile.part_of(table["add.7"].path) == "optimizer"


@pytest.mark.slow
def test_checkpoint_bench_saves_as_each_mode_says(tmp_path, capsys, monkeypatch):
    use_first_devices(monkeypatch, 1)  # what is tested is which saves each mode makes
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    data = ["--data.source", f"text:{corpus}/*.txt", "--data.cache-dir", str(tmp_path / "cache"),
            "--data.val-fraction", "0.25"]
    bench.main(["checkpoint", *TINY, *data, "--steps", "4", "--every", "2", "--rounds", "1"])
    rows = _last_json(capsys)["rows"]
    # No intermediate saves: only the final checkpoint; every 2 of 4 steps: steps 2 and 4.
    assert [(r["mode"], r["checkpoints"]) for r in rows] == [("none", 1), ("async", 2), ("blocking", 2)]
    assert all(r["step_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_gpu_check_runs_its_code_path_on_tiny_shapes(tmp_path, capsys):
    from tools.bench import gpu_check

    # A budget of a second: the first run starts, the ones after it are skipped (the script's whole path, on a CPU).
    records = gpu_check.main(["--tiny", "--steps", "1", "--budget-s", "1", "--out", str(tmp_path)])
    assert 1 <= len(records) < len(gpu_check.RUNS) and not any("error" in r for r in records)
    assert (records[0]["preset"], records[0]["dtype"], records[0]["remat"]) == ("gpt2-124m", "bfloat16", "none")
    assert len((tmp_path / "gpu_results.jsonl").read_text().splitlines()) == len(records)
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["runs"] == len(records)
    best_gpt2 = max(r["mfu_per_gpu"] for r in records if r["preset"] == "gpt2-124m")
    assert summary["best"]["gpt2-124m attention=auto"]["mfu_per_gpu"] == pytest.approx(best_gpt2)
    # Per GPU: the machine's tokens/s over its devices, against one device's peak.
    first = records[0]
    per_device = first["tokens_per_sec"] / jax.device_count() * first["flops_per_token"]
    assert first["mfu_per_gpu"] == pytest.approx(per_device / (first["peak_flops"] / jax.device_count()))


def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path, capsys):
    from tools.bench import gpu_check

    assert jax.default_backend() != "gpu"
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tools.bench.gpu_check needs a CUDA GPU") and "--tiny" in err[0]
    assert not (tmp_path / "out").exists()


def test_gpu_check_fails_when_every_run_fails(tmp_path, monkeypatch, capsys):
    from tools.bench import gpu_check

    def fail(*args, **kwargs):
        raise RuntimeError("cuDNN is not detected.")

    monkeypatch.setattr(bench, "bench_train", fail)
    records = gpu_check.main(["--tiny", "--steps", "1", "--out", str(tmp_path)])
    assert len(records) == len(gpu_check.RUNS) and all(r["error"] == "cuDNN is not detected." for r in records)
    assert gpu_check.exit_status(records) == 1 and gpu_check.exit_status([]) == 1
    assert gpu_check.exit_status([records[0], {"mfu": 0.5}]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        gpu_check.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m tools.bench.gpu_check ")


@pytest.mark.parametrize("driver, expected", [("570.86.15", "jax[cuda12]"), ("580.65.06", "jax[cuda13]"),
                                              ("470.42", "older than 525")])
def test_gpu_check_script_picks_the_cuda_wheels_the_driver_supports(tmp_path, driver, expected):
    # A stand-in nvidia-smi reports the driver; PYTHON=false stops the script right after its choice.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "false", "OUT": str(tmp_path / "out"),
           "GPU_CHECK_SKIP_INSTALL": "1"}
    result = subprocess.run(["bash", "tools/bench/gpu_check.sh"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert expected in result.stdout
