"""muP (Tensor Programs V): a coordinate check across 4 widths, the parametrization's equality with the standard
one at the base width, and its per-parameter learning rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.config import ModelConfig, OptimConfig
from jaxlm.errors import ConfigError
from jaxlm.model import Transformer, init_params
from jaxlm.optim import lr_scales, make_optimizer

BASE = 32
WIDTHS = (32, 64, 128, 256)
STEPS, LR = 4, 1e-2


def model_at(width, parametrization):
    # Four heads at every width: the heads widen with the model, as muP's 1/head_dim attention scale assumes.
    return ModelConfig(family="gpt2", n_layers=1, d_model=width, n_heads=4, vocab_size=64, max_seq_len=16,
                       scan_layers=False, remat="none", parametrization=parametrization,
                       mup_base_width=BASE if parametrization == "mup" else 0)


def trained(cfg):
    """Params after STEPS Adam steps on one batch, and the mean |activation| of the embedding, each block's
    output and the logits."""
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)
    optim = OptimConfig(lr=LR, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, schedule="constant")
    tx = make_optimizer(optim, STEPS, cfg)

    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def run(key):
        # Initialised inside the one compiled program: an eager init costs more than the whole check.
        params = init_params(cfg, key)

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=STEPS)
        logits, state = Transformer(cfg).apply({"params": params}, tokens[:, :-1], capture_intermediates=True,
                                               mutable=["intermediates"])
        sizes = {"logits": jnp.mean(jnp.abs(logits))}
        for name in ("embed", "block_0"):
            out = state["intermediates"][name]["__call__"][0]
            sizes[name] = jnp.mean(jnp.abs(out[0] if isinstance(out, tuple) else out))
        return params, sizes

    params, sizes = run(jax.random.key(0))
    return params, {k: float(v) for k, v in sizes.items()}


@pytest.mark.slow
def test_coordinate_check_and_base_width_equality():
    runs = {(p, w): trained(model_at(w, p)) for p in ("sp", "mup") for w in WIDTHS}
    # At the base width muP is SP, bit for bit: initialisation, forward and the optimizer's updates.
    sp_params, sp_sizes = runs["sp", BASE]
    mup_params, mup_sizes = runs["mup", BASE]
    assert sp_sizes == mup_sizes
    for a, b in zip(jax.tree.leaves(sp_params), jax.tree.leaves(mup_params)):
        np.testing.assert_array_equal(a, b)
    # Across widths x8, after a few Adam steps: muP keeps every layer's activations the same size (Tensor
    # Programs V, Fig. 5), SP lets the blocks' outputs and the logits grow with the width.
    for layer in ("block_0", "logits"):
        sp = np.array([runs["sp", w][1][layer] for w in WIDTHS])
        mup = np.array([runs["mup", w][1][layer] for w in WIDTHS])
        assert np.all(np.diff(sp) > 0) and sp[-1] / sp[0] > 3, (layer, sp)
        assert mup.max() / mup.min() < 1.6, (layer, mup)
    embed = [runs[p, w][1]["embed"] for p in ("sp", "mup") for w in WIDTHS]
    assert max(embed) / min(embed) < 1.5  # the input layer is the same under both
    # Hidden matrices start with variance ~ 1/fan_in (std init_std sqrt(base / width)), embeddings as under SP.
    params = jax.jit(init_params, static_argnums=0)(model_at(128, "mup"), jax.random.key(0))
    kernel = np.asarray(params["block_0"]["attn"]["query"]["kernel"])
    assert kernel.std() == pytest.approx(0.02 * (BASE / 128) ** 0.5, rel=0.05)
    assert np.asarray(params["embed"]["embedding"]).std() == pytest.approx(0.02, rel=0.05)


def test_mup_learning_rates_and_config():
    cfg = model_at(128, "mup")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    scales = lr_scales(cfg, params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(scales)[0]}
    hidden = [k for k, v in flat.items() if v != 1.0]
    # Hidden matrices at base/width; the embeddings (input and, tied, output), biases and norms at 1.
    assert all(flat[k] == BASE / 128 for k in hidden)
    assert sorted({k.split("'")[3] for k in hidden}) == ["attn", "mlp"]
    assert flat["['embed']['embedding']"] == 1.0 and flat["['pos_embed']['embedding']"] == 1.0
    assert all(lr == 1.0 for lr in jax.tree.leaves(lr_scales(model_at(128, "sp"), params)))
    with pytest.raises(ConfigError, match="needs the base width: set --model.mup-base-width"):
        ModelConfig(parametrization="mup")
    with pytest.raises(ConfigError, match="parametrization='nt' is not one of sp, mup"):
        ModelConfig(parametrization="nt")


def test_isoflop_grid_builds_mup_members_with_one_learning_rate(tmp_path):
    from jaxlm.config import DataConfig, Experiment, TrainConfig
    from jaxlm.scaling import AspectRatioShapes, isoflop_grid

    model = ModelConfig(family="gpt2", n_layers=1, d_model=32, n_heads=4, vocab_size=260, max_seq_len=64,
                        parametrization="mup", mup_base_width=32, mup_base_head_dim=8)
    base = Experiment(name="iso", model=model, data=DataConfig(tokenizer="byte", seq_len=64, batch_size=8),
                      optim=OptimConfig(lr=3e-3), train=TrainConfig(out_dir=str(tmp_path / "iso")))
    members = isoflop_grid(base, [1e12, 3e12], shape_rule=AspectRatioShapes(aspect=32.0, head_dim=8, band=4.0))
    widths = {m.model.d_model for m in members}
    assert len(widths) > 3 and all(m.optim.lr == 3e-3 for m in members)
    for m in members:
        assert m.model.parametrization == "mup" and m.model.width_ratio == 32 / m.model.d_model
        assert m.model.head_dim == 8 and m.model.attention_ratio == 1.0  # heads of a fixed size: scale unchanged


def test_mup_transfer_sweep_and_best_learning_rates():
    from experiments import mup_transfer as mt

    assert len(mt.SWEEP) == 40 and len({m.run_dir for m in mt.SWEEP}) == 40
    at_base = [m.model for m in mt.SWEEP if m.model.d_model == mt.BASE_WIDTH]
    assert {m.width_ratio for m in at_base} == {1.0}
    losses = {("sp", 32, 1e-3): 2.0, ("sp", 32, 3e-3): 1.9, ("sp", 32, 1e-2): float("nan"),
              ("mup", 64, 1e-3): 2.1, ("mup", 64, 3e-3): 2.2}
    assert mt.best_learning_rates(losses) == {("sp", 32): (3e-3, 1.9), ("mup", 64): (1e-3, 2.1)}


def test_hf_export_refuses_a_mup_model_off_its_base_width(tmp_path):
    from jaxlm.hf import save_hf

    with pytest.raises(ConfigError, match="Hugging Face's GPT-2, Llama and Qwen3 cannot express"):
        save_hf(model_at(64, "mup"), {}, str(tmp_path / "hf"))
