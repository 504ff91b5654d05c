"""Hugging Face interoperability: `GPT2LMHeadModel`, `LlamaForCausalLM` and `Qwen3ForCausalLM` directories <->
jaxlm params.

A directory holds `config.json` and the weights, either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Only safetensors are read (never pickle); every tensor is mapped, and a tensor
that nothing maps to is an error rather than a silent loss.

How the layouts differ:
- GPT-2's `Conv1D` stores weights as [in, out] and fuses q, k, v into one `c_attn` [D, 3D]; Llama's `nn.Linear`
  stores [out, in]. jaxlm keeps heads as their own axis: q [D, H, E], k and v [D, K, E], out [H, E, D].
- jaxlm's RoPE rotates the pairs (i, i + E/2) as transformers' Llama does, so q and k need no permutation.
- Qwen3 is Llama's layout plus `q_norm` and `k_norm` (jaxlm's `query_norm`, `key_norm`), each [head_dim].
- Which class a jaxlm model is exported as follows from its features (`hf_model_type`), not its family name.
- Biases HF's classes always have (GPT-2's) or have together (Llama's `attention_bias` covers q, k, v and the
  output projection) are written as zeros where the jaxlm model has none. `save_hf` also records jaxlm's own
  settings under a "jaxlm" key of config.json, so that `load_hf` drops those zero biases again and gives back
  exactly the config and params that were saved.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxlm import storage
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.model import init_params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Buffers that older checkpoints saved beside the weights; they are recomputed, not learned.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# jaxlm settings HF configs have no field for, restored from config.json's "jaxlm" entry.
_JAXLM_ONLY_FIELDS = ("family", "dropout", "dtype", "init_std", "remat", "scan_layers", "attention")

Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------------- configs


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in (None, "default"):
        return fields
    if kind != "llama3":
        raise ConfigError(f"rope scaling of type {kind!r} is not supported: jaxlm implements Llama 3's (llama3)")
    fields.update(
        rope_scaling_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_len=int(scaling["original_max_position_embeddings"]),
    )
    return fields


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model type that holds a model of these features: gpt2, llama or qwen3."""
    features = (cfg.positions, cfg.norm, cfg.mlp)
    if features == ("learned", "layernorm", "gelu") and not cfg.qk_norm:
        if cfg.n_kv_heads != cfg.n_heads or cfg.n_heads * cfg.head_dim != cfg.d_model:
            raise ConfigError(
                "a GPT-2 with grouped-query attention or head_dim * n_heads != d_model has no Hugging Face GPT-2 "
                "form: use n_kv_heads=n_heads and head_dim=None"
            )
        return "gpt2"
    if features == ("rope", "rmsnorm", "swiglu"):
        return "qwen3" if cfg.qk_norm else "llama"
    raise ConfigError(
        f"no Hugging Face class holds positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}, "
        f"qk_norm={cfg.qk_norm}: export the features of the gpt2, llama or qwen3 family"
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a transformers config.json (as a dict) of a GPT-2, Llama or Qwen3 model."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"GPT-2 activation {act!r} is not supported: jaxlm's GPT-2 uses the tanh GELU (gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ConfigError("this GPT-2 scales attention differently from 1/sqrt(head_dim), which jaxlm does not")
        d_model = hf["n_embd"]
        return ModelConfig(
            family="gpt2", positions="learned", norm="layernorm", mlp="gelu", qk_norm=False, n_layers=hf["n_layer"],
            d_model=d_model, n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d_model,
            vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            bias=True, qkv_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    if model_type in ("llama", "qwen3"):
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"activation {hf['hidden_act']!r} is not supported: jaxlm's SwiGLU uses silu")
        qwen3 = model_type == "qwen3"
        if qwen3 and hf.get("use_sliding_window"):
            raise ConfigError("this Qwen3 uses sliding-window attention, which jaxlm does not implement")
        d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        # Without a head_dim entry, transformers' Llama divides d_model by the heads and its Qwen3 takes 128.
        head_dim = hf.get("head_dim") or (128 if qwen3 else None)
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        return ModelConfig(
            family=model_type, positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=qwen3,
            n_layers=hf["num_hidden_layers"], d_model=d_model, n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim, d_ff=hf["intermediate_size"],
            vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            # jaxlm's `bias` covers the output projection and the MLP; missing ones are loaded as zeros.
            bias=attention_bias or mlp_bias, qkv_bias=attention_bias,
            tie_embeddings=hf.get("tie_word_embeddings", False), **_rope_fields(hf),
        )
    raise ConfigError(f"model_type {model_type!r} is not supported: jaxlm reads gpt2, llama and qwen3 checkpoints")


def config_to_hf(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    """A transformers config.json (as a dict) for `cfg`, with jaxlm's own settings under "jaxlm"."""
    model_type = hf_model_type(cfg)
    common = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "bos_token_id": bos_id,
        "eos_token_id": eos_id, "dtype": "float32", "use_cache": True,
        "jaxlm": {"bias": cfg.bias, "qkv_bias": cfg.qkv_bias, **{k: getattr(cfg, k) for k in _JAXLM_ONLY_FIELDS}},
    }
    if model_type == "gpt2":
        return {
            **common, "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling_factor > 0:
        scaling = {
            "rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
        rope = {**scaling, "rope_theta": cfg.rope_theta}
    hf = {
        **common, "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "attention_bias": cfg.qkv_bias or cfg.bias, "attention_dropout": 0.0,
        # transformers 5 reads rope_parameters; earlier versions read rope_theta and rope_scaling.
        "rope_parameters": rope, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
    }
    if model_type == "qwen3":  # no MLP biases (params_to_hf checks that jaxlm's are zero), full attention only
        return {**hf, "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    return {**hf, "mlp_bias": cfg.bias, "pretraining_tp": 1}


# ---------------------------------------------------------------------------------------------------- tensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a directory's model.safetensors, or of all the shards its index names."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        raise ConfigError(
            f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}: jaxlm reads safetensors only (convert .bin "
            "weights with transformers' save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


class _Tensors:
    """The HF tensors by name (without the `transformer.` or `model.` prefix), checked as they are taken."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.arrays = {}
        for name, array in tensors.items():
            if not name.endswith(_BUFFER_SUFFIXES):
                self.arrays[name.removeprefix("transformer.").removeprefix("model.")] = array
        self.taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.arrays

    def is_zero(self, name: str) -> bool:
        return not self.has(name) or not np.any(self.arrays[name])

    def take(self, name: str, shape: tuple[int, ...], missing_is_zero: bool = False) -> np.ndarray:
        if name not in self.arrays:
            if missing_is_zero:
                return np.zeros(shape, np.float32)
            raise ConfigError(f"the checkpoint has no tensor {name!r}, which its config.json implies")
        array = self.arrays[name]
        if array.shape != shape:
            raise ConfigError(f"tensor {name!r} has shape {array.shape}, but config.json implies {shape}")
        self.taken.add(name)
        return np.asarray(array, np.float32)

    def drop(self, *names: str) -> None:
        self.taken.update(n for n in names if n in self.arrays)

    def check_all_taken(self) -> None:
        left = sorted(set(self.arrays) - self.taken)
        if left:
            raise ConfigError(f"{len(left)} tensors have no place in the jaxlm model (e.g. {', '.join(left[:3])})")


def _apply_jaxlm_settings(cfg: ModelConfig, hf: dict[str, Any], t: _Tensors) -> ModelConfig:
    """Restore the settings save_hf recorded; a bias it left out is dropped only if it is still all zeros."""
    saved = hf.get("jaxlm") or {}
    changes = {k: saved[k] for k in _JAXLM_ONLY_FIELDS if k in saved}
    L = cfg.n_layers
    if hf_model_type(cfg) == "gpt2":
        qkv_names = [f"h.{i}.attn.c_attn.bias" for i in range(L)]
        other = ("ln_1", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        other_names = [f"h.{i}.{p}.bias" for i in range(L) for p in other]
        other_names.append("ln_f.bias")
    else:
        qkv_names = [f"layers.{i}.self_attn.{p}_proj.bias" for i in range(L) for p in "qkv"]
        other = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        other_names = [f"layers.{i}.{p}.bias" for i in range(L) for p in other]
    if saved.get("qkv_bias") is False and cfg.qkv_bias and all(t.is_zero(n) for n in qkv_names):
        changes["qkv_bias"] = False
        t.drop(*qkv_names)
    if saved.get("bias") is False and cfg.bias and all(t.is_zero(n) for n in other_names):
        changes["bias"] = False
        t.drop(*other_names)
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------------------------- one layer, both ways


def _gpt2_layer_from_hf(take: Callable[..., np.ndarray], cfg: ModelConfig, i: int) -> Params:
    D, H, E, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    p = f"h.{i}."
    qkv_w = np.split(take(p + "attn.c_attn.weight", (D, 3 * D)), 3, axis=1)  # Conv1D: [in, out]
    layer: Params = {
        "attn_norm": {"scale": take(p + "ln_1.weight", (D,))},
        "attn": {
            name: {"kernel": w.reshape(D, H, E)} for name, w in zip(("query", "key", "value"), qkv_w)
        },
        "mlp_norm": {"scale": take(p + "ln_2.weight", (D,))},
        "mlp": {
            "fc": {"kernel": take(p + "mlp.c_fc.weight", (D, F))},
            "proj": {"kernel": take(p + "mlp.c_proj.weight", (F, D))},
        },
    }
    layer["attn"]["out"] = {"kernel": take(p + "attn.c_proj.weight", (D, D)).reshape(H, E, D)}
    if cfg.qkv_bias:
        qkv_b = np.split(take(p + "attn.c_attn.bias", (3 * D,)), 3)
        for name, b in zip(("query", "key", "value"), qkv_b):
            layer["attn"][name]["bias"] = b.reshape(H, E)
    if cfg.bias:
        layer["attn_norm"]["bias"] = take(p + "ln_1.bias", (D,))
        layer["mlp_norm"]["bias"] = take(p + "ln_2.bias", (D,))
        layer["attn"]["out"]["bias"] = take(p + "attn.c_proj.bias", (D,))
        layer["mlp"]["fc"]["bias"] = take(p + "mlp.c_fc.bias", (F,))
        layer["mlp"]["proj"]["bias"] = take(p + "mlp.c_proj.bias", (D,))
    return layer


def _gpt2_layer_to_hf(layer: Params, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
    D, H, E, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    attn, mlp = layer["attn"], layer["mlp"]

    def bias(module: Params, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(module["bias"]).reshape(-1) if "bias" in module else np.zeros(shape, np.float32)

    p = f"transformer.h.{i}."
    qkv = ("query", "key", "value")
    return {
        p + "ln_1.weight": layer["attn_norm"]["scale"],
        p + "ln_1.bias": bias(layer["attn_norm"], (D,)),
        p + "attn.c_attn.weight": np.concatenate([attn[n]["kernel"].reshape(D, D) for n in qkv], axis=1),
        p + "attn.c_attn.bias": np.concatenate([bias(attn[n], (D,)) for n in qkv]),
        p + "attn.c_proj.weight": attn["out"]["kernel"].reshape(H * E, D),
        p + "attn.c_proj.bias": bias(attn["out"], (D,)),
        p + "ln_2.weight": layer["mlp_norm"]["scale"],
        p + "ln_2.bias": bias(layer["mlp_norm"], (D,)),
        p + "mlp.c_fc.weight": mlp["fc"]["kernel"],
        p + "mlp.c_fc.bias": bias(mlp["fc"], (F,)),
        p + "mlp.c_proj.weight": mlp["proj"]["kernel"],
        p + "mlp.c_proj.bias": bias(mlp["proj"], (D,)),
    }


def _llama_layer_from_hf(take: Callable[..., np.ndarray], cfg: ModelConfig, i: int) -> Params:
    """Layer i of a Llama or (with qk_norm) Qwen3 checkpoint."""
    D, H, K, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    p = f"layers.{i}."
    attn: Params = {
        name: {"kernel": take(f"{p}self_attn.{x}_proj.weight", (n * E, D)).T.reshape(D, n, E)}  # Linear: [out, in]
        for name, x, n in (("query", "q", H), ("key", "k", K), ("value", "v", K))
    }
    attn["out"] = {"kernel": take(p + "self_attn.o_proj.weight", (D, H * E)).T.reshape(H, E, D)}
    mlp: Params = {
        "gate": {"kernel": take(p + "mlp.gate_proj.weight", (F, D)).T},
        "up": {"kernel": take(p + "mlp.up_proj.weight", (F, D)).T},
        "proj": {"kernel": take(p + "mlp.down_proj.weight", (D, F)).T},
    }
    if cfg.qkv_bias:
        for name, x, n in (("query", "q", H), ("key", "k", K), ("value", "v", K)):
            attn[name]["bias"] = take(f"{p}self_attn.{x}_proj.bias", (n * E,)).reshape(n, E)
    if cfg.qk_norm:
        attn["query_norm"] = {"scale": take(p + "self_attn.q_norm.weight", (E,))}
        attn["key_norm"] = {"scale": take(p + "self_attn.k_norm.weight", (E,))}
    if cfg.bias:
        # HF Llama ties o_proj's bias to attention_bias and the MLP's to mlp_bias: the one it lacks is zero.
        attn["out"]["bias"] = take(p + "self_attn.o_proj.bias", (D,), missing_is_zero=True)
        for name, x, n in (("gate", "gate", F), ("up", "up", F), ("proj", "down", D)):
            mlp[name]["bias"] = take(f"{p}mlp.{x}_proj.bias", (n,), missing_is_zero=True)
    return {
        "attn_norm": {"scale": take(p + "input_layernorm.weight", (D,))},
        "attn": attn,
        "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (D,))},
        "mlp": mlp,
    }


def _llama_layer_to_hf(layer: Params, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
    D = cfg.d_model
    attn, mlp = layer["attn"], layer["mlp"]
    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": layer["attn_norm"]["scale"],
        p + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
        p + "self_attn.o_proj.weight": attn["out"]["kernel"].reshape(-1, D).T,
        p + "mlp.gate_proj.weight": mlp["gate"]["kernel"].T,
        p + "mlp.up_proj.weight": mlp["up"]["kernel"].T,
        p + "mlp.down_proj.weight": mlp["proj"]["kernel"].T,
    }
    for name, x in (("query", "q"), ("key", "k"), ("value", "v")):
        kernel_DNE = attn[name]["kernel"]
        out[f"{p}self_attn.{x}_proj.weight"] = kernel_DNE.reshape(D, -1).T
        if cfg.qkv_bias or cfg.bias:  # HF's attention_bias
            bias = attn[name].get("bias", np.zeros(kernel_DNE.shape[1:], np.float32))
            out[f"{p}self_attn.{x}_proj.bias"] = bias.reshape(-1)
    if cfg.qkv_bias or cfg.bias:
        out[p + "self_attn.o_proj.bias"] = attn["out"].get("bias", np.zeros(D, np.float32))
    if cfg.qk_norm:
        out[p + "self_attn.q_norm.weight"] = attn["query_norm"]["scale"]
        out[p + "self_attn.k_norm.weight"] = attn["key_norm"]["scale"]
    if cfg.bias:
        for name, x in (("gate", "gate"), ("up", "up"), ("proj", "down")):
            if hf_model_type(cfg) == "llama":
                out[f"{p}mlp.{x}_proj.bias"] = mlp[name]["bias"]
            elif np.any(mlp[name]["bias"]):  # Qwen3 has no MLP biases: zeros (as load_hf gives them) may go
                raise ConfigError("Qwen3ForCausalLM has no MLP biases and this model's are not zero: set bias=False")
    return out


# ------------------------------------------------------------------------------------------- whole models


def _stack(layers: list[Params], cfg: ModelConfig) -> Params:
    if cfg.scan_layers:
        return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {f"block_{i}": layer for i, layer in enumerate(layers)}


def _unstack(params: Params, cfg: ModelConfig) -> list[Params]:
    if "blocks" in params:
        stacked = jax.tree.map(np.asarray, params["blocks"])
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.n_layers)]
    return [jax.tree.map(np.asarray, params[f"block_{i}"]) for i in range(cfg.n_layers)]


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray] | _Tensors) -> Params:
    """jaxlm params (float32 numpy, laid out for `cfg.scan_layers`) from the tensors of a checkpoint of `cfg`."""
    t = tensors if isinstance(tensors, _Tensors) else _Tensors(tensors)
    D, V = cfg.d_model, cfg.vocab_size
    if hf_model_type(cfg) == "gpt2":
        layers = [_gpt2_layer_from_hf(t.take, cfg, i) for i in range(cfg.n_layers)]
        params: Params = {
            "embed": {"embedding": t.take("wte.weight", (V, D))},
            "pos_embed": {"embedding": t.take("wpe.weight", (cfg.max_seq_len, D))},
            "final_norm": {"scale": t.take("ln_f.weight", (D,))},
        }
        if cfg.bias:
            params["final_norm"]["bias"] = t.take("ln_f.bias", (D,))
    else:
        layers = [_llama_layer_from_hf(t.take, cfg, i) for i in range(cfg.n_layers)]
        params = {
            "embed": {"embedding": t.take("embed_tokens.weight", (V, D))},
            "final_norm": {"scale": t.take("norm.weight", (D,))},
        }
    if cfg.tie_embeddings:
        t.drop("lm_head.weight")  # some checkpoints store the tied copy too
    else:
        params["lm_head"] = {"kernel": t.take("lm_head.weight", (V, D)).T}
    params.update(_stack(layers, cfg))
    t.check_all_taken()
    return params


def params_to_hf(cfg: ModelConfig, params: Params, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The tensors of the transformers model for `cfg`, by their transformers names."""
    layers = _unstack(params, cfg)
    host = jax.tree.map(np.asarray, {k: v for k, v in params.items() if not k.startswith("block")})
    if hf_model_type(cfg) == "gpt2":
        final = host["final_norm"]
        tensors = {
            "transformer.wte.weight": host["embed"]["embedding"],
            "transformer.wpe.weight": host["pos_embed"]["embedding"],
            "transformer.ln_f.weight": final["scale"],
            "transformer.ln_f.bias": final.get("bias", np.zeros(cfg.d_model, np.float32)),
        }
        for i, layer in enumerate(layers):
            tensors.update(_gpt2_layer_to_hf(layer, cfg, i))
    else:
        tensors = {
            "model.embed_tokens.weight": host["embed"]["embedding"],
            "model.norm.weight": host["final_norm"]["scale"],
        }
        for i, layer in enumerate(layers):
            tensors.update(_llama_layer_to_hf(layer, cfg, i))
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = host["lm_head"]["kernel"].T
    out_dtype = np.float32 if dtype == "float32" else jax.numpy.dtype(dtype)
    return {name: np.ascontiguousarray(np.asarray(x, np.float32).astype(out_dtype)) for name, x in tensors.items()}


def _check_tree(cfg: ModelConfig, params: Params) -> None:
    """The params must have exactly the names and shapes the jaxlm model of `cfg` declares."""
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), seq_len=1))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != got:
        wrong = sorted(set(want.items()) ^ set(got.items()))
        raise ConfigError(f"the params do not fit the model of this config (first difference: {wrong[0]})")


def load_hf(path: str) -> tuple[ModelConfig, Params]:
    """The ModelConfig and params (float32 jax arrays, on the default device) of a transformers directory."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{path} has no {CONFIG_FILE}: give a Hugging Face model directory")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf)
    tensors = _Tensors(read_safetensors(path))
    cfg = _apply_jaxlm_settings(cfg, hf, tensors)
    params = params_from_hf(cfg, tensors)
    _check_tree(cfg, params)
    return cfg, jax.tree.map(jax.numpy.asarray, params)


def save_hf(
    cfg: ModelConfig,
    params: Params,
    path: str,
    *,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write a directory that transformers' `from_pretrained` loads and `load_hf` reads back exactly
    (in float32; `dtype="bfloat16"` halves the files at the cost of exactness). Large models are sharded."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r} is not one of float32, bfloat16, float16")
    if cfg.width_ratio != 1.0 or cfg.attention_ratio != 1.0:
        raise ConfigError(
            "a muP model away from its base width scales its logits and attention, which Hugging Face's GPT-2, Llama "
            "and Qwen3 cannot express: export a model at its base width, or one trained with parametrization sp"
        )
    _check_tree(dataclasses.replace(cfg, scan_layers="blocks" in params), params)  # either layout will do
    hf = config_to_hf(cfg, bos_id=bos_id, eos_id=eos_id)
    hf["dtype"] = dtype
    tensors = params_to_hf(cfg, params, dtype)
    os.makedirs(path, exist_ok=True)
    for stale in [WEIGHTS_FILE, INDEX_FILE, *glob.glob("model-*-of-*.safetensors", root_dir=path)]:
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers expects the tensors in its own (PyTorch) layout
    if len(shards) == 1:
        with storage.local_copy(os.path.join(path, WEIGHTS_FILE), "w") as tmp:  # renamed into place once whole
            save_file(shards[0], tmp, metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            with storage.local_copy(os.path.join(path, name), "w") as tmp:
                save_file(shard, tmp, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        storage.write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2))
    storage.write_text(os.path.join(path, CONFIG_FILE), json.dumps(hf, indent=2))
