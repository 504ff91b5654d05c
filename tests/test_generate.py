"""KV-cache generation against the no-cache reference, sampling filters against numpy, and input checks."""

import jax
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.generate import generate, generate_uncached, make_sampler, sample_logits
from jaxlm.model import Transformer, forward, init_cache, init_params

# Three prompts of different lengths: the batch is left-padded to the longest.
PROMPTS = [[5, 9, 2, 33, 17, 8, 41], [12], [7, 7, 30, 2]]
NEW = 10

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=24, init_std=0.2),
    # GQA (2 kv heads for 4 query heads) and unstacked layers.
    "llama": ModelConfig(
        family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=24,
        init_std=0.2, rope_theta=100.0, scan_layers=False,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    cfg = CONFIGS[request.param]
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))


@pytest.fixture(scope="module")
def greedy(model):
    cfg, params = model
    return generate(cfg, params, PROMPTS, max_new_tokens=NEW)


def test_cache_gives_the_logits_of_the_full_forward_pass(model):
    cfg, params = model
    tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    step = jax.jit(forward, static_argnums=0)
    prefill_BTV, cache = step(cfg, params, tokens_BT[:, :6], cache=init_cache(cfg, 2, 12))
    logits = [prefill_BTV]
    for t in range(6, 10):  # then one token at a time
        logits_B1V, cache = step(cfg, params, tokens_BT[:, t : t + 1], cache=cache)
        logits.append(logits_B1V)
    got = np.concatenate(logits, axis=1)
    np.testing.assert_allclose(got, step(cfg, params, tokens_BT), atol=1e-5, rtol=0)
    assert int(cache.index) == 10


def test_cached_greedy_equals_full_forward_every_step(model, greedy):
    cfg, params = model
    assert [len(row) for row in greedy] == [NEW] * len(PROMPTS)
    assert greedy == generate_uncached(cfg, params, PROMPTS, max_new_tokens=NEW)
    # Each prompt on its own (no padding at all) gives the same tokens: padding is invisible and positions right.
    alone = [generate_uncached(cfg, params, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
    assert greedy == alone
    assert len({tuple(row) for row in greedy}) == len(PROMPTS)  # the rows really differ


@pytest.mark.slow
def test_sampling_is_reproducible_and_seeded(model):
    cfg, params = model
    kwargs = dict(max_new_tokens=NEW, temperature=1.5, top_k=20, top_p=0.95)
    first = generate(cfg, params, PROMPTS, seed=3, **kwargs)
    assert first == generate(cfg, params, PROMPTS, seed=3, **kwargs)
    assert first != generate(cfg, params, PROMPTS, seed=4, **kwargs)
    # The cached path draws the same random numbers from the same logits as the reference.
    assert first == generate_uncached(cfg, params, PROMPTS, seed=3, **kwargs)


@pytest.mark.slow
def test_top_k_1_is_greedy(model, greedy):
    cfg, params = model
    assert generate(cfg, params, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=7) == greedy


def test_stops_at_eos_per_row(model, greedy):
    cfg, params = model
    eos = greedy[0][3]
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in greedy]
    assert generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=eos) == expected
    assert len(expected[0]) <= 4


@pytest.mark.slow
def test_sharded_params_give_the_same_tokens(model, greedy):
    cfg, unsharded = model
    if len(jax.devices()) < 8:
        pytest.fail("tests/conftest.py should provide 8 host devices")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(1), np.zeros((1, 8), np.int32))["params"]
    params = jax.device_put(unsharded, sharding.logical_shardings(abstract, mesh))
    shardings = [leaf.sharding for leaf in jax.tree.leaves(params)]
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in shardings)
    assert generate(cfg, params, PROMPTS, max_new_tokens=NEW) == greedy


def _filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution sampling should draw from, computed directly in numpy."""
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    keep[order[: top_k or len(probs)]] = True
    if top_p < 1:
        kept_sorted = probs[order] * keep[order]
        kept_sorted /= kept_sorted.sum()
        before = np.cumsum(kept_sorted) - kept_sorted
        keep[order[before >= top_p]] = False
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (2.0, 0, 0.6), (0.7, 4, 0.9), (1.0, 0, 1.0)])
def test_sample_logits_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = np.log(np.array([0.05, 0.30, 0.02, 0.40, 0.15, 0.08], np.float32))
    n = 20000
    expected = _filtered_probs(logits, temperature, top_k, top_p)
    sampler = make_sampler(temperature, top_k, top_p)
    draws = np.asarray(sample_logits(np.tile(logits, (n, 1)), jax.random.key(0), sampler))
    freq = np.bincount(draws, minlength=len(logits)) / n
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(expected))  # never a filtered token
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_rejects_requests_beyond_the_context_and_bad_inputs():
    cfg = CONFIGS["gpt2"]
    params = None  # every check happens before the params are touched
    with pytest.raises(ConfigError, match="max_seq_len=24"):
        generate(cfg, params, [[1] * 10, [2]], max_new_tokens=15)
    with pytest.raises(ConfigError, match="empty"):
        generate(cfg, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ConfigError, match="vocabulary"):
        generate(cfg, params, [[1, 64]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="top_p"):
        generate(cfg, params, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        generate_uncached(cfg, params, [[1]], max_new_tokens=2, temperature=-1.0)
