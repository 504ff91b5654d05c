"""Parameter and FLOP counts, device peaks, and model FLOPs utilisation (MFU).

FLOPs count a multiply-accumulate as 2. Training FLOPs per token follow the usual convention: 6 per matmul parameter
(forward 2, backward 4) plus attention's score and value products, 12 * n_layers * d_attn * seq_len (counted for the
full, not the causal, square as PaLM's appendix B does).
"""

from __future__ import annotations

import time

from jaxlm.config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    # LayerNorm has a scale and (with bias) a shift; RMSNorm a scale only.
    return cfg.d_model * (2 if cfg.family == "gpt2" and cfg.bias else 1)


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one Transformer block."""
    d, dh, h, k, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    attn = d * h * dh + 2 * d * k * dh + h * dh * d
    if cfg.qkv_bias:
        attn += (h + 2 * k) * dh
    if cfg.bias:
        attn += d
    if cfg.family == "gpt2":
        mlp = 2 * d * f + ((f + d) if cfg.bias else 0)
    else:
        mlp = 3 * d * f + ((2 * f + d) if cfg.bias else 0)
    return attn + mlp + 2 * _norm_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """Token (and learned position) embeddings, plus the output matrix when it is not tied."""
    n = cfg.vocab_size * cfg.d_model
    if cfg.family == "gpt2":
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
    d, dh, h, k, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    attn = d * h * dh + 2 * d * k * dh + h * dh * d
    mlp = (2 if cfg.family == "gpt2" else 3) * d * f
    return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params plus attention scores and values (forward and backward)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


# Dense bf16 peak FLOP/s per chip, from the vendors' specifications.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def device_peak_flops(device_kind: str) -> float | None:
    """The table's peak for a `jax.Device.device_kind`, matching the longest known prefix; None if unknown."""
    matches = [k for k in DEVICE_PEAK_FLOPS if device_kind.startswith(k)]
    return DEVICE_PEAK_FLOPS[max(matches, key=len)] if matches else None


def measure_matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n matmul on the default device: the CPU's practical peak for MFU."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype) * 0.5
    b = jnp.ones((n, n), dtype) * 0.25
    mm = jax.jit(lambda x, y: x @ y)
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
    return measure_matmul_flops(), "measured f32 2048x2048 matmul"
