"""The chunked cross-entropy against the plain one and numpy: values, gradients, and no full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.model import Transformer, chunked_token_loss_sums, init_params, loss_chunk_size, token_loss_sums


def loss_and_grads(cfg: ModelConfig, params, batch):
    def loss(params):
        total, count = Transformer(cfg).apply(
            {"params": params}, batch["inputs"], segment_ids_BT=batch.get("segment_ids"), loss_batch=batch
        )
        return total / count

    return jax.value_and_grad(loss)


def test_chunked_token_loss_sums_equals_numpy_with_its_gradient():
    """Chunks of 16 over T 40 (the last one padded), against numpy's cross-entropy of x @ w, and the gradients
    against those of `token_loss_sums` on the full logits."""
    B, T, D, V = 2, 40, 8, 29
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((B, T, D)), rng.standard_normal((D, V))
    batch = {"targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
             "weights": jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32)}
    logits = x @ w
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)

    @jax.jit
    def sums_and_grads(x, w):
        grad = lambda loss: jax.grad(lambda x, w: loss(x, w)[0], argnums=(0, 1))(x, w)  # noqa: E731
        chunked = lambda x, w: chunked_token_loss_sums(x, w, batch, 16)  # noqa: E731
        return chunked(x, w), grad(chunked), grad(lambda x, w: token_loss_sums(x @ w, batch))

    (total, count), chunked, plain = sums_and_grads(x, w)
    np.testing.assert_allclose(total, (nll * np.asarray(batch["weights"])).sum(), rtol=1e-5)
    assert count == np.asarray(batch["weights"]).sum()
    for g, g_plain in zip(chunked, plain):
        np.testing.assert_allclose(g, g_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("tie", "counted"), [(True, "weights"), (False, "segment_ids")])
def test_model_loss_in_chunks_equals_the_plain_loss_and_never_holds_the_full_logits(tie, counted):
    """Tied and untied output matrices; the targets counted by `weights`, or by the segment ids (0: padding)."""
    B, T, V = 2, 40, 61
    cfg = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=V,
                      max_seq_len=T, tie_embeddings=tie, loss_chunk=16, remat="none")
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)}
    if counted == "weights":
        batch["weights"] = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32)
    else:
        batch["segment_ids"] = jnp.asarray(np.repeat([[1] * 15 + [2] * 20 + [0] * 5], B, 0), jnp.int32)

    chunked, plain = loss_and_grads(cfg, params, batch), loss_and_grads(cfg.replace(loss_chunk=0), params, batch)
    # No float32 [B, T, V] (nor [B*T, V]) array in the chunked program, forward or backward; the plain one has it.
    full = (f"f32[{B},{T},{V}]", f"f32[{B * T},{V}]")
    assert not any(shape in str(jax.make_jaxpr(chunked)(params)) for shape in full)
    assert any(shape in str(jax.make_jaxpr(plain)(params)) for shape in full)
    (value, grads), (value_plain, grads_plain) = jax.jit(lambda p: (chunked(p), plain(p)))(params)
    np.testing.assert_allclose(value, value_plain, rtol=1e-6)
    for g, g_plain in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(g, g_plain, atol=1e-6, rtol=1e-5)


def test_loss_chunk_auto_is_plain_on_cpu_and_bad_values_are_refused():
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=61)
    assert loss_chunk_size(cfg, 4096) == 0
    assert loss_chunk_size(cfg.replace(loss_chunk=256), 4096) == 256
    assert loss_chunk_size(cfg.replace(loss_chunk=256), 256) == 0  # one chunk is the plain loss
    tpu_mesh = jax.sharding.AbstractMesh(
        (1, 1, 1), sharding.MESH_AXES, abstract_device=jax.sharding.AbstractDevice("TPU v5", 1, "tpu"),
    )
    with jax.sharding.use_abstract_mesh(tpu_mesh):
        assert loss_chunk_size(cfg, 4096) == 512
    with pytest.raises(ConfigError, match="loss_chunk"):
        cfg.replace(loss_chunk=-1)
