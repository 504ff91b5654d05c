"""The Transformer against an independent numpy implementation; causality; parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import PRESETS, ModelConfig
from jaxlm.flops import count_params
from jaxlm.model import (
    attention_impl, blocked_causal_attention, einsum_attention, forward, init_params, remat_policy,
)


def tiny(family: str, **kw) -> ModelConfig:
    base = dict(family=family, n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_seq_len=24)
    if family in ("llama", "qwen3"):
        base.update(n_kv_heads=2, d_ff=48, rope_theta=500.0)
    if family == "qwen3":
        base.update(head_dim=12)  # not d_model / n_heads = 8: the heads' width is independent of d_model
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------------------------------ a numpy forward pass


def np_layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def np_rmsnorm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_rope(x, pos, theta):
    # x [T, H, E]; rotate (i, i + E/2) pairs, one angle per pair.
    E = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, E, 2) / E)
    ang = pos[:, None] * inv[None, :]  # [T, E/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., : E // 2], x[..., E // 2 :]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def np_forward(cfg: ModelConfig, params, tokens):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, T = tokens.shape
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = p["embed"]["embedding"][tokens]
    if cfg.positions == "learned":
        x = x + p["pos_embed"]["embedding"][np.arange(T)][None]

    def norm(x, q):
        if cfg.norm == "layernorm":
            return np_layernorm(x, q["scale"], q.get("bias"), cfg.norm_eps)
        return np_rmsnorm(x, q["scale"], cfg.norm_eps)

    def dense(x, q, spec):
        y = np.einsum(spec, x, q["kernel"])
        return y + q["bias"] if "bias" in q else y

    for layer in range(cfg.n_layers):
        q = jax.tree.map(lambda a: a[layer], p["blocks"])
        h = norm(x, q["attn_norm"])
        out = np.zeros((B, T, H, E))
        for b in range(B):
            qh = dense(h[b], q["attn"]["query"], "td,dhe->the")
            kh = dense(h[b], q["attn"]["key"], "td,dke->tke")
            vh = dense(h[b], q["attn"]["value"], "td,dke->tke")
            if cfg.qk_norm:
                qh = np_rmsnorm(qh, q["attn"]["query_norm"]["scale"], cfg.norm_eps)
                kh = np_rmsnorm(kh, q["attn"]["key_norm"]["scale"], cfg.norm_eps)
            if cfg.positions == "rope":
                qh, kh = np_rope(qh, np.arange(T), cfg.rope_theta), np_rope(kh, np.arange(T), cfg.rope_theta)
            for head in range(H):
                kv = head // (H // K)
                s = qh[:, head] @ kh[:, kv].T / math.sqrt(E)
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                w /= w.sum(-1, keepdims=True)
                out[b, :, head] = w @ vh[:, kv]
        x = x + dense(out, q["attn"]["out"], "bthe,hed->btd")
        h = norm(x, q["mlp_norm"])
        if cfg.mlp == "gelu":
            m = np_gelu_tanh(dense(h, q["mlp"]["fc"], "btd,df->btf"))
        else:
            g = dense(h, q["mlp"]["gate"], "btd,df->btf")
            m = g / (1 + np.exp(-g)) * dense(h, q["mlp"]["up"], "btd,df->btf")
        x = x + dense(m, q["mlp"]["proj"], "btf,fd->btd")
    x = norm(x, p["final_norm"])
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


@pytest.mark.parametrize(
    "cfg",
    [tiny("gpt2"), pytest.param(tiny("gpt2", bias=False), marks=pytest.mark.slow), tiny("llama"),
     pytest.param(tiny("llama", tie_embeddings=True, n_kv_heads=1), marks=pytest.mark.slow), tiny("qwen3"),
     pytest.param(tiny("qwen3", tie_embeddings=False), marks=pytest.mark.slow),
     pytest.param(tiny("gpt2", positions="rope", mlp="swiglu", qk_norm=True), marks=pytest.mark.slow)],
    ids=["gpt2", "gpt2-nobias", "llama-gqa", "llama-mqa-tied", "qwen3-tied", "qwen3-untied", "gpt2-mixed-features"],
)
def test_forward_matches_numpy(cfg):
    @jax.jit
    def randomised():
        # Every parameter randomised (norm scales and biases start at 1 and 0, which would hide mistakes).
        leaves, treedef = jax.tree.flatten(init_params(cfg, jax.random.key(1)))
        keys = jax.random.split(jax.random.key(2), len(leaves))
        return jax.tree.unflatten(treedef, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])

    params = jax.tree.map(np.asarray, randomised())
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 11), 0, cfg.vocab_size))
    got = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(params, jnp.asarray(tokens)))
    want = np_forward(cfg, params, tokens)
    assert got.shape == (2, 11, cfg.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
# Each kernel once, each family once (the families differ in positions and norms, the kernels in the mask).
@pytest.mark.parametrize("family, attention", [("gpt2", "xla"), ("llama", "einsum"), ("qwen3", "blocked")])
def test_causality_through_gradients(family, attention):
    cfg = tiny(family, attention=attention)
    params = init_params(cfg, jax.random.key(0))
    T, t = 12, 5
    tokens = jnp.arange(T, dtype=jnp.int32)[None] % cfg.vocab_size

    def logits_t(delta_TD):
        # Tokens are distinct, so adding delta_TD[i] to token i's embedding row perturbs position i alone.
        p = dict(params)
        table = params["embed"]["embedding"]
        p["embed"] = {"embedding": table.at[tokens[0]].add(delta_TD)}
        # One logit whose output row (for tied embeddings) is not among the perturbed rows.
        return forward(cfg, p, tokens)[0, t, cfg.vocab_size - 1]

    grad_TD = jax.jit(jax.grad(logits_t))(jnp.zeros((T, cfg.d_model)))
    assert np.all(np.asarray(grad_TD[t + 1 :]) == 0.0), "a future position influenced the past"
    assert np.all(np.abs(np.asarray(grad_TD[: t + 1])).sum(-1) > 0), "a past position had no influence"


def np_attention(q, k, v, segments):
    """Causal attention over [B, T, H, E] (K key/value heads shared by H // K query heads), kept in segments."""
    B, T, H, E = q.shape
    K = k.shape[2]
    out = np.zeros((B, T, H, E))
    for b in range(B):
        keep = np.tril(np.ones((T, T), bool)) & (segments[b][:, None] == segments[b][None, :])
        for head in range(H):
            s = q[b, :, head] @ k[b, :, head // (H // K)].T / math.sqrt(E)
            w = np.exp(np.where(keep, s, -np.inf) - s.max(-1, keepdims=True))
            out[b, :, head] = (w / w.sum(-1, keepdims=True)) @ v[b, :, head // (H // K)]
    return out


@pytest.mark.parametrize("block", [pytest.param(4, marks=pytest.mark.slow), 64])
def test_blocked_attention_matches_numpy_and_einsum_gradients(block):
    # T = 11 is no multiple of the blocks; two key/value heads serve four query heads; two documents per row.
    B, T, H, K, E = 2, 11, 4, 2, 8
    q, k, v, cotangent = (jax.random.normal(key, (B, T, n, E)) for key, n in
                          zip(jax.random.split(jax.random.key(0), 4), (H, K, K, H)))
    segments = np.array([[1] * 6 + [2] * 5, [1] * 3 + [2] * 8])
    mask = jnp.asarray(segments[:, None, :, None] == segments[:, None, None, :])
    got = jax.jit(blocked_causal_attention, static_argnames="block")(q, k, v, mask, block=block)
    np.testing.assert_allclose(got, np_attention(*map(np.asarray, (q, k, v)), segments), atol=1e-5, rtol=0)

    def grads(attention):
        return jax.jit(jax.grad(lambda *qkv: jnp.sum(attention(*qkv) * cotangent), argnums=(0, 1, 2)))(q, k, v)

    blocked = grads(lambda q, k, v: blocked_causal_attention(q, k, v, mask, block=block))
    for g_blocked, g_einsum in zip(blocked, grads(lambda q, k, v: einsum_attention(q, k, v, mask))):
        np.testing.assert_allclose(g_blocked, g_einsum, atol=1e-5, rtol=0)


def test_auto_settings_resolve_for_the_backend():
    cfg = tiny("gpt2")
    assert (cfg.attention, cfg.remat) == ("auto", "auto")
    assert jax.default_backend() == "cpu"
    assert remat_policy(cfg) == "dots"
    # Blocks skip work from two blocks of queries on; a single block runs faster in XLA's form.
    assert (attention_impl(cfg, 129), attention_impl(cfg, 128)) == ("blocked", "xla")
    explicit = tiny("gpt2", attention="einsum", remat="none")
    assert (attention_impl(explicit, 1024), remat_policy(explicit)) == ("einsum", "none")


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    [tiny("gpt2"), tiny("gpt2", bias=False, tie_embeddings=False), tiny("llama"), tiny("llama", bias=True),
     tiny("llama", qkv_bias=True, tie_embeddings=True), tiny("gpt2", scan_layers=False), tiny("qwen3"),
     tiny("qwen3", bias=True, tie_embeddings=False), tiny("llama", norm="layernorm", bias=True, qkv_bias=False)],
)
def test_count_params_matches_initialised_model(cfg):
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # the initialiser's own shapes, unrun
    assert count_params(cfg) == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_presets_have_published_counts():
    published = {"gpt2-124m": 124_439_808, "gpt2-355m": 354_823_168, "llama2-7b": 6_738_415_616,
                 "llama3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920}  # tests/test_hf.py counts qwen3-0.6b too
    for name, n in published.items():
        assert count_params(PRESETS[name]) == n, name
    for name in ("gpt2-774m", "gpt2-1.5b", "llama3-8b"):
        shapes = jax.eval_shape(lambda c=PRESETS[name]: init_params(c, jax.random.key(0)))
        assert count_params(PRESETS[name]) == sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


@pytest.mark.slow
def test_scan_and_unrolled_layers_compute_the_same_function():
    scanned = tiny("llama")
    unrolled = tiny("llama", scan_layers=False)
    params = init_params(scanned, jax.random.key(0))
    per_layer = {f"block_{i}": jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(scanned.n_layers)}
    flat = {k: v for k, v in params.items() if k != "blocks"} | per_layer
    tokens = jnp.arange(10, dtype=jnp.int32)[None]
    np.testing.assert_allclose(forward(scanned, params, tokens), forward(unrolled, flat, tokens), atol=1e-6)
