"""Text generation: prefill the prompts into a KV cache, then decode one token per step in a jitted loop.

Prompts of different lengths are left-padded to the longest, so every row writes its n-th new token into the
same cache slot and one `dynamic_update_slice` serves the whole batch. Padding slots carry segment id 0, which
real tokens never attend to, and each row's positions count from 0 at its first real token: learned positions
and RoPE see exactly what they would for the prompt alone.

    prefill:  prompts [B, P] -> cache of P + N - 1 slots, first new token     (one forward pass, jitted)
    decode:   token [B] -> logits -> next token, N - 1 times                  (lax.while_loop, on device)

Both run the layers unrolled, each layer's cache updated in place; a scan over stacked layer params would
slice every layer's weights again for each token.

The loop ends early once every row has produced `eos_id`. Sampling: greedy at temperature 0; otherwise the
logits are divided by the temperature, cut to the top k and then to the smallest set whose probability reaches
top_p, and sampled with a key derived from the seed and the step, so a seed always gives the same tokens.
`generate_uncached` is the plain reference: the full forward pass over the whole sequence at every step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.model import KVCache, forward, init_cache

Array = jax.Array


@flax.struct.dataclass
class Sampler:
    """How the next token is chosen. The numbers are traced (changing them does not recompile); `greedy` is part
    of the compiled program. Build one with `make_sampler`, which checks the values."""

    temperature: Array
    top_k: Array  # 0: no cut
    top_p: Array  # 1: no cut
    greedy: bool = flax.struct.field(pytree_node=False, default=False)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p sampling."""
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")
    return Sampler(
        temperature=np.float32(temperature if temperature > 0 else 1.0), top_k=np.int32(top_k),
        top_p=np.float32(top_p), greedy=temperature == 0,
    )


def sample_logits(logits_BV: Array, key: Array, sampler: Sampler) -> Array:
    """The next token of each row [B] (int32) from float32 logits [B, V]."""
    if sampler.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]
    logits_BV = logits_BV / sampler.temperature
    never = jnp.finfo(logits_BV.dtype).min
    # Both cuts are logit thresholds read off the sorted logits: the k-th largest, then the smallest logit of
    # the most likely tokens whose probability (within the top k) reaches top_p. Ties at a threshold are kept.
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    rank_V = jnp.arange(V)
    n_top_k = jnp.where(sampler.top_k > 0, jnp.minimum(sampler.top_k, V), V)
    probs_BV = jax.nn.softmax(jnp.where(rank_V < n_top_k, sorted_BV, never), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_top_p_B1 = jnp.sum((mass_before_BV < sampler.top_p) & (rank_V < n_top_k), axis=-1, keepdims=True)
    n_kept_B1 = jnp.where(sampler.top_p < 1, n_top_p_B1, n_top_k)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_kept_B1 - 1, axis=-1)
    logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, never)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- batches of prompts


def check_request(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ConfigError("no prompts given: pass at least one prompt (a list of token ids)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ConfigError(f"prompt {i} is empty: start it with a token, e.g. the tokenizer's bos or eos id")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= cfg.vocab_size:
            raise ConfigError(
                f"prompt {i} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                f"[0, {cfg.vocab_size}): encode it with the model's own tokenizer"
            )
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is {longest + max_new_tokens} "
            f"tokens, beyond the model's context of max_seq_len={cfg.max_seq_len}: shorten the prompt or ask "
            f"for at most {max(cfg.max_seq_len - longest, 0)} new tokens"
        )


def _left_pad(prompts: Sequence[Sequence[int]], length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts [B, P] right-aligned (padding id 0, never attended to) and each row's padding length [B]; P is the
    longest prompt's length, or `length` if that is more."""
    longest = max(length, *(len(p) for p in prompts))
    tokens_BP = np.zeros((len(prompts), longest), np.int32)
    pad_B = np.array([longest - len(p) for p in prompts], np.int32)
    for row, (prompt, pad) in enumerate(zip(prompts, pad_B)):
        tokens_BP[row, pad:] = prompt
    return tokens_BP, pad_B


def _padding_layout(pad_B: Array, slots: int) -> tuple[Array, Array]:
    """Positions [B, slots] counted from each row's first real token, and segment ids (0 padding, 1 tokens)."""
    slot_BS = jnp.arange(slots, dtype=jnp.int32)[None, :]
    positions_BS = jnp.maximum(slot_BS - pad_B[:, None], 0)
    segment_ids_BS = (slot_BS >= pad_B[:, None]).astype(jnp.int32)
    return positions_BS, segment_ids_BS


def _host(x: Array) -> np.ndarray:
    """A result as numpy on every process, also when its shards live on several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x)
    return np.asarray(x)


def _until_eos(out_BN: np.ndarray, n_steps: int, eos_id: int | None) -> list[list[int]]:
    """Each row's tokens up to and including its first eos."""
    rows = []
    for row in np.asarray(out_BN)[:, :n_steps].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        rows.append(row)
    return rows


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def shape_buckets(cfg: ModelConfig, rows: int, longest: int, max_new_tokens: int) -> tuple[int, int, int]:
    """Rows, prompt length and new tokens rounded up to powers of two (within the context), so that a stream of
    requests of every size compiles a few programs rather than one per size."""
    new_tokens = min(_power_of_two(max_new_tokens), cfg.max_seq_len - longest)
    return _power_of_two(rows), min(_power_of_two(longest), cfg.max_seq_len - new_tokens), new_tokens


def inference_config(cfg: ModelConfig) -> ModelConfig:
    # Rematerialisation only matters for gradients. Layers run unrolled (see `_unscanned`).
    return dataclasses.replace(cfg, remat="none", scan_layers=False)


def _unscanned(params: Any) -> Any:
    """Stacked layer params ("blocks", leading L axis) as one subtree per layer ("block_i").

    Called inside the jitted functions, so the slices are taken once, before the decode loop.
    """
    if "blocks" not in params:
        return params
    n_layers = jax.tree.leaves(params["blocks"])[0].shape[0]
    layers = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(n_layers)}
    return {**{k: v for k, v in params.items() if k != "blocks"}, **layers}


# ------------------------------------------------------------------------------------------ cached generation


@functools.partial(jax.jit, static_argnames=("cfg", "slots"))
def prefill(
    cfg: ModelConfig, params: Any, prompt_BP: Array, pad_B: Array, key: Array, sampler: Sampler, *, slots: int
) -> tuple[Array, KVCache]:
    """Feed the left-padded prompts into an empty cache of `slots` slots; returns the first new token [B]."""
    B, P = prompt_BP.shape
    params = _unscanned(params)
    positions_BP, segment_ids_BP = _padding_layout(pad_B, P)
    cache = init_cache(cfg, B, slots)

    def feed(cache: KVCache, part: slice) -> tuple[Array, KVCache]:
        return forward(
            cfg, params, prompt_BP[:, part], positions_BT=positions_BP[:, part],
            segment_ids_BT=segment_ids_BP[:, part], cache=cache,
        )

    if P > 1:
        # Only the last token's logits are needed: fed apart, the others' output projection is never computed.
        _, cache = feed(cache, slice(0, P - 1))
    logits_B1V, cache = feed(cache, slice(P - 1, P))
    return sample_logits(logits_B1V[:, -1], jax.random.fold_in(key, 0), sampler), cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def decode(
    cfg: ModelConfig,
    params: Any,
    first_B: Array,
    cache: KVCache,
    pad_B: Array,
    key: Array,
    eos_id: Array,
    sampler: Sampler,
    limit: Array | None = None,
    *,
    max_new_tokens: int,
) -> tuple[Array, Array]:
    """Tokens [B, max_new_tokens] starting with `first_B`, and how many columns were produced before every row
    had emitted `eos_id` (columns after a row's eos hold eos). A traced `limit` stops the loop after that many
    tokens without compiling another program."""
    B = first_B.shape[0]
    params = _unscanned(params)
    out_BN = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)
    limit = jnp.int32(max_new_tokens) if limit is None else jnp.minimum(limit, max_new_tokens)

    def unfinished(state):
        n, _, done_B, _, _ = state
        return (n < limit) & ~jnp.all(done_B)

    def step(state):
        n, token_B, done_B, out_BN, cache = state
        positions_B1 = (cache.index - pad_B)[:, None]
        logits_B1V, cache = forward(cfg, params, token_B[:, None], positions_BT=positions_B1, cache=cache)
        next_B = sample_logits(logits_B1V[:, 0], jax.random.fold_in(key, n), sampler)
        next_B = jnp.where(done_B, eos_id, next_B)
        out_BN = lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], n, axis=1)
        return n + 1, next_B, done_B | (next_B == eos_id), out_BN, cache

    state = (jnp.int32(1), first_B, first_B == eos_id, out_BN, cache)
    n, _, _, out_BN, _ = lax.while_loop(unfinished, step, state)
    return out_BN, n


def generate(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    bucketed: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), ending with `eos_id` where the model produced it.

    Runs with the params where they are: params sharded over a mesh stay sharded. `bucketed` compiles for the
    `shape_buckets` of the request (extra rows repeat the first prompt and are dropped; sampled tokens then depend
    on the padded shape, greedy ones do not): for a server that sees every size.
    """
    check_request(cfg, prompts, max_new_tokens)
    sampler = make_sampler(temperature, top_k, top_p)
    cfg = inference_config(cfg)
    rows, length, new_tokens = len(prompts), 0, max_new_tokens
    if bucketed:
        rows, length, new_tokens = shape_buckets(cfg, rows, max(len(p) for p in prompts), max_new_tokens)
    prompt_BP, pad_B = _left_pad([*prompts, *[prompts[0]] * (rows - len(prompts))], length)
    key = jax.random.key(seed)
    # The last new token is returned, never fed back: it needs no slot.
    slots = prompt_BP.shape[1] + new_tokens - 1
    first_B, cache = prefill(cfg, params, prompt_BP, pad_B, key, slots=slots, sampler=sampler)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    out_BN, n = decode(
        cfg, params, first_B, cache, pad_B, key, eos, sampler, np.int32(max_new_tokens), max_new_tokens=new_tokens
    )
    return _until_eos(_host(out_BN)[: len(prompts)], int(_host(n)), eos_id)


# --------------------------------------------------------------------------------------- reference: no cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def uncached_step(
    cfg: ModelConfig, params: Any, tokens_BS: Array, pad_B: Array, last: Array, key: Array, sampler: Sampler
) -> Array:
    """The token after slot `last`, from a full forward pass over the whole buffer (later slots cannot be seen)."""
    params = _unscanned(params)
    positions_BS, segment_ids_BS = _padding_layout(pad_B, tokens_BS.shape[1])
    logits_BSV = forward(cfg, params, tokens_BS, positions_BT=positions_BS, segment_ids_BT=segment_ids_BS)
    logits_BV = lax.dynamic_index_in_dim(logits_BSV, last, axis=1, keepdims=False)
    return sample_logits(logits_BV, key, sampler)


def generate_uncached(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Same contract as `generate`, without a cache: every step re-runs the forward pass over the whole context."""
    check_request(cfg, prompts, max_new_tokens)
    sampler = make_sampler(temperature, top_k, top_p)
    cfg = inference_config(cfg)
    prompt_BP, pad_B = _left_pad(prompts)
    B, P = prompt_BP.shape
    # A buffer of the whole context compiles once for any prompt length; slots not yet filled lie in the
    # future of every slot read, so the causal mask hides them.
    tokens_BS = np.zeros((B, cfg.max_seq_len), np.int32)
    tokens_BS[:, :P] = prompt_BP
    key = jax.random.key(seed)
    out_BN = np.zeros((B, max_new_tokens), np.int32)
    done_B = np.zeros(B, bool)
    for n in range(max_new_tokens):
        step_key = jax.random.fold_in(key, n)
        next_B = _host(uncached_step(cfg, params, tokens_BS, pad_B, P - 1 + n, step_key, sampler=sampler))
        if eos_id is not None:
            next_B = np.where(done_B, eos_id, next_B)
            done_B |= next_B == eos_id
        out_BN[:, n] = next_B
        if n + 1 < max_new_tokens:
            tokens_BS[:, P + n] = next_B
        if done_B.all():
            return _until_eos(out_BN, n + 1, eos_id)
    return _until_eos(out_BN, max_new_tokens, eos_id)
