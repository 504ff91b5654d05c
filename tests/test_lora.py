"""LoRA: a fresh adapter is the identity, merged weights reproduce the adapted model, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import lora
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.finetune import apply_model as eager_apply_model
from jaxlm.model import forward as eager_forward
from jaxlm.model import init_params as eager_init_params

# Each model computation compiled as one program: run eagerly, every op is dispatched (and compiled) on its own, and
# the inits and forwards cost more than the checks. Both sides of each comparison go through jit.
init_params = jax.jit(eager_init_params, static_argnums=0)
forward = jax.jit(eager_forward, static_argnums=0)
apply_model = jax.jit(eager_apply_model, static_argnums=0, static_argnames="lora_spec")

GPT2 = ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32)
LLAMA = ModelConfig(
    family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, max_seq_len=32,
    scan_layers=False,
)


def tokens(seed=0, batch=2, length=12, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg,targets",
    [
        (GPT2, ("query", "key", "value", "out", "fc", "proj")),
        (LLAMA, ("query", "key", "value", "out", "gate", "up", "proj")),
    ],
)
def test_fresh_adapters_leave_the_model_unchanged(cfg, targets):
    params = init_params(cfg, jax.random.key(0))
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=targets)
    adapters = lora.init_lora(cfg, params, spec, jax.random.key(1))
    leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]
    assert {path[-1].key for path, _ in leaves} == {"lora_a", "lora_b"}
    assert all(np.all(np.asarray(x) == 0) for path, x in leaves if path[-1].key == "lora_b")
    x = tokens()
    base = forward(cfg, params, x)
    adapted = apply_model(cfg, params, x, lora=adapters, lora_spec=spec)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def _trained_adapters(cfg, spec, steps=15):
    """Adapters after a few Adam steps on next-token prediction of random tokens."""
    params = init_params(cfg, jax.random.key(0))
    adapters = lora.init_lora(cfg, params, spec, jax.random.key(1))
    x = tokens(1, batch=4, length=16)
    tx = optax.adam(3e-2)
    opt = tx.init(adapters)

    def loss(a):
        logits = apply_model(cfg, params, x[:, :-1], lora=a, lora_spec=spec)
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(a, opt):
        grads = jax.grad(loss)(a)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(a, updates), opt

    first = float(jax.jit(loss)(adapters))
    for _ in range(steps):
        adapters, opt = step(adapters, opt)
    assert float(jax.jit(loss)(adapters)) < first - 0.1  # the adapters learned something: B is no longer zero
    return params, adapters


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [GPT2, LLAMA])
def test_merged_weights_give_the_adapted_logits(cfg):
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("query", "value", "out", "proj"))
    params, adapters = _trained_adapters(cfg, spec)
    x = tokens(2)
    adapted = np.asarray(apply_model(cfg, params, x, lora=adapters, lora_spec=spec))
    merged = np.asarray(forward(cfg, lora.merge(params, adapters, spec), x))
    base = np.asarray(forward(cfg, params, x))
    assert np.abs(adapted - base).max() > 1e-2  # the comparison below is not between two base models
    np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=1e-5)


def test_adapted_projection_matches_numpy_low_rank_update():
    """The output projection (a [H, E, D] kernel) adapted through the interceptor equals the model whose kernel
    was updated in numpy: W + (alpha / r) A B, with A B reshaped to W's axes."""
    cfg = GPT2
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=("out",))
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    L, H, E, D = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model
    a = rng.normal(size=(L, H * E, 3)).astype(np.float32)
    b = rng.normal(size=(L, 3, D)).astype(np.float32) * 0.1
    adapters = {"blocks": {"attn": {"out": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}}}
    kernel = np.asarray(params["blocks"]["attn"]["out"]["kernel"])  # [L, H, E, D]
    updated = kernel + 2.0 * np.einsum("lir,lro->lio", a, b).reshape(L, H, E, D)
    reference = jax.tree.map(lambda x: x, params)
    reference["blocks"]["attn"]["out"]["kernel"] = jnp.asarray(updated)
    x = tokens(3)
    np.testing.assert_allclose(
        np.asarray(apply_model(cfg, params, x, lora=adapters, lora_spec=spec)),
        np.asarray(forward(cfg, reference, x)), atol=2e-5, rtol=1e-5,
    )


@pytest.mark.slow
def test_trainable_count_follows_the_formula():
    r = 4
    # GPT-2: D = 32, F = 4 D = 128, 2 layers; q, k, v, out are D x D; fc D x F; proj F x D.
    spec = lora.LoraSpec(rank=r, targets=("query", "key", "value", "out", "fc", "proj"))
    adapters = lora.init_lora(GPT2, init_params(GPT2, jax.random.key(0)), spec, jax.random.key(1))
    assert lora.count_params(adapters) == 2 * (4 * r * (32 + 32) + r * (32 + 128) + r * (128 + 32))
    # Llama with grouped queries: k and v map D = 32 to 2 kv heads x 8 = 16; gate/up D -> 48, proj 48 -> D.
    spec = lora.LoraSpec(rank=r, targets=("query", "key", "value", "gate", "up", "proj"))
    adapters = lora.init_lora(LLAMA, init_params(LLAMA, jax.random.key(0)), spec, jax.random.key(1))
    per_layer = r * (32 + 32) + 2 * r * (32 + 16) + 2 * r * (32 + 48) + r * (48 + 32)
    assert lora.count_params(adapters) == 2 * per_layer
    assert set(adapters) == {"block_0", "block_1"}  # unscanned layers keep their own adapters


@pytest.mark.slow
def test_dropout_acts_only_in_training():
    spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets=("query", "value"))
    params, adapters = _trained_adapters(GPT2, lora.LoraSpec(rank=4, alpha=8.0, targets=("query", "value")), steps=5)
    x = tokens(4)
    evaluation = [np.asarray(apply_model(GPT2, params, x, lora=adapters, lora_spec=spec)) for _ in range(2)]
    np.testing.assert_array_equal(evaluation[0], evaluation[1])
    trained = np.asarray(apply_model(GPT2, params, x, lora=adapters, lora_spec=spec, rng=jax.random.key(0)))
    assert np.abs(trained - evaluation[0]).max() > 1e-4


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown LoRA target 'attn'"):
        lora.LoraSpec(targets=("attn",))
    with pytest.raises(ConfigError, match="rank"):
        lora.LoraSpec(rank=0)
    spec = lora.LoraSpec(targets=("gate",))
    with pytest.raises(ConfigError, match="'gate' has no matrix in this model \\(its MLP is gelu\\)"):
        lora.init_lora(GPT2, init_params(GPT2, jax.random.key(0)), spec, jax.random.key(1))
