"""A PyTorch reference of jaxlm's Transformer and train step, for comparing step times in the same process.

It is the loop a PyTorch user would otherwise write (nanoGPT style, eager mode): the same architecture and
dimensions as `jaxlm.model.Transformer` for a `ModelConfig`, read from its features (pre-norm blocks; learned
positions or RoPE; LayerNorm or RMSNorm; tanh GELU or SwiGLU; q/k RMSNorm; grouped-query attention; tied or
separate output matrix), causal `scaled_dot_product_attention`, AdamW with weight decay on matrices only, and
global-norm clipping. A feature value it does not implement is a ConfigError, never a different model.
It exists for benchmarks (`python -m tools.bench train --torch`); torch is not a dependency of jaxlm.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError

# The feature values this reference implements; jaxlm may know more.
IMPLEMENTED = {"positions": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu")}


def check_implemented(cfg: ModelConfig) -> None:
    for name, values in IMPLEMENTED.items():
        if getattr(cfg, name) not in values:
            raise ConfigError(
                f"the PyTorch reference does not implement {name}={getattr(cfg, name)!r} (only {', '.join(values)}): "
                "compare without --torch"
            )


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return _RMSNorm(cfg.d_model, cfg.norm_eps)


def _rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, E/2] for rotating pairs (i, i + E/2), with Llama 3's frequency scaling when configured."""
    e = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float32) / e))
    if cfg.rope_scaling_factor > 0:
        factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > cfg.rope_original_max_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= cfg.rope_original_max_len / high) & (wavelen <= cfg.rope_original_max_len / low)
        inv_freq = torch.where(medium, interpolated, scaled)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def _rotate(x, cos, sin):
    """x [B, H, T, E]; cos, sin [T, E/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, h, k = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        # One fused q|k|v matrix, as nanoGPT does: the same parameters as jaxlm's three projections.
        self.qkv = nn.Linear(cfg.d_model, (h + 2 * k) * e, bias=cfg.qkv_bias)
        self.out = nn.Linear(h * e, cfg.d_model, bias=cfg.bias)
        self.q_norm = _RMSNorm(e, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = _RMSNorm(e, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope):
        cfg = self.cfg
        B, T, _ = x.shape
        e, h, k = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        q, kk, v = self.qkv(x).split([h * e, k * e, k * e], dim=-1)
        q = q.view(B, T, h, e).transpose(1, 2)
        kk = kk.view(B, T, k, e).transpose(1, 2)
        v = v.view(B, T, k, e).transpose(1, 2)
        if self.q_norm is not None:
            q, kk = self.q_norm(q), self.k_norm(kk)
        if rope is not None:
            q, kk = _rotate(q, *rope), _rotate(kk, *rope)
        y = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=h != k)
        return self.out(y.transpose(1, 2).reshape(B, T, h * e))


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gelu = cfg.mlp == "gelu"
        if self.gelu:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        else:
            self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.gelu:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = _norm(cfg), _Attention(cfg)
        self.mlp_norm, self.mlp = _norm(cfg), _MLP(cfg)

    def forward(self, x, rope):
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class TorchTransformer(nn.Module):
    """tokens [B, T] -> logits [B, T, V]: the PyTorch twin of `jaxlm.model.Transformer` (no dropout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_implemented(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = _norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep ones/zeros, biases zeros
            std = out_std if name.endswith(("attn.out.weight", "mlp.proj.weight")) else cfg.init_std
            nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=tokens.device))
        else:
            rope = _rope_tables(self.cfg, T)
        for block in self.blocks:
            x = block(x, rope)
        x = self.final_norm(x)
        return x @ self.embed.weight.T if self.lm_head is None else self.lm_head(x)


def _layer(params: dict, name: str, i: int) -> dict:
    """Layer i's parameters, from scanned (`blocks`, leading layer axis) or unrolled (`block_<i>`) trees."""
    if "blocks" in params:
        import jax

        return jax.tree.map(lambda a: a[i], params["blocks"][name])
    return params[f"block_{i}"][name]


@torch.no_grad()
def load_jaxlm_params(model: TorchTransformer, params: dict) -> None:
    """Copy a jaxlm parameter tree (`jaxlm.model.init_params`) into the reference, so both compute the same."""
    import numpy as np

    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    cfg = model.cfg
    model.embed.weight.copy_(t(params["embed"]["embedding"]))
    if model.pos_embed is not None:
        model.pos_embed.weight.copy_(t(params["pos_embed"]["embedding"]))
    if model.lm_head is not None:
        model.lm_head.weight.copy_(t(params["lm_head"]["kernel"]).T)

    def norm(module: nn.Module, p: dict) -> None:
        module.weight.copy_(t(p["scale"]))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(t(p["bias"]))

    norm(model.final_norm, params["final_norm"])
    for i, block in enumerate(model.blocks):
        attn, mlp = _layer(params, "attn", i), _layer(params, "mlp", i)
        norm(block.attn_norm, _layer(params, "attn_norm", i))
        norm(block.mlp_norm, _layer(params, "mlp_norm", i))
        # jaxlm's kernels are [D, heads, E] (input first); torch's Linear weights are [out, in].
        qkv = [t(attn[n]["kernel"]).reshape(cfg.d_model, -1) for n in ("query", "key", "value")]
        block.attn.qkv.weight.copy_(torch.cat(qkv, dim=1).T)
        if block.attn.qkv.bias is not None:
            block.attn.qkv.bias.copy_(torch.cat([t(attn[n]["bias"]).reshape(-1) for n in ("query", "key", "value")]))
        block.attn.out.weight.copy_(t(attn["out"]["kernel"]).reshape(-1, cfg.d_model).T)
        if block.attn.out.bias is not None:
            block.attn.out.bias.copy_(t(attn["out"]["bias"]))
        if block.attn.q_norm is not None:
            block.attn.q_norm.weight.copy_(t(attn["query_norm"]["scale"]))
            block.attn.k_norm.weight.copy_(t(attn["key_norm"]["scale"]))
        if block.mlp.gelu:
            block.mlp.fc.weight.copy_(t(mlp["fc"]["kernel"]).T)
            if block.mlp.fc.bias is not None:
                block.mlp.fc.bias.copy_(t(mlp["fc"]["bias"]))
        else:
            block.mlp.gate_up.weight.copy_(torch.cat([t(mlp["gate"]["kernel"]), t(mlp["up"]["kernel"])], dim=1).T)
            if block.mlp.gate_up.bias is not None:
                block.mlp.gate_up.bias.copy_(torch.cat([t(mlp["gate"]["bias"]), t(mlp["up"]["bias"])]))
        block.mlp.proj.weight.copy_(t(mlp["proj"]["kernel"]).T)
        if block.mlp.proj.bias is not None:
            block.mlp.proj.bias.copy_(t(mlp["proj"]["bias"]))


def make_optimizer(model: nn.Module, experiment: Experiment) -> torch.optim.Optimizer:
    """AdamW with decay on matrices (and embeddings) only, like `jaxlm.optim.make_optimizer`."""
    o = experiment.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: the multi-tensor update a current PyTorch training loop uses by default on CPU as well.
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, foreach=True)


def make_train_step(experiment: Experiment, seed: int = 0) -> tuple[Callable[[torch.Tensor], float], TorchTransformer]:
    """A step function taking int64 tokens [B, T + 1] (inputs then shifted targets) and returning nothing.

    The step runs forward, cross-entropy, backward, clipping and AdamW, all in float32 on the CPU; it returns
    the loss as a tensor (reading it would add a sync PyTorch does not need, so the caller decides).
    """
    torch.manual_seed(seed)
    model = TorchTransformer(experiment.model)
    opt = make_optimizer(model, experiment)
    clip = experiment.optim.grad_clip
    vocab = experiment.model.vocab_size

    def step(tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()
        return loss.detach()

    return step, model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
