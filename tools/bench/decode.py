"""Decoding speed: time to first token and tokens per second with and without the KV cache."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.generate import check_request, decode, inference_config, make_sampler, prefill, uncached_step
from jaxlm.model import init_params


def _seconds(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args, **kwargs))
    return result, time.perf_counter() - start


def benchmark_decode(
    cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    seed: int = 0,
    uncached_steps: int | None = None,
) -> dict[str, Any]:
    """Time to first token and decode throughput with and without the KV cache, on random weights and prompts.

    Every figure is measured after a warm-up call, so compilation is reported separately (`compile_s`). Without
    the cache each step costs the same (a full pass over the fixed buffer), so `uncached_steps` (default: all
    new tokens) may time fewer steps on large models.
    """
    cfg = inference_config(cfg)
    check_request(cfg, [[0] * prompt_len], new_tokens)
    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")
    sampler = make_sampler()
    params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    prompt_BP = rng.integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    pad_B = np.zeros(batch, np.int32)
    key = jax.random.key(seed)
    slots = prompt_len + new_tokens - 1
    no_eos = jnp.int32(-1)

    def cached():
        first_B, cache = prefill(cfg, params, prompt_BP, pad_B, key, slots=slots, sampler=sampler)
        return decode(cfg, params, first_B, cache, pad_B, key, no_eos, max_new_tokens=new_tokens, sampler=sampler)

    _, compile_s = _seconds(cached)
    (first_B, cache), ttft_s = _seconds(prefill, cfg, params, prompt_BP, pad_B, key, slots=slots, sampler=sampler)
    _, decode_s = _seconds(
        decode, cfg, params, first_B, cache, pad_B, key, no_eos, max_new_tokens=new_tokens, sampler=sampler
    )

    steps = min(uncached_steps or new_tokens, new_tokens)
    tokens_BS = np.zeros((batch, slots), np.int32)
    tokens_BS[:, :prompt_len] = prompt_BP
    _seconds(uncached_step, cfg, params, tokens_BS, pad_B, prompt_len - 1, key, sampler=sampler)
    start = time.perf_counter()
    for n in range(steps):
        next_B = uncached_step(cfg, params, tokens_BS, pad_B, prompt_len - 1 + n, key, sampler=sampler)
        tokens_BS[:, min(prompt_len + n, slots - 1)] = np.asarray(next_B)
    uncached_s = time.perf_counter() - start

    cached_tps = batch * (new_tokens - 1) / decode_s
    uncached_tps = batch * steps / uncached_s
    return {
        "architecture": cfg.architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "dtype": cfg.dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "device": jax.devices()[0].device_kind,
        "compile_s": compile_s,
        "time_to_first_token_s": ttft_s,
        "decode_tokens_per_s_cached": cached_tps,
        "decode_tokens_per_s_uncached": uncached_tps,
        "uncached_steps_timed": steps,
        "cache_speedup": cached_tps / uncached_tps,
    }
