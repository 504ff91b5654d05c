"""The Transformer: one configurable decoder, built from the architecture features of a `ModelConfig`.

    tokens_BT -> embed (+ learned positions) -> n_layers x Block -> final norm -> logits_BTV
    Block:  x + Attention(norm(x)),  then  x + MLP(norm(x))        (pre-norm, residual dropout)

For generation the same modules also fill and read a `KVCache`, the keys and values of every earlier token, so
that each new token costs one position's work instead of a pass over the whole sequence.

The code reads the features; a family (`ModelConfig.family`) is only a preset of them:

| feature | what it chooses | gpt2 | llama | qwen3 |
|---|---|---|---|---|
| positions | learned embedding added to the tokens, or RoPE on q and k | learned | rope | rope |
| norm | LayerNorm (shift when `bias`) or RMSNorm | layernorm | rmsnorm | rmsnorm |
| mlp | tanh GELU (2 matrices) or SwiGLU (3 matrices) | gelu, 4x | swiglu | swiglu |
| qk_norm | RMSNorm over each head's queries and keys, before RoPE | no | no | yes |
| bias, qkv_bias | biases on linear layers (and LayerNorm); on q, k, v | yes | no | no |
| tie_embeddings | output matrix = token embedding | yes | no | yes (to 4B) |
| n_kv_heads, head_dim | grouped-query attention; head width apart from d_model | MHA | MHA or GQA | GQA, 128 wide |

Shapes carry their axes in their names: B batch, T time (query), S time (key), D model width, H query heads,
K key/value heads, G = H // K, E head dim, F MLP width, V vocab, L layers.
Every parameter is declared with logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`layers`) that `jaxlm.sharding` maps onto the device mesh. Parameters are float32; `ModelConfig.dtype` is the
compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxlm.config import SPLASH_MIN_BLOCK, ModelConfig, check_splash_length
from jaxlm.errors import ConfigError

Array = jax.Array


def _param_init(std: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names, rules=())


def _zeros(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names, rules=())


def _ones(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names, rules=())


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(
            epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=jnp.float32, name=name,
            scale_init=_ones(("embed",)), bias_init=_zeros(("embed",)),
        )
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name, scale_init=_ones(("embed",)))


def head_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """RMSNorm over the last (head_dim) axis, one scale shared by all heads: `qk_norm`'s norm of q and k."""
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name, scale_init=_ones(("head_dim",)))


def rope_frequencies(cfg: ModelConfig) -> Array:
    """Inverse frequencies of the rotary embedding [E/2], with Llama 3's long-context scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling_factor <= 0:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by the factor, short ones kept, and the band between interpolated.
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen, high_wavelen = cfg.rope_original_max_len / low, cfg.rope_original_max_len / high
    smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, interpolated, scaled)


def apply_rope(x_BTNE: Array, positions_BT: Array, inv_freq: Array) -> Array:
    """Rotate pairs (i, i + E/2) of each head by position-dependent angles (the layout Hugging Face Llama uses)."""
    angles_BTE2 = positions_BT[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BTE2)[:, :, None, :], jnp.cos(angles_BTE2)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTNE.dtype)


def attention_mask(segment_ids_BT: Array | None, T: int, S: int) -> Array | None:
    """Boolean [B, 1, T, S] mask that keeps attention inside each document, or None when rows are one stream."""
    if segment_ids_BT is None:
        return None
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return same[:, None, :, :]


def einsum_attention(q_BTHE: Array, k_BSKE: Array, v_BSKE: Array, mask_B1TS: Array | None) -> Array:
    """Causal softmax attention written out; K key/value heads are shared by groups of G = H // K query heads."""
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
    scores_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE).astype(jnp.float32) / jnp.sqrt(E)
    causal_TS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
    keep = causal_TS[None, None, None]
    if mask_B1TS is not None:
        keep = keep & mask_B1TS[:, :, None]
    scores_BKGTS = jnp.where(keep, scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKE.dtype)
    out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE)
    return out_BTKGE.reshape(B, T, H, E)


ATTENTION_BLOCK = 128  # queries per block of `blocked_causal_attention`


def blocked_causal_attention(
    q_BTHE: Array, k_BSKE: Array, v_BSKE: Array, mask_B1TS: Array | None, block: int = ATTENTION_BLOCK
) -> Array:
    """Causal self-attention (S = T) one block of queries at a time: each block reads the keys up to its last
    query only, so the masked upper triangle is mostly never computed (a quarter of the work at T = 2 blocks).
    The softmax is normalised after the value product, on [t, E] instead of [t, S]: the backward pass then
    needs no reduction over the scores. Same result as `einsum_attention`; on CPU it halves the train step at
    T = 1024 against `jax.nn.dot_product_attention`'s XLA form, and matches it at T <= 256."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    q_BTKGE = (q_BTHE * E**-0.5).reshape(B, T, K, H // K, E)
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)  # this block's queries see keys [0, end)
        scores_BKGtS = jnp.einsum("btkge,bske->bkgts", q_BTKGE[:, start:end], k_BSKE[:, :end]).astype(jnp.float32)
        keep = (start + jnp.arange(end - start))[:, None] >= jnp.arange(end)[None, :]
        if mask_B1TS is not None:
            keep = keep & mask_B1TS[:, :, None, start:end, :end]
        scores_BKGtS = jnp.where(keep, scores_BKGtS, jnp.finfo(jnp.float32).min)
        top_BKGt1 = lax.stop_gradient(jnp.max(scores_BKGtS, axis=-1, keepdims=True))
        weights_BKGtS = jnp.exp(scores_BKGtS - top_BKGt1)
        total_BtKG1 = jnp.sum(weights_BKGtS, axis=-1).transpose(0, 3, 1, 2)[..., None]
        out_BtKGE = jnp.einsum("bkgts,bske->btkge", weights_BKGtS.astype(v_BSKE.dtype), v_BSKE[:, :end])
        outs.append((out_BtKGE / total_BtKG1).astype(q_BTHE.dtype))
    return jnp.concatenate(outs, axis=1).reshape(B, T, H, E)


SPLASH_BLOCKS = (512, 256, SPLASH_MIN_BLOCK)  # block sizes the splash kernel is given, the largest that divides T


def splash_block(seq_len: int) -> int:
    """The splash kernel's block of queries and keys for `seq_len`; ConfigError where none fits."""
    check_splash_length(seq_len)
    return next(block for block in SPLASH_BLOCKS if seq_len % block == 0)


def splash_attention(
    q_BTHE: Array, k_BTKE: Array, v_BTKE: Array, segment_ids_BT: Array | None, interpret: bool = False
) -> Array:
    """Causal attention through jax's Pallas splash-attention kernel (TPU; `interpret` runs it anywhere, slowly).

    Grouped-query heads go to the kernel as they are (it shares each key/value head among H // K query heads);
    packed documents go as the kernel's segment ids, so no [T, S] mask is ever built. Under a mesh (see
    `jaxlm.sharding.activation_sharding`) the kernel runs in `shard_map` over the batch and head axes: each device
    computes its own rows and heads, no attention collective is needed.
    """
    # Imported here: the Pallas TPU modules cost half a second to import, and only this path needs them.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash_kernel

    B, T, H, E = q_BTHE.shape
    K = k_BTKE.shape[2]
    block = splash_block(T)
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = k_spec = seg_spec = None
    head_shards = 1
    if not mesh.empty:
        q_spec = nn.logical_to_mesh_axes(("batch", None, "heads", None))
        k_spec = nn.logical_to_mesh_axes(("batch", None, "kv_heads", None))
        seg_spec = P(q_spec[0], None)
        head_shards = math.prod(mesh.shape[a] for a in _axes(q_spec[2]))
        kv_shards = math.prod(mesh.shape[a] for a in _axes(k_spec[2]))
        if H % head_shards or K % kv_shards or head_shards != kv_shards:
            raise ConfigError(
                f"attention='splash' splits query and key/value heads alike over the tensor axis ({head_shards}): "
                f"n_heads={H} and n_kv_heads={K} must both be multiples of it; use a MeshConfig.tensor that "
                "divides both, or ModelConfig.attention='xla'"
            )
    sizes = splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    local_heads = H // head_shards
    causal = splash_kernel.MultiHeadMask([splash_kernel.CausalMask((T, T)) for _ in range(local_heads)])
    kernel = splash_kernel.make_splash_mha(
        causal, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )

    def attend(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT):
        # The kernel takes one row [heads, T, E] with queries already scaled (it applies no 1/sqrt(E)).
        q_BHTE = (q_BTHE * E**-0.5).astype(q_BTHE.dtype).transpose(0, 2, 1, 3)
        k_BKTE, v_BKTE = k_BTKE.transpose(0, 2, 1, 3), v_BTKE.transpose(0, 2, 1, 3)
        if segment_ids_BT is None:
            out_BHTE = jax.vmap(lambda q, k, v: kernel(q, k, v))(q_BHTE, k_BKTE, v_BKTE)
        else:
            segments = jax.vmap(lambda ids: splash_kernel.SegmentIds(q=ids, kv=ids))(segment_ids_BT.astype(jnp.int32))
            out_BHTE = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q_BHTE, k_BKTE, v_BKTE, segments)
        return out_BHTE.transpose(0, 2, 1, 3).astype(q_BTHE.dtype)

    if mesh.empty:
        return attend(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT)
    if segment_ids_BT is None:
        sharded = jax.shard_map(
            lambda q, k, v: attend(q, k, v, None), mesh=mesh,
            in_specs=(q_spec, k_spec, k_spec), out_specs=q_spec, check_vma=False,
        )
        return sharded(q_BTHE, k_BTKE, v_BTKE)
    sharded = jax.shard_map(
        attend, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec), out_specs=q_spec, check_vma=False
    )
    return sharded(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT)


def _axes(spec_entry: Any) -> tuple[str, ...]:
    """The mesh axes of one entry of a PartitionSpec (None, a name, or a tuple of names)."""
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def cached_attention(q_BTHE: Array, k_BKSE: Array, v_BKSE: Array, keep_B1TS: Array) -> Array:
    """Softmax attention of T new queries over the S slots of a KV cache, where `keep` allows.

    The cache is laid out [B, K, S, E], so that both products read it in place, without a transpose.
    """
    B, T, H, E = q_BTHE.shape
    K = k_BKSE.shape[1]
    q_BKGTE = q_BTHE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
    scores_BKGTS = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE).astype(jnp.float32) / jnp.sqrt(E)
    scores_BKGTS = jnp.where(keep_B1TS[:, :, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSE.dtype)
    out_BKGTE = jnp.einsum("bkgts,bkse->bkgte", probs_BKGTS, v_BKSE)
    return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots per row, filled left to right as tokens are fed.

    Each layer has its own k and v arrays [B, K, S, E], so that inside a decode loop each is updated in place.
    A token sees the written slots up to its own that carry its segment id: left padding carries segment 0 and
    real tokens segment 1, so padding stays invisible.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    segment_ids_BS: Array  # int32; 0 for padding and for slots not yet written
    index: Array  # int32 scalar: the next slot to write
    # Known when tracing: the first call into a fresh cache (the prefill) attends among its own tokens only,
    # with the ordinary attention kernel.
    empty: bool = flax.struct.field(pytree_node=False, default=False)


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> KVCache:
    """An empty cache for `batch` rows of up to `slots` tokens each, in the compute dtype."""
    zeros = [jnp.zeros((batch, cfg.n_kv_heads, slots, cfg.head_dim), cfg.dtype) for _ in range(2 * cfg.n_layers)]
    return KVCache(
        k=tuple(zeros[: cfg.n_layers]),
        v=tuple(zeros[cfg.n_layers :]),
        segment_ids_BS=jnp.zeros((batch, slots), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        empty=True,
    )


class Attention(nn.Module):
    """Causal self-attention, within each document where `segment_ids_BT` says which tokens belong together.
    With `kv_cache` (this layer's cached keys and values [B, K, S, E]) the new keys and values are written at
    `cache_index` first, and the queries attend over the cache where `cache_keep_B1TS` allows (None: among the
    new tokens only); returns (output, updated keys and values)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: Array,
        positions_BT: Array,
        segment_ids_BT: Array | None,
        cache_index: Array | None = None,
        cache_keep_B1TS: Array | None = None,
        kv_cache: tuple[Array, Array] | None = None,
    ):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2's scaling of residual projections

        def proj(name: str, heads: int, heads_axis: str) -> nn.Module:
            return nn.DenseGeneral(
                features=(heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=dtype, name=name,
                kernel_init=_param_init(cfg.init_std, ("embed", heads_axis, "head_dim")),
                bias_init=_zeros((heads_axis, "head_dim")),
            )

        # Projections see the tokens as one [B*T, ...] matrix: one plain matmul each, and XLA CPU then needs no
        # transposed copy of the activations for the weight gradients.
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        q_BTHE = proj("query", cfg.n_heads, "heads")(x_ND).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k_BTKE = proj("key", cfg.n_kv_heads, "kv_heads")(x_ND).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v_BTKE = proj("value", cfg.n_kv_heads, "kv_heads")(x_ND).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            # Each head's queries and keys scaled to unit RMS: the attention logits cannot grow with the weights.
            q_BTHE = head_norm(cfg, "query_norm")(q_BTHE).astype(dtype)
            k_BTKE = head_norm(cfg, "key_norm")(k_BTKE).astype(dtype)
        if cfg.positions == "rope":
            inv_freq = rope_frequencies(cfg)
            q_BTHE, k_BTKE = apply_rope(q_BTHE, positions_BT, inv_freq), apply_rope(k_BTKE, positions_BT, inv_freq)

        if kv_cache is not None:
            kv_cache = tuple(
                lax.dynamic_update_slice_in_dim(cached, new.transpose(0, 2, 1, 3).astype(cached.dtype), cache_index, 2)
                for cached, new in zip(kv_cache, (k_BTKE, v_BTKE))
            )
        impl = attention_impl(cfg, T)
        if impl == "splash" and T % SPLASH_BLOCKS[-1] and (kv_cache is not None or self.is_initializing()):
            # A prompt of any length, or the parameters' shapes (which no kernel changes): the kernel takes
            # multiples of its block only.
            impl = "xla"
        if kv_cache is not None and cache_keep_B1TS is not None:
            out_BTHE = cached_attention(q_BTHE, *kv_cache, cache_keep_B1TS)
        elif impl == "splash":
            out_BTHE = splash_attention(
                q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, interpret=target_device().platform != "tpu"
            )
        elif impl == "einsum":
            out_BTHE = einsum_attention(q_BTHE, k_BTKE, v_BTKE, attention_mask(segment_ids_BT, T, T))
        elif impl == "blocked":
            out_BTHE = blocked_causal_attention(q_BTHE, k_BTKE, v_BTKE, attention_mask(segment_ids_BT, T, T))
        else:
            # jax.nn.dot_product_attention takes no segment ids, and its sequence lengths describe one document
            # followed by padding, not packed rows: documents pass as a mask (cuDNN adds it as a bias).
            out_BTHE = jax.nn.dot_product_attention(
                q_BTHE, k_BTKE, v_BTKE, mask=attention_mask(segment_ids_BT, T, T), is_causal=True,
                implementation=impl,
            )
        out_BTD = nn.DenseGeneral(
            features=cfg.d_model, axis=(-2, -1), use_bias=cfg.bias, dtype=dtype, name="out",
            kernel_init=_param_init(out_std, ("heads", "head_dim", "embed")), bias_init=_zeros(("embed",)),
        )(out_BTHE.reshape(B * T, cfg.n_heads, cfg.head_dim)).reshape(B, T, D)
        out_BTD = checkpoint_name(out_BTD, "attn_out")
        return out_BTD if kv_cache is None else (out_BTD, kv_cache)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)

        def dense(name: str, features: int, axes: tuple[str, str], std: float) -> nn.Module:
            return nn.Dense(
                features, use_bias=cfg.bias, dtype=dtype, name=name,
                kernel_init=_param_init(std, axes), bias_init=_zeros(axes[1:]),
            )

        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)  # N = B*T tokens as one matrix, as in Attention
        if cfg.mlp == "gelu":
            h_NF = nn.gelu(dense("fc", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_ND), approximate=True)
        else:  # swiglu
            gate_NF = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_ND)
            up_NF = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_ND)
            h_NF = nn.silu(gate_NF) * up_NF
        out_BTD = dense("proj", cfg.d_model, ("mlp", "embed"), out_std)(h_NF).reshape(B, T, D)
        return checkpoint_name(out_BTD, "mlp_out")


class Block(nn.Module):
    """Pre-norm residual block. Its call signature fits `nn.scan`: the residual stream is the carry, and this
    layer's KV cache (if any) goes in and comes out updated."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x_BTD: Array,
        positions_BT: Array,
        segment_ids_BT: Array | None,
        cache_index: Array | None = None,
        cache_keep_B1TS: Array | None = None,
        kv_cache: tuple[Array, Array] | None = None,
    ):
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h_BTD = make_norm(cfg, "attn_norm")(x_BTD).astype(cfg.dtype)
        attn_BTD = Attention(cfg, name="attn")(h_BTD, positions_BT, segment_ids_BT, cache_index, cache_keep_B1TS, kv_cache)
        if kv_cache is not None:
            attn_BTD, kv_cache = attn_BTD
        x_BTD = x_BTD + dropout(attn_BTD)
        h_BTD = make_norm(cfg, "mlp_norm")(x_BTD).astype(cfg.dtype)
        x_BTD = x_BTD + dropout(MLP(cfg, name="mlp")(h_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
        return x_BTD, kv_cache


def target_device() -> Any:
    """A device of those the step is being compiled for: the mesh's (set by `jaxlm.sharding.activation_sharding`,
    which may be devices of an ahead-of-time TPU topology), else this process's first device. It has `.platform`
    ("cpu", "gpu", "tpu") and `.device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device
    return jax.devices()[0]


def choose_attention(attention: str, device: Any, dtype: str, seq_len: int) -> str:
    """The attention kernel for `attention` ("auto" or a kernel's name) on `device` at `seq_len`.

    auto: on TPU the Pallas splash kernel (XLA's form where the sequence is not a multiple of its 128 block); on
    GPU in bfloat16 or float16 cuDNN's fused kernel (XLA's form in float32, which cuDNN does not take); on CPU
    `blocked` where it skips work (more than one block of queries), else XLA's form, faster on a single block.
    """
    if attention != "auto":
        return attention
    if device.platform == "tpu":
        return "splash" if seq_len % SPLASH_BLOCKS[-1] == 0 else "xla"
    if device.platform == "gpu" and dtype in ("bfloat16", "float16"):
        return "cudnn"
    if device.platform == "cpu" and seq_len > ATTENTION_BLOCK:
        return "blocked"
    return "xla"


def choose_remat(remat: str, device: Any) -> str:
    """The remat policy for `remat` ("auto" or a policy's name) on `device`: auto keeps matmul outputs on CPU
    (recomputing elementwise work beats storing it there) and recomputes nothing on accelerators."""
    if remat != "auto":
        return remat
    return "dots" if device.platform == "cpu" else "none"


def attention_impl(cfg: ModelConfig, seq_len: int) -> str:
    """The attention kernel of `cfg` for the target devices (`target_device`) at `seq_len`."""
    impl = choose_attention(cfg.attention, device := target_device(), cfg.dtype, seq_len)
    if impl == "splash" and device.platform == "gpu":
        raise ConfigError(
            "attention='splash' is a TPU kernel: on GPU use ModelConfig.attention='cudnn' (bfloat16/float16) "
            "or 'auto'"
        )
    return impl


def remat_policy(cfg: ModelConfig) -> str:
    """The remat policy of `cfg` for the target devices (`target_device`)."""
    return choose_remat(cfg.remat, target_device())


def compiler_options(mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """XLA options for compiling model code for `mesh`'s devices (default: this process's; pass as
    `jax.jit(..., compiler_options=...)`). On CPU, XLA's own matmul kernels instead of its YNNPACK fusions: f32
    matmuls of the model's shapes run 10-15% faster, a 6-layer d384 train step 6% faster (docs/results.md)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if device.platform == "cpu" else {}


REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_mlp": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (float32).

    With `cache`, the tokens fill the cache's next T slots and the call returns (logits, updated cache);
    positions then default to the slot numbers, and segment ids to 1 (real tokens).
    With `loss_batch` (its `targets`, and `weights` or `segment_ids` if any), the call returns
    `token_loss_sums` of the logits instead of them, computed `loss_chunk_size` positions at a time.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT: Array,
        *,
        positions_BT: Array | None = None,
        segment_ids_BT: Array | None = None,
        deterministic: bool = True,
        cache: KVCache | None = None,
        loss_batch: dict[str, Array] | None = None,
    ):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            first = 0 if cache is None else cache.index
            positions_BT = jnp.broadcast_to(first + jnp.arange(T, dtype=jnp.int32), (B, T))
        cache_index = cache_keep_B1TS = kv_caches = slot_segments_BS = None
        if cache is not None:
            if segment_ids_BT is None:
                segment_ids_BT = jnp.ones((B, T), jnp.int32)
            cache_index, kv_caches = cache.index, tuple(zip(cache.k, cache.v))
            slot_segments_BS = lax.dynamic_update_slice_in_dim(
                cache.segment_ids_BS, segment_ids_BT.astype(jnp.int32), cache.index, axis=1
            )
            if not cache.empty:
                # Slot s holds the token of position s: a new token sees the slots up to its own, in its segment.
                query_slot_T1 = cache.index + jnp.arange(T)[:, None]
                causal_TS = jnp.arange(slot_segments_BS.shape[1])[None, :] <= query_slot_T1
                same_segment_BTS = segment_ids_BT[:, :, None] == slot_segments_BS[:, None, :]
                cache_keep_B1TS = (causal_TS & same_segment_BTS)[:, None]

        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, name="embed", embedding_init=_param_init(cfg.init_std, ("vocab", "embed"))
        )
        x_BTD = embed(tokens_BT)
        if cfg.positions == "learned":
            x_BTD = x_BTD + nn.Embed(
                cfg.max_seq_len, cfg.d_model, name="pos_embed",
                embedding_init=_param_init(cfg.init_std, ("seq", "embed")),
            )(positions_BT)
        x_BTD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BTD).astype(cfg.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))

        block = Block
        if (policy := remat_policy(cfg)) != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[policy], prevent_cse=not cfg.scan_layers)
        cache_args = (cache_index, cache_keep_B1TS)
        if cfg.scan_layers:
            # One compiled block, iterated: compile time stays flat in depth; params gain a leading `layers` axis.
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            # A scan reads and writes the caches stacked on a layer axis: correct, but it copies them on every
            # call. Generation runs the layers unrolled instead (jaxlm.generate).
            stacked = None if cache is None else tuple(jnp.stack(layers) for layers in zip(*kv_caches))
            x_BTD, stacked = stack(cfg, deterministic, name="blocks")(
                x_BTD, positions_BT, segment_ids_BT, *cache_args, stacked
            )
            kv_caches = None if cache is None else tuple(zip(*stacked))
        else:
            new_caches = []
            for i in range(cfg.n_layers):
                kv_cache = None if cache is None else kv_caches[i]
                x_BTD, kv_cache = block(cfg, deterministic, name=f"block_{i}")(
                    x_BTD, positions_BT, segment_ids_BT, *cache_args, kv_cache
                )
                new_caches.append(kv_cache)
            kv_caches = new_caches

        x_BTD = make_norm(cfg, "final_norm")(x_BTD).astype(cfg.dtype)
        lm_head = None if cfg.tie_embeddings else nn.Dense(
            cfg.vocab_size, use_bias=False, dtype=cfg.dtype, name="lm_head",
            kernel_init=_param_init(cfg.init_std, ("embed", "vocab")),
        )
        if loss_batch is not None and (chunk := loss_chunk_size(cfg, T)) and not self.is_initializing():
            # The output matrix as an array, so that the chunks can be mapped over outside flax.
            w_DV = embed.embedding.T if lm_head is None else nn.unbox(lm_head.variables["params"]["kernel"])
            return chunked_token_loss_sums(x_BTD, w_DV.astype(cfg.dtype), loss_batch, chunk)
        x_ND = x_BTD.reshape(B * T, cfg.d_model)
        logits_NV = embed.attend(x_ND) if lm_head is None else lm_head(x_ND)
        logits_BTV = logits_NV.reshape(B, T, -1)  # (-1: V, or D where jaxlm.finetune skips the projection)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "seq", "vocab"))
        logits_BTV = logits_BTV.astype(jnp.float32)
        if loss_batch is not None:
            return token_loss_sums(logits_BTV, loss_batch)
        if cache is None:
            return logits_BTV
        k, v = zip(*kv_caches)
        return logits_BTV, KVCache(k=tuple(k), v=tuple(v), segment_ids_BS=slot_segments_BS, index=cache.index + T)


def init_params(cfg: ModelConfig, rng: Array, seq_len: int = 8) -> Any:
    """Initialised parameters as a plain pytree (logical-axis boxes removed)."""
    tokens = jnp.zeros((1, min(seq_len, cfg.max_seq_len)), jnp.int32)
    return nn.unbox(Transformer(cfg).init(rng, tokens)["params"])


def forward(
    cfg: ModelConfig,
    params: Any,
    tokens_BT: Array,
    *,
    positions_BT: Array | None = None,
    segment_ids_BT: Array | None = None,
    cache: KVCache | None = None,
):
    """Logits [B, T, V] in evaluation mode (no dropout): the entry point for tools, tests and evaluation.

    With `cache`, returns (logits, updated cache): see `Transformer`.
    """
    return Transformer(cfg).apply(
        {"params": params}, tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache
    )


# --------------------------------------------------------------------------------------------------- the loss


def target_weights(batch: dict[str, Array]) -> Array:
    """Which targets count, as 0/1 per position: the batch's `weights` (e.g. only an answer's tokens), else the
    non-padding positions (segment id > 0), else all."""
    if "weights" in batch:
        return batch["weights"].astype(jnp.float32)
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).astype(jnp.float32)
    return jnp.ones(batch["targets"].shape, jnp.float32)


def token_loss_sums(logits_BTV: Array, batch: dict[str, Array]) -> tuple[Array, Array]:
    """The sum of next-token cross-entropies (nats) over the counted targets, and their count.

    Every loss over tokens in jaxlm is this one: pretraining, evaluation, instruction tuning. Sums rather than
    means, so that microbatches, devices and evaluation batches add up exactly before one division.
    """
    weights_BT = target_weights(batch)
    return jnp.sum(_nll(logits_BTV, batch["targets"]) * weights_BT), jnp.sum(weights_BT)


def _nll(logits_BTV: Array, targets_BT: Array) -> Array:
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT


LOSS_CHUNK_AUTO = 512  # positions per chunk that loss_chunk="auto" takes on accelerators


def loss_chunk_size(cfg: ModelConfig, seq_len: int) -> int:
    """Positions per chunk of the loss for `cfg.loss_chunk` on the target devices (0: the whole sequence at once).
    auto: LOSS_CHUNK_AUTO on accelerators, where the logits' memory counts; on CPU the plain loss, which skips
    recomputing the output projection in the backward pass."""
    if cfg.loss_chunk != "auto":
        chunk = int(cfg.loss_chunk)
    else:
        chunk = 0 if target_device().platform == "cpu" else LOSS_CHUNK_AUTO
    return chunk if 0 < chunk < seq_len else 0


def chunked_token_loss_sums(
    x_BTD: Array, w_DV: Array, batch: dict[str, Array], chunk: int
) -> tuple[Array, Array]:
    """`token_loss_sums` of the logits x_BTD @ w_DV, computed `chunk` positions at a time: each chunk's float32
    logits [B, chunk, V] exist only while that chunk is summed, and are computed again (not stored) for the
    backward pass. A last partial chunk is padded with positions of weight 0."""
    B, T, D = x_BTD.shape
    weights_BT = target_weights(batch)
    targets_BT = batch["targets"]
    n = -(-T // chunk)
    if (pad := n * chunk - T):
        x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
        weights_BT, targets_BT = (jnp.pad(a, ((0, 0), (0, pad))) for a in (weights_BT, targets_BT))

    def chunks(a_BT_: Array) -> Array:  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(a_BT_.reshape(B, n, chunk, *a_BT_.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sum(x_BcD: Array, targets_Bc: Array, weights_Bc: Array) -> Array:
        logits_BcV = jnp.einsum("bcd,dv->bcv", x_BcD, w_DV)
        logits_BcV = nn.with_logical_constraint(logits_BcV, ("batch", "seq", "vocab"))
        return jnp.sum(_nll(logits_BcV, targets_Bc) * weights_Bc)

    sums_n = lax.map(lambda args: chunk_sum(*args), (chunks(x_BTD), chunks(targets_BT), chunks(weights_BT)))
    return jnp.sum(sums_n), jnp.sum(weights_BT)


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """A loss per token in nats as bits per byte of text: comparable across tokenizers."""
    return loss_nats_per_token / math.log(2) / bytes_per_token
