"""Accelerator kernels on CPU: the Pallas splash-attention kernel in interpret mode against the written-out
attention, the choice of kernels by the target devices, and the chunked loss against the plain one and numpy."""

import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

from jaxlm import sharding
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.model import (
    Transformer, attention_impl, attention_mask, choose_attention, choose_remat, chunked_token_loss_sums,
    einsum_attention, forward, init_params, loss_chunk_size, splash_attention, token_loss_sums,
)


def packed_segments(B: int, T: int, cuts: tuple[int, ...]) -> jax.Array:
    """Segment ids of rows holding documents that end before each of `cuts` (then one more), rolled per row so
    that the rows differ."""
    row = np.searchsorted(np.asarray(cuts), np.arange(T), side="right") + 1
    return jnp.asarray(np.stack([np.roll(row, 7 * b) if b else row for b in range(B)]), jnp.int32)


def qkv(B, T, H, K, E, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((B, T, H, E), (B, T, K, E), (B, T, K, E))]


# ---------------------------------------------------------------------------------------- splash attention


@pytest.mark.slow
def test_splash_attention_values_and_gradients_equal_einsum_attention():
    """Two blocks of 128 (one skipped by causality), grouped-query heads (4 query heads on 2 key/value heads),
    packed documents as segment ids (one of a single token, one across the block boundary), and gradients of
    all three inputs. The model test below covers another length and head width."""
    T = 256
    q, k, v = qkv(2, T, 4, 2, 64)
    segment_ids = packed_segments(2, T, (40, 41, 130))
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    @jax.jit
    def both(q, k, v):
        def loss(attention):
            return lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)

        splash = lambda q, k, v: splash_attention(q, k, v, segment_ids, interpret=True)  # noqa: E731
        einsum = lambda q, k, v: einsum_attention(q, k, v, attention_mask(segment_ids, T, T))  # noqa: E731
        return [(attention(q, k, v), jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v))
                for attention in (splash, einsum)]

    (out, grads), (out_ref, grads_ref) = both(q, k, v)
    np.testing.assert_allclose(out, out_ref, atol=2e-6, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=0)
    # The documents really are apart: without the segment ids the result differs.
    assert not np.allclose(out_ref, einsum_attention(q, k, v, None), atol=1e-3)


@pytest.mark.slow
def test_model_with_splash_attention_under_a_mesh_equals_einsum_attention():
    """The whole model (T 128, head width 16) on a 2 x 2 mesh (batch over fsdp, heads over tensor): the kernel
    runs inside shard_map, and the loss and its gradients equal the model with written-out attention."""
    cfg = ModelConfig(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=97,
                      max_seq_len=128, attention="splash", remat="none")
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 128)), jnp.int32)
    segment_ids = packed_segments(2, 128, (50,))

    def loss(cfg):
        def fn(params):
            logits = forward(cfg, params, tokens, segment_ids_BT=segment_ids)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
        return jax.value_and_grad(fn)

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    sharded = sharding.traced_with_activation_sharding(loss(cfg), mesh)
    params = jax.device_put(params, jax.NamedSharding(mesh, jax.P()))
    traced = jax.jit(sharded).trace(params)
    assert "shard_map" in str(traced.jaxpr) and "pallas_call" in str(traced.jaxpr)
    value, grads = traced.lower().compile()(params)
    value_ref, grads_ref = jax.jit(loss(cfg.replace(attention="einsum")))(params)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, atol=1e-6, rtol=1e-4)


def test_splash_attention_refuses_shapes_it_cannot_take():
    def shapes(B, T, H, K, E):
        return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((B, T, H, E), (B, T, K, E), (B, T, K, E))]

    attend = lambda q, k, v: splash_attention(q, k, v, None, interpret=True)  # noqa: E731
    with pytest.raises(ConfigError, match=r"multiple of 128, got 200: use DataConfig.seq_len=128 or 256"):
        jax.eval_shape(attend, *shapes(1, 200, 4, 2, 8))
    with pytest.raises(ConfigError, match=r"multiple of 128, got 1000: use DataConfig.seq_len=896 or 1024"):
        Experiment(model=ModelConfig(attention="splash"), data=DataConfig(seq_len=1000))
    # Key/value heads split over the tensor axis like the query heads: 1 of them cannot go to 2 devices.
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=2), jax.devices()[:2])
    with sharding.activation_sharding(mesh), pytest.raises(ConfigError, match="n_kv_heads=1"):
        jax.eval_shape(attend, *shapes(2, 128, 4, 1, 8))


# ------------------------------------------------------------------------------ kernels by target device


GPU = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")


def test_auto_attention_and_remat_follow_the_target_device():
    cpu = jax.devices("cpu")[0]
    assert choose_attention("auto", cpu, "bfloat16", 1024) == "blocked"
    assert choose_attention("auto", cpu, "float32", 128) == "xla"
    assert choose_attention("auto", GPU, "bfloat16", 1024) == "cudnn"
    assert choose_attention("auto", GPU, "float16", 100) == "cudnn"
    assert choose_attention("auto", GPU, "float32", 1024) == "xla"  # cuDNN's kernel takes half precision only
    assert choose_attention("einsum", GPU, "bfloat16", 1024) == "einsum"
    assert (choose_remat("auto", cpu), choose_remat("auto", GPU), choose_remat("full", cpu)) == ("dots", "none", "full")


def test_attention_is_chosen_by_the_mesh_devices_not_the_default_backend():
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=61)
    gpu_mesh = jax.sharding.AbstractMesh(
        (1, 1, 1), sharding.MESH_AXES, abstract_device=jax.sharding.AbstractDevice(GPU.device_kind, None, "gpu"),
    )
    assert attention_impl(cfg.replace(dtype="bfloat16"), 1024) == "blocked"  # no mesh: this process's CPU
    with jax.sharding.use_abstract_mesh(gpu_mesh):
        assert attention_impl(cfg.replace(dtype="bfloat16"), 1024) == "cudnn"
        with pytest.raises(ConfigError, match="TPU kernel"):
            attention_impl(cfg.replace(attention="splash"), 1024)


# ------------------------------------------------------------------------------------------ the chunked loss


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


# ---------------------------------------------------------------------------- compiled for a TPU topology


@pytest.mark.slow
def test_train_loss_compiles_for_a_tpu_topology_with_splash_attention_and_chunked_loss():
    """On the devices of a v5e 2x2 slice (described by libtpu, compiled for by the TPU compiler on this CPU),
    auto picks splash attention and a chunked loss; the program holds the Mosaic kernel and no [B, T, V] logits."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    assert choose_attention("auto", devices[0], "bfloat16", 1024) == "splash"
    assert choose_remat("auto", devices[0]) == "none"
    B, T, V = 2, 1024, 384
    cfg = ModelConfig(family="llama", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, vocab_size=V,
                      max_seq_len=T, dtype="bfloat16")
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    params = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, boxed,
                     is_leaf=lambda x: hasattr(x, "names")),
        sharding.logical_shardings(boxed, mesh),
    )
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(mesh))
             for k in ("inputs", "targets", "segment_ids")}

    def loss(params, batch):
        total, count = Transformer(cfg).apply(
            {"params": params}, batch["inputs"], segment_ids_BT=batch["segment_ids"], loss_batch=batch
        )
        return total / count

    step = sharding.traced_with_activation_sharding(jax.value_and_grad(loss), mesh)
    compiled = jax.jit(step).lower(params, batch).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and "splash" in hlo
    # Each device's float32 logits: [B/2, 512, V/2] per chunk, never [B/2, T, V/2].
    assert f"f32[{B // 2},512,{V // 2}]" in hlo and not re.search(rf"f32\[\d+,{T},({V}|{V // 2})\]", hlo)


@pytest.mark.slow
def test_cpu_programs_print_nothing_of_libtpu():
    """libtpu is installed (the test extra); on this machine without TPUs a JAX program that imports jaxlm says
    nothing on stderr, while plain JAX prints libtpu's warnings about missing TPU metadata."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    program = "import jax; {}jax.numpy.ones(2).block_until_ready(); print(jax.default_backend())"

    def run(prefix: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", program.format(prefix)], env=env, capture_output=True,
                              text=True, timeout=120, check=True)

    with_jaxlm, plain = run("import jaxlm.config; "), run("")
    assert (with_jaxlm.stdout, with_jaxlm.stderr) == ("cpu\n", "")
    assert "TPU" in plain.stderr
