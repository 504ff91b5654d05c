"""The pretrained model under finetuning: applying it (logits, hidden states, LoRA adapters, the two task
losses), loading its weights and tokenizer, and choosing which of its parameters are trained."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lora as lora_lib
from jaxlm import storage
from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import CheckpointError, ConfigError, DataError
from jaxlm.finetune.config import HF_WEIGHTS, Params
from jaxlm.model import Transformer, init_params


# -------------------------------------------------------------------------------------------------- the model


def _is_output_projection(context) -> bool:
    module = context.module
    if not isinstance(module.parent, Transformer):
        return False
    return (module.name == "embed" and context.method_name == "attend") or (
        module.name == "lm_head" and context.method_name == "__call__"
    )


def _skip_output_projection(next_fn, args, kwargs, context):
    # The final-normed hidden states are the output projection's input: return them instead of logits.
    if _is_output_projection(context):
        return args[0]
    return next_fn(*args, **kwargs)


def apply_model(
    cfg: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    lora: Params | None = None,
    lora_spec: lora_lib.LoraSpec | None = None,
    rng: jax.Array | None = None,
    hidden: bool = False,
    loss_batch: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """Logits [B, T, V], or with `hidden` the final hidden states [B, T, D] (float32), or with `loss_batch` the
    model's (chunked) `token_loss_sums` over it, optionally through LoRA adapters. With `rng` dropout is on (the
    model's and the adapters')."""
    variables = {"params": params if lora is None else lora_lib.attach(params, lora)}
    with contextlib.ExitStack() as stack:
        if lora is not None:
            stack.enter_context(nn.intercept_methods(lora_lib.interceptor(lora_spec, deterministic=rng is None)))
        if hidden:
            stack.enter_context(nn.intercept_methods(_skip_output_projection))
        return Transformer(cfg).apply(
            variables, tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
            deterministic=rng is None, rngs={"dropout": rng} if rng is not None else {}, loss_batch=loss_batch,
        )


def _parts(trainable: Params, frozen: Params) -> tuple[Params, Params | None, Params | None]:
    """(backbone params, adapters or None, classifier head or None) of a split parameter set; the backbone's
    top-level entries may lie partly in `trainable` and partly in `frozen`."""
    backbone = {**frozen.get("model", {}), **trainable.get("model", {})}
    return backbone, trainable.get("lora"), trainable.get("head")


def full_backbone(trainable: Params, frozen: Params) -> Params:
    return _parts(trainable, frozen)[0]


def classifier_logits(
    cfg, trainable: Params, frozen: Params, tokens_BT, lengths_B, lora_spec=None, rng=None
) -> jax.Array:
    """Class logits [B, C] from the hidden state at each row's last real token."""
    backbone, adapters, head = _parts(trainable, frozen)
    hidden_BTD = apply_model(cfg, backbone, tokens_BT, lora=adapters, lora_spec=lora_spec, rng=rng, hidden=True)
    last_BD = jnp.take_along_axis(hidden_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BD @ head["kernel"] + head["bias"]


def response_losses(cfg, params: Params, batch, lora: Params | None = None, lora_spec=None, rng=None):
    """Sum of cross-entropies over response targets (loss weight 1), and their count."""
    return apply_model(
        cfg, params, batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
        lora=lora, lora_spec=lora_spec, rng=rng, loss_batch=batch,
    )


# -------------------------------------------------------------------------------------------- pretrained weights


def is_hf_dir(path: str) -> bool:
    return any(storage.isfile(storage.join(path, name)) for name in HF_WEIGHTS)


def _hf_tokenizer_data(data, path: str):
    """The data section of a run started from the Hugging Face directory `path`: the tokenizer that directory
    holds (tokenizer.model or tokenizer.json) in place of a named kind; another tokenizer file is refused."""
    from jaxlm.data.tokenizer import is_named_kind, tokenizer_file

    try:
        own = tokenizer_file(path)
    except DataError:
        return data  # weights only: the run's own tokenizer, which must fit the model's vocabulary
    if is_named_kind(data.tokenizer):
        return dataclasses.replace(data, tokenizer=path)
    if os.path.abspath(tokenizer_file(data.tokenizer)) != os.path.abspath(own):
        raise ConfigError(
            f"init_from {path} holds its own tokenizer, but --data.tokenizer is {data.tokenizer!r}: token ids would "
            f"mean different things; drop --data.tokenizer (or give {path})"
        )
    return data


def load_base(experiment: Experiment) -> tuple[Experiment, Params]:
    """The experiment (its model, and its tokenizer where the directory holds one, taken from a Hugging Face
    directory when init_from is one) and the starting params: those of TrainConfig.init_from, or a fresh
    initialisation when it is empty."""
    path = experiment.train.init_from
    if not path:
        fresh = jax.jit(lambda key: init_params(experiment.model, key))
        return experiment, fresh(jax.random.key(experiment.train.seed))
    if not storage.is_uri(path) and os.path.isdir(path) and is_hf_dir(path):  # Hugging Face weights: local
        from jaxlm.hf import load_hf

        cfg, params = load_hf(path)
        cfg = dataclasses.replace(cfg, dropout=experiment.model.dropout, remat=experiment.model.remat)
        return dataclasses.replace(experiment, model=cfg, data=_hf_tokenizer_data(experiment.data, path)), params
    from jaxlm.checkpoint import load_params

    if not storage.exists(path):
        raise CheckpointError(f"init_from {path} does not exist: train that run first, or fix --train.init-from")
    source, params = load_params(path)
    mine, theirs = _tokenizer_identity(experiment.data), _tokenizer_identity(source.data)
    for field in theirs:
        if mine.get(field) != theirs[field]:
            raise ConfigError(
                f"init_from {path} was trained with data.{field}={theirs[field]!r}, this run has "
                f"{getattr(experiment.data, field)!r}: token ids would mean different things; use the pretrained "
                "run's data config"
            )
    expected = jax.eval_shape(lambda: init_params(experiment.model, jax.random.key(0), seq_len=1))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != got:
        name, shape = sorted(set(want.items()) ^ set(got.items()))[0]
        raise CheckpointError(
            f"init_from {path}: parameter {name} does not match this run's model ({shape}): use the pretrained "
            "run's model config (its config.json)"
        )
    return experiment, params


def _tokenizer_identity(data) -> dict[str, Any]:
    """The data settings that decide which token id means what."""
    from jaxlm.data.tokenizer import is_named_kind

    if data.tokenizer == "byte" or not is_named_kind(data.tokenizer):
        return {"tokenizer": data.tokenizer}
    fields = ["tokenizer", "source", "val_fraction", "text_field", "train_split"]
    if data.tokenizer.startswith("sentencepiece-"):
        fields += ["vocab_size", "tokenizer_sample_bytes"]
    return {f: getattr(data, f) for f in fields}


def load_tokenizer(experiment: Experiment):
    """The run's tokenizer; byte tokenizers and tokenizer files load directly, trained ones come from their
    corpus cache."""
    from jaxlm.data.tokenizer import ByteTokenizer, is_named_kind, load_pretrained

    kind = experiment.data.tokenizer
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif not is_named_kind(kind):
        tokenizer = load_pretrained(kind)
    else:
        from jaxlm.data import prepare_data

        tokenizer = prepare_data(experiment.data).tokenizer
    if tokenizer.vocab_size > experiment.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {experiment.model.vocab_size}: "
            "use the pretrained run's data config"
        )
    return tokenizer


# -------------------------------------------------------------------------------------------- what is trained


def last_k_mask(cfg, params: Params, k: int, head_keys: tuple[str, ...] = ("lm_head",)) -> Params:
    """1/0 per parameter (per layer for scanned blocks): the last k blocks, the final norm and `head_keys`."""
    L = cfg.n_layers

    def mask(path, leaf):
        top = path[0].key
        if top == "blocks":
            layer = (np.arange(L) >= L - k).astype(np.float32)
            return layer.reshape(L, *([1] * (leaf.ndim - 1)))
        if top.startswith("block_"):
            return np.float32(int(top[len("block_"):]) >= L - k)
        return np.float32(top == "final_norm" or top in head_keys)

    return jax.tree_util.tree_map_with_path(mask, params)


def count_trainable(trainable: Params, mask: Params | None) -> int:
    if mask is None:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return sum(
        int(np.sum(np.broadcast_to(m, x.shape))) for x, m in zip(jax.tree.leaves(trainable), jax.tree.leaves(mask))
    )
