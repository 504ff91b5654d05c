"""Hugging Face import and export, checked against transformers itself (PyTorch, float32, CPU)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxlm.config import PRESETS, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.flops import count_params
from jaxlm.generate import generate
from jaxlm.hf import config_from_hf, load_hf, save_hf
from jaxlm.model import forward as _forward
from jaxlm.model import init_params as _init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 96
EOS = V - 1
TOKENS = np.random.default_rng(0).integers(0, V, (3, 24))
# One compilation each instead of many small ones (eager forward passes compile every operation on its own).
init_params = jax.jit(_init_params, static_argnums=0)
forward = jax.jit(_forward, static_argnums=0)


def zero_params(cfg):
    """Parameters of `cfg`'s shapes, all zeros, without compiling anything: for tests about structure, not values."""
    shapes = jax.eval_shape(lambda key: _init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _gpt2(**kw):
    return transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64, bos_token_id=EOS, eos_token_id=EOS,
        pad_token_id=0, **kw,
    )


def _llama(**kw):
    base = dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOS,
        pad_token_id=0,
    )
    return transformers.LlamaConfig(**{**base, **kw})


def _qwen3(**kw):
    # head_dim 16, not hidden_size / heads = 8: the heads' width is independent of d_model.
    base = dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=48, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )
    return transformers.Qwen3Config(**{**base, **kw})


HF_CONFIGS = {
    "gpt2-tied": lambda: _gpt2(),
    "gpt2-untied": lambda: _gpt2(tie_word_embeddings=False),
    "llama-gqa-tied": lambda: _llama(rope_theta=500.0, tie_word_embeddings=True),
    "llama-mqa-untied-bias": lambda: _llama(num_key_value_heads=1, rope_theta=2e5, attention_bias=True),
    "llama3-rope-scaling": lambda: _llama(
        max_position_embeddings=256, mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    "llama-head-dim": lambda: _llama(head_dim=16),
    "qwen3-tied": lambda: _qwen3(tie_word_embeddings=True),
    "qwen3-untied": lambda: _qwen3(tie_word_embeddings=False, num_key_value_heads=1),
}


def _random_hf_model(hf_config):
    """A transformers model whose every weight, bias and norm scale is random (default init zeroes biases)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _same_params(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = _random_hf_model(HF_CONFIGS[request.param]())
    model.save_pretrained(path)
    return str(path), model


def test_logits_match_transformers(hf_dir):
    path, model = hf_dir
    cfg, params = load_hf(path)
    got = np.asarray(forward(cfg, params, TOKENS))
    np.testing.assert_allclose(got, _hf_logits(model, TOKENS), atol=1e-4, rtol=0)
    if cfg.rope_scaling_factor:  # the scaling really changes the model, so the match above tested it
        plain = dataclasses.replace(cfg, rope_scaling_factor=0.0)
        assert np.abs(np.asarray(forward(plain, params, TOKENS)) - got).max() > 1e-2


@pytest.mark.slow
# The KV-cache path once per kind of position, head layout and norm (the logits test above covers every variant).
@pytest.mark.parametrize("hf_dir", ["gpt2-tied", "llama-mqa-untied-bias", "llama3-rope-scaling", "qwen3-untied"],
                         indirect=True)
def test_greedy_generation_matches_transformers(hf_dir):
    path, model = hf_dir
    cfg, params = load_hf(path)
    prompts = [TOKENS[0, :5].tolist(), TOKENS[1, :9].tolist()]  # one batch, left-padded by generate

    def theirs(prompt, eos):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=eos)
        return out[0, len(prompt):].tolist()

    ours = generate(cfg, params, prompts, max_new_tokens=20, eos_id=EOS)
    assert ours == [theirs(p, EOS) for p in prompts]
    assert [len(row) for row in ours] == [20, 20]
    # With a token the model does produce as the end of sequence, both stop right after it.
    stop = ours[0][6]
    stopped = generate(cfg, params, prompts, max_new_tokens=20, eos_id=stop)
    assert stopped == [theirs(p, stop) for p in prompts]
    assert len(stopped[0]) <= 7


@pytest.mark.slow
def test_save_then_transformers_and_load_hf_round_trip(hf_dir, tmp_path):
    path, model = hf_dir
    cfg, params = load_hf(path)
    save_hf(cfg, params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(model, TOKENS), atol=1e-5, rtol=0)
    cfg2, params2 = load_hf(str(tmp_path))
    assert cfg2 == cfg
    assert _same_params(params2, params)


JAXLM_CONFIGS = {
    # Settings Hugging Face classes cannot hold on their own: no biases in a GPT-2, unstacked layers, q/k/v biases
    # without an output bias, an output bias without q/k/v biases.
    "gpt2-no-bias-unscanned": ModelConfig(
        family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=32, bias=False,
        scan_layers=False, init_std=0.1,
    ),
    "llama-qkv-bias-only": ModelConfig(
        family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=V, max_seq_len=32,
        qkv_bias=True, init_std=0.1,
    ),
    "llama-bias-without-qkv": ModelConfig(
        family="llama", n_layers=1, d_model=32, n_heads=2, vocab_size=V, max_seq_len=32, bias=True, qkv_bias=False,
        tie_embeddings=True, init_std=0.1, rope_scaling_factor=4.0, rope_original_max_len=16,
    ),
    # Qwen3 with q, k, v biases (HF's attention_bias also gives o_proj one, written as zeros), untied.
    "qwen3-qkv-bias": ModelConfig(
        family="qwen3", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=48, vocab_size=V,
        max_seq_len=32, qkv_bias=True, tie_embeddings=False, rope_theta=1e6, norm_eps=1e-6, init_std=0.1,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JAXLM_CONFIGS))
def test_export_of_jaxlm_models(name, tmp_path):
    cfg = JAXLM_CONFIGS[name]
    # Every weight, bias and norm scale random (scales around 1), so that the mapping of each one is tested; drawn
    # with numpy on the model's parameter shapes, which compiles nothing.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(zero_params(cfg))
    rng = np.random.default_rng(1)
    params = treedef.unflatten([
        (path[-1].key == "scale") + rng.normal(0, 0.1, x.shape).astype(np.float32) for path, x in leaves
    ])
    save_hf(cfg, params, str(tmp_path), max_shard_bytes=20_000)  # small shards: the index is written and read
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = TOKENS[:, :16]
    np.testing.assert_allclose(_hf_logits(model, tokens), forward(cfg, params, tokens), atol=1e-4, rtol=0)
    cfg2, params2 = load_hf(str(tmp_path))
    assert cfg2 == cfg
    assert _same_params(params2, params)


@pytest.mark.slow
def test_exported_classes_follow_the_features(tmp_path):
    params_of = zero_params  # the classes and refusals follow the config's features, whatever the values
    qwen3 = JAXLM_CONFIGS["qwen3-qkv-bias"]
    save_hf(qwen3, params_of(qwen3), str(tmp_path / "qwen3"))
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3")).__name__ == "Qwen3ForCausalLM"
    # A Llama family config with Qwen3's features is a Qwen3 (and comes back as the config that was saved).
    like_qwen3 = ModelConfig(family="llama", n_layers=1, d_model=32, n_heads=4, d_ff=48, vocab_size=V, qk_norm=True)
    save_hf(like_qwen3, params_of(like_qwen3), str(tmp_path / "like"))
    assert json.loads((tmp_path / "like" / "config.json").read_text())["model_type"] == "qwen3"
    assert load_hf(str(tmp_path / "like"))[0] == like_qwen3
    # Features no transformers class holds are refused, not exported as something else.
    for cfg, message in [
        (ModelConfig(n_layers=1, d_model=32, vocab_size=V, positions="rope"), "no Hugging Face class holds"),
        (ModelConfig(n_layers=1, d_model=32, vocab_size=V, qk_norm=True), "no Hugging Face class holds"),
        (ModelConfig(n_layers=1, d_model=32, vocab_size=V, head_dim=16), "head_dim"),
    ]:
        with pytest.raises(ConfigError, match=message):
            save_hf(cfg, params_of(cfg), str(tmp_path / "refused"))
    # Qwen3 has no MLP biases: zero ones may be left out, others may not.
    biased = dataclasses.replace(like_qwen3, bias=True)
    params = params_of(biased)
    save_hf(biased, params, str(tmp_path / "zero-mlp-bias"))
    params["blocks"]["mlp"]["up"]["bias"] = params["blocks"]["mlp"]["up"]["bias"] + 1.0
    with pytest.raises(ConfigError, match="no MLP biases"):
        save_hf(biased, params, str(tmp_path / "mlp-bias"))


def test_qwen3_preset_has_the_shape_and_count_of_transformers_qwen3_0_6b():
    # Qwen3-0.6B's published config.json, built into the transformers model on the meta device (no weights).
    hf_config = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False,
    )
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(hf_config)
    n = sum(p.numel() for p in model.parameters())  # the tied output matrix is counted once
    assert n == 596_049_920
    assert count_params(PRESETS["qwen3-0.6b"]) == n
    assert config_from_hf(hf_config.to_dict()) == PRESETS["qwen3-0.6b"]


@pytest.mark.slow
def test_bfloat16_export(tmp_path):
    cfg = JAXLM_CONFIGS["llama-qkv-bias-only"]
    params = init_params(cfg, jax.random.key(0))
    save_hf(cfg, params, str(tmp_path), dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    _, params2 = load_hf(str(tmp_path))
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32), params)
    assert _same_params(params2, rounded)
    assert not _same_params(params2, jax.tree.map(np.asarray, params))


def test_unusable_directories_are_clear_errors(tmp_path):
    cfg = JAXLM_CONFIGS["llama-qkv-bias-only"]
    save_hf(cfg, init_params(cfg, jax.random.key(0)), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match="mistral"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConfigError, match="layers.2"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ConfigError, match="no place"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ConfigError, match="shape"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.replace(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors only"):
        load_hf(str(tmp_path))


@pytest.mark.slow
def test_convert_tool_both_ways_and_sample_tool(tmp_path, capsys):
    from jaxlm.checkpoint import load_params
    from tools.convert_hf import from_run, to_jaxlm
    from tools.sample import main as sample

    hf_dir = str(tmp_path / "hf")
    _random_hf_model(_llama(vocab_size=260, bos_token_id=258, eos_token_id=259)).save_pretrained(hf_dir)
    cfg, params = load_hf(hf_dir)
    with pytest.raises(ConfigError, match="tokenizer.model"):
        to_jaxlm(hf_dir, str(tmp_path / "run"))
    run = to_jaxlm(hf_dir, str(tmp_path / "run"), tokenizer="byte")
    experiment, run_params = load_params(run)
    assert experiment.model == cfg and experiment.data.tokenizer == "byte"
    assert _same_params(jax.tree.map(np.asarray, run_params), params)

    exported = from_run(run, str(tmp_path / "exported"))
    cfg2, params2 = load_hf(exported)
    assert cfg2 == cfg and _same_params(params2, params)
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["eos_token_id"] == 259  # the byte eos

    # Greedy samples: from the run (text after the eos start token) and from the directory (token ids after bos).
    # Both draw two samples of a 3-token prompt, so the tools and the reference below share one compiled program.
    sample(["--run", run, "--prompt", "ab", "--max-new-tokens", "6", "--batch", "2", "--temperature", "0"])
    sample(["--hf", hf_dir, "--prompt", "97 98", "--max-new-tokens", "6", "--batch", "2", "--temperature", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.startswith("--- sample") for line in lines] == [True, False] * 4
    assert lines[1] == lines[3] and lines[1].startswith("ab")
    expected = generate(cfg, params, [[258, 97, 98]] * 2, max_new_tokens=6, eos_id=259)[0]
    assert lines[5] == lines[7] == " ".join(map(str, [258, 97, 98, *expected]))


def test_convert_tool_checks_out_before_converting(tmp_path, capsys):
    from tools.convert_hf import main as convert

    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path / "a_file", "is a file, not a directory"), (tmp_path / "a_file" / "below", "cannot be created")]
    for out, message in cases:
        for direction in ("--from-run", "--to-jaxlm"):  # the source does not exist: --out is checked first
            with pytest.raises(SystemExit) as exit_info:
                convert([direction, str(tmp_path / "missing"), "--out", str(out)])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert err.startswith("error: --out") and message in err and len(err.splitlines()) == 1
