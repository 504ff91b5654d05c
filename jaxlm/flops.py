"""Parameter and FLOP counts, device peaks, and model FLOPs utilisation (MFU).

FLOPs count a multiply-accumulate as 2. Training FLOPs per token follow the usual convention: 6 per matmul parameter
(forward 2, backward 4) plus attention's score and value products, 12 * n_layers * d_attn * seq_len (counted for the
full, not the causal, square as PaLM's appendix B does).
"""

from __future__ import annotations

import dataclasses
import functools
import time

from jaxlm.config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    # LayerNorm has a scale and (with bias) a shift; RMSNorm a scale only.
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def mlp_matrices(cfg: ModelConfig) -> int:
    """Weight matrices of the MLP: in and out for GELU; gate, up and out for SwiGLU."""
    return 2 if cfg.mlp == "gelu" else 3


def _attention_matrix_params(cfg: ModelConfig) -> int:
    # Queries and the output projection are n_heads * head_dim wide, keys and values n_kv_heads * head_dim.
    d, dh, h, k = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    return d * h * dh + 2 * d * k * dh + h * dh * d


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one Transformer block."""
    d, dh, h, k, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    attn = _attention_matrix_params(cfg)
    if cfg.qkv_bias:
        attn += (h + 2 * k) * dh
    if cfg.bias:
        attn += d
    if cfg.qk_norm:
        attn += 2 * dh  # one RMSNorm scale for queries, one for keys, shared by the heads
    mlp = mlp_matrices(cfg) * d * f
    if cfg.bias:
        mlp += (mlp_matrices(cfg) - 1) * f + d
    return attn + mlp + 2 * _norm_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """Token (and learned position) embeddings, plus the output matrix when it is not tied."""
    n = cfg.vocab_size * cfg.d_model
    if cfg.positions == "learned":
        n += cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        n += cfg.d_model * cfg.vocab_size
    return n


def count_params(cfg: ModelConfig) -> int:
    """Total parameters, in closed form (equal to the initialised model's count)."""
    return embedding_params(cfg) + cfg.n_layers * layer_params(cfg) + _norm_params(cfg)


def count_nonembedding_params(cfg: ModelConfig) -> int:
    """Parameters outside the embeddings and the output matrix (Kaplan et al.'s N)."""
    return cfg.n_layers * layer_params(cfg) + _norm_params(cfg)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks' weights and the output projection."""
    mlp = mlp_matrices(cfg) * cfg.d_model * cfg.d_ff
    return cfg.n_layers * (_attention_matrix_params(cfg) + mlp) + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params plus attention scores and values (forward and backward)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures: dense bf16 peak FLOP/s, HBM bytes and HBM bytes/s."""

    device_kind: str  # the longest prefix of `jax.Device.device_kind` that names it
    bf16_flops: float
    hbm_bytes: float
    hbm_bytes_per_s: float


GiB, GB = 2**30, 1e9
# TPUs: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), per chip:
# v4 275 TFLOP/s, 32 GiB, 1,200 GB/s; v5e 197 TFLOP/s, 16 GiB, 819 GB/s; v5p 459 TFLOP/s, 95 GiB, 2,765 GB/s;
# v6e 918 TFLOP/s, 32 GiB, 1,638 GB/s. GPUs: NVIDIA's datasheets, dense (not 2:4-sparse) bf16 tensor-core
# figures: H100 SXM 989 and PCIe 756 TFLOP/s (80 GB; 3.35 and 2.0 TB/s), H100 NVL 835 (94 GB, 3.9 TB/s), H200
# 989 (141 GB, 4.8 TB/s), A100 312 (40 GB at 1,555 GB/s, 80 GB at 2,039 GB/s SXM and 1,935 GB/s PCIe), L4 121
# (24 GB, 300 GB/s), B200 2,250 (HGX B200: 4.5 PFLOP/s sparse; 180 GB, 7.7 TB/s).
CHIPS: tuple[Chip, ...] = (
    Chip("TPU v4", 275e12, 32 * GiB, 1200 * GB),
    Chip("TPU v5 lite", 197e12, 16 * GiB, 819 * GB),
    Chip("TPU v5e", 197e12, 16 * GiB, 819 * GB),
    Chip("TPU v5", 459e12, 95 * GiB, 2765 * GB),
    Chip("TPU v5p", 459e12, 95 * GiB, 2765 * GB),
    Chip("TPU v6 lite", 918e12, 32 * GiB, 1638 * GB),
    Chip("TPU v6e", 918e12, 32 * GiB, 1638 * GB),
    # jax reports the SXM part as "NVIDIA H100 80GB HBM3", the PCIe card as "NVIDIA H100 PCIe".
    Chip("NVIDIA H100", 989e12, 80 * GB, 3350 * GB),
    Chip("NVIDIA H100 PCIe", 756e12, 80 * GB, 2000 * GB),
    Chip("NVIDIA H100 NVL", 835e12, 94 * GB, 3900 * GB),
    Chip("NVIDIA H200", 989e12, 141 * GB, 4800 * GB),
    Chip("NVIDIA A100", 312e12, 40 * GB, 1555 * GB),  # A100-SXM4-40GB, A100-PCIE-40GB
    Chip("NVIDIA A100-SXM4-80GB", 312e12, 80 * GB, 2039 * GB),
    Chip("NVIDIA A100 80GB PCIe", 312e12, 80 * GB, 1935 * GB),
    Chip("NVIDIA L4", 121e12, 24 * GB, 300 * GB),
    Chip("NVIDIA B200", 2250e12, 180 * GB, 7700 * GB),
)
DEVICE_PEAK_FLOPS: dict[str, float] = {chip.device_kind: chip.bf16_flops for chip in CHIPS}


def chip(device_kind: str) -> Chip | None:
    """The table's chip for a `jax.Device.device_kind`, matching the longest known prefix; None if unknown."""
    matches = [c for c in CHIPS if device_kind.startswith(c.device_kind)]
    return max(matches, key=lambda c: len(c.device_kind)) if matches else None


def device_peak_flops(device_kind: str) -> float | None:
    """The table's dense bf16 peak for a `jax.Device.device_kind`; None if unknown."""
    found = chip(device_kind)
    return found.bf16_flops if found else None


@functools.cache
def measure_matmul_flops(n: int = 1024, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n matmul on the default device, compiled as the model is: the CPU's practical
    peak for MFU. Measured once per process, so that the runs of one process (a sweep's members, say) report
    MFU against the same peak. At n = 1024 the operands stay in cache: the best of ten takes ~0.3 s on two
    cores and comes out ~25% above n = 2048's, i.e. closer to what the cores can do."""
    import jax
    import jax.numpy as jnp

    from jaxlm.model import compiler_options

    a = jnp.ones((n, n), dtype) * 0.5
    b = jnp.ones((n, n), dtype) * 0.25
    mm = jax.jit(lambda x, y: x @ y, compiler_options=compiler_options())
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(device=None) -> tuple[float, str]:
    """The peak to compute MFU against and where it came from: the device table, or a measured CPU matmul."""
    import jax

    device = device or jax.devices()[0]
    peak = device_peak_flops(device.device_kind)
    if peak is not None:
        return peak * jax.device_count(), f"{device.device_kind} bf16 spec x {jax.device_count()}"
    return measure_matmul_flops(), "measured f32 1024x1024 matmul"


# Published FLOP counts, for comparing with the literature. Each returns training FLOPs (forward + backward).


def six_n_flops_per_token(cfg: ModelConfig, *, nonembedding: bool = False) -> float:
    """The 6N rule: 6 x total parameters, or 6 x non-embedding parameters (Kaplan et al.'s N)."""
    return 6.0 * (count_nonembedding_params(cfg) if nonembedding else count_params(cfg))


def kaplan_params(cfg: ModelConfig) -> int:
    """Kaplan et al. 2020's N: the blocks' matmul weights, 2 d_model n_layer (2 d_attn + d_ff) for GPT-2."""
    return matmul_params(cfg) - cfg.d_model * cfg.vocab_size


def kaplan_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Kaplan et al. 2020, Table 1: C_forward = 2N + 2 n_layer n_ctx d_attn; training is 3x the forward pass.

    N is `kaplan_params` (no embeddings, biases or norms); the attention term counts the causal half of the
    score and value products.
    """
    d_attn = cfg.n_heads * cfg.head_dim
    return 3.0 * (2.0 * kaplan_params(cfg) + 2.0 * cfg.n_layers * seq_len * d_attn)


def chinchilla_flops_per_sequence(
    *,
    seq_len: int,
    vocab_size: int,
    n_layers: int,
    d_model: int,
    d_ff: int,
    n_heads: int,
    key_size: int,
    n_kv_heads: int | None = None,
    mlp_matrices: int = 2,
    include_embeddings: bool = True,
) -> float:
    """Hoffmann et al. 2022, Appendix F: training FLOPs of one sequence of `seq_len` tokens (backward = 2x forward).

    Forward terms: embeddings 2SVd; per layer, QKV 2S d (3kH), logits 2S^2 kH, softmax 3HS^2, softmax-value
    2S^2 kH, output 2S kH d, dense 2S (2 d ffw); final logits 2SdV. Grouped-query attention shrinks the K and V
    projections to n_kv_heads; a gated MLP (SwiGLU) has `mlp_matrices=3`. Table A4's published ratios leave out
    the embedding and final-logit terms (`include_embeddings=False`).
    """
    s, d, h, k = seq_len, d_model, n_heads, key_size
    kv = n_heads if n_kv_heads is None else n_kv_heads
    attention = (
        2 * s * d * k * (h + 2 * kv)  # query, key and value projections
        + 2 * s * s * k * h  # key @ query logits
        + 3 * h * s * s  # softmax
        + 2 * s * s * k * h  # softmax @ value
        + 2 * s * k * h * d  # output projection
    )
    dense = 2 * s * mlp_matrices * d * d_ff
    forward = n_layers * (attention + dense)
    if include_embeddings:
        forward += 2 * s * vocab_size * d + 2 * s * d * vocab_size
    return 3.0 * float(forward)


def chinchilla_flops_per_token(cfg: ModelConfig, seq_len: int, include_embeddings: bool = True) -> float:
    """`chinchilla_flops_per_sequence` for a model config, divided by the sequence length."""
    per_sequence = chinchilla_flops_per_sequence(
        seq_len=seq_len,
        vocab_size=cfg.vocab_size,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        n_heads=cfg.n_heads,
        key_size=cfg.head_dim,
        n_kv_heads=cfg.n_kv_heads,
        mlp_matrices=mlp_matrices(cfg),
        include_embeddings=include_embeddings,
    )
    return per_sequence / seq_len
