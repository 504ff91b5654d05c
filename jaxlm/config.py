"""Frozen dataclasses that describe a run, validated as they are built.

An `Experiment` holds one of each section; `jaxlm.cli.run` overrides fields from the command line
(`--section.field value`). Every check raises `ConfigError` with a message that names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from jaxlm.errors import ConfigError

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
# A family is a preset of architecture features: it fills the features a config leaves as None.
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", qk_norm=False, bias=True, tie_embeddings=True),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False, bias=False, tie_embeddings=False),
    # Qwen3 ties its embeddings up to 4B parameters and unties them from 8B: set tie_embeddings=False for those.
    "qwen3": dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=True),
}
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("auto", "none", "full", "dots", "attn_mlp")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum", "blocked", "splash")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw",)
# The model's vocabulary may exceed a trained tokenizer's only by padding it to a multiple of this.
VOCAB_PADDING = 128


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


SPLASH_MIN_BLOCK = 128  # the smallest block of queries and keys the splash-attention kernel takes


def check_splash_length(seq_len: int) -> None:
    """ConfigError unless the splash-attention kernel can take sequences of `seq_len` tokens."""
    up = -(-seq_len // SPLASH_MIN_BLOCK) * SPLASH_MIN_BLOCK
    _require(
        seq_len % SPLASH_MIN_BLOCK == 0,
        f"attention='splash' needs a sequence length that is a multiple of {SPLASH_MIN_BLOCK}, got {seq_len}: use "
        f"DataConfig.seq_len={max(SPLASH_MIN_BLOCK, up - SPLASH_MIN_BLOCK)} or {up}, or ModelConfig.attention='auto'",
    )


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{type(obj).__name__}.{name} must be positive, got {value}")


def _one_of(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in choices, f"{type(obj).__name__}.{name}={value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    """The Transformer, described by its architecture features.

    `family` names a preset (FAMILIES) that fills every feature left as None; a feature given keeps its value, so
    `ModelConfig(family="llama", mlp="gelu")` is a Llama with a GELU MLP. Shape fields left as None follow their
    rule (n_kv_heads = n_heads, head_dim = d_model // n_heads, d_ff by the MLP).
    """

    family: str = "gpt2"  # the preset that fills the features left None: gpt2 | llama | qwen3
    # Features (None: the family's).
    positions: str | None = None  # learned (an embedding per position) | rope (rotary, on queries and keys)
    norm: str | None = None  # layernorm (with a shift when `bias`) | rmsnorm
    mlp: str | None = None  # gelu (tanh GELU, two matrices) | swiglu (SiLU-gated, three matrices)
    qk_norm: bool | None = None  # RMSNorm on each head's queries and keys, before RoPE (Qwen3)
    bias: bool | None = None  # biases on linear layers and LayerNorm
    qkv_bias: bool | None = None  # bias on q, k, v only (None: same as `bias`)
    tie_embeddings: bool | None = None  # the output matrix is the token embedding's transpose
    # Shape.
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (MHA); fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // n_heads; set, the heads' width is independent of d_model
    d_ff: int | None = None  # None: 4 d_model (gelu) or Llama's 8/3 d_model rounded up to 256 (swiglu)
    vocab_size: int = 4096
    max_seq_len: int = 1024
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters are always float32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 0.0  # > 0: Llama 3 frequency scaling of RoPE
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    init_std: float = 0.02
    # sp: standard parametrization. mup: the maximal update parametrization (Yang et al. 2022, Tensor Programs V)
    # relative to a model of width mup_base_width, where it equals sp: hidden matrices initialised with std
    # init_std sqrt(base/width) and trained at Adam learning rate lr base/width (jaxlm.optim), logits multiplied
    # by base/width, attention logits scaled as 1/head_dim rather than 1/sqrt(head_dim).
    parametrization: str = "sp"
    mup_base_width: int = 0  # mup: the width d_model whose learning rate and initialisation the others inherit
    # mup: the head width at the base width; 0: the heads widen with the model (head_dim x base / width). Set it to
    # head_dim when widths add heads of a fixed size (then the attention scale does not change).
    mup_base_head_dim: int = 0
    # What the backward pass recomputes: none | full | dots (keep matmul outputs) | attn_mlp (keep block outputs);
    # auto: dots on CPU (recomputing elementwise work beats storing it there), none on accelerators.
    remat: str = "auto"
    # nn.scan over the blocks: one block compiled and iterated, so compile time stays flat in depth; parameters
    # are stacked under `blocks` with a leading layers axis. False: the blocks unrolled (block_0, block_1, ...).
    scan_layers: bool = True
    # xla: jax.nn.dot_product_attention's XLA form; cudnn: its fused GPU kernel; splash: jax's Pallas TPU kernel
    # (sequences a multiple of 128; interpreted, slowly, off TPU); einsum: written out; blocked: written out one
    # block of queries at a time, skipping masked key blocks. auto, by the devices the step is compiled for:
    # splash on TPU, cudnn on GPU in bfloat16/float16, on CPU blocked beyond one block (128) else xla.
    attention: str = "auto"
    # Positions per chunk of the loss: the float32 logits [B, T, V] never exist at once, only [B, chunk, V], and
    # the backward pass computes them again instead of storing them. 0: the whole sequence at once; auto: 512 on
    # accelerators, 0 on CPU.
    loss_chunk: int | str = "auto"

    def __post_init__(self):
        # Resolved here, so that asdict (config.json) holds every feature, and a config.json written before a
        # feature existed (it has `family` only) loads to the same model and compares equal on resume.
        _one_of(self, "family", tuple(FAMILIES))
        for name, value in FAMILIES[self.family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _one_of(self, "positions", POSITIONS)
        _one_of(self, "norm", NORMS)
        _one_of(self, "mlp", MLPS)
        _positive(self, "n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len", "norm_eps", "init_std")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            _require(
                self.d_model % self.n_heads == 0,
                f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set head_dim)",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff is None:
            d_ff = 4 * self.d_model if self.mlp == "gelu" else 256 * -(-(8 * self.d_model // 3) // 256)
            object.__setattr__(self, "d_ff", d_ff)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)
        _positive(self, "n_kv_heads", "head_dim", "d_ff")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"ModelConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}",
        )
        _require(
            self.head_dim % 2 == 0 or self.positions != "rope",
            f"ModelConfig.head_dim={self.head_dim}: RoPE needs an even head_dim",
        )
        _require(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        _one_of(self, "dtype", DTYPES)
        _one_of(self, "remat", REMAT_POLICIES)
        _one_of(self, "attention", ATTENTION_IMPLS)
        _one_of(self, "parametrization", ("sp", "mup"))
        _require(
            self.parametrization == "sp" or self.mup_base_width > 0,
            "ModelConfig.parametrization='mup' needs the base width: set --model.mup-base-width (e.g. the proxy "
            "model's d_model)",
        )

        _require(
            self.loss_chunk == "auto" or (isinstance(self.loss_chunk, int) and self.loss_chunk >= 0),
            f"ModelConfig.loss_chunk={self.loss_chunk!r} must be 'auto' or a number of positions >= 0 (0: no chunks)",
        )

    @property
    def width_ratio(self) -> float:
        """base width / d_model under muP (what hidden learning rates, init variances and logits are scaled by);
        1 under sp."""
        return self.mup_base_width / self.d_model if self.parametrization == "mup" else 1.0

    @property
    def attention_ratio(self) -> float:
        """muP's attention logit scale relative to 1/sqrt(head_dim): sqrt(base head width / head_dim); 1 under sp."""
        if self.parametrization != "mup":
            return 1.0
        base = self.mup_base_head_dim or self.head_dim * self.width_ratio
        return (base / self.head_dim) ** 0.5

    @property
    def architecture(self) -> str:
        """The family, and the features where they differ from its preset: "llama", "gpt2 (bias=False)"."""
        changed = [f"{k}={getattr(self, k)}" for k, v in FAMILIES[self.family].items() if getattr(self, k) != v]
        return f"{self.family} ({', '.join(changed)})" if changed else self.family

    def rule(self, name: str) -> Any:
        """The value the derived field `name` takes when left None, the other fields as they are (None when this
        config has no valid value by rule, e.g. head_dim where d_model is not divisible by n_heads)."""
        try:
            return getattr(dataclasses.replace(self, **{name: None}), name)
        except ConfigError:
            return None

    def replace(self, **changes: Any) -> ModelConfig:
        """`dataclasses.replace` that derives again the fields the changes leave open.

        A field still at the value its rule gives it (d_ff = 4 d_model, say, or a feature of the family) follows
        the new fields, so `cfg.replace(d_model=256)` gets d_ff 1024 and `cfg.replace(family="llama")` Llama's
        features; a field set to anything else keeps its value.
        """
        return ModelConfig(**{**dataclasses.asdict(self.open_derived()), **changes})

    def open_derived(self) -> ModelConfig:
        """A copy whose derived fields still at their rule's value are None again (unvalidated: for parsers)."""
        opened = copy.copy(self)
        for name in DERIVED_FIELDS:
            if getattr(self, name) == self.rule(name):
                object.__setattr__(opened, name, None)
        return opened


# Fields whose None means "by rule" (the family's preset, or a rule of the shape): resolved in __post_init__,
# derived again by ModelConfig.replace and by command-line overrides (jaxlm.cli).
DERIVED_FIELDS = (
    "positions", "norm", "mlp", "qk_norm", "bias", "qkv_bias", "tie_embeddings", "n_kv_heads", "head_dim", "d_ff"
)


@dataclass(frozen=True)
class DataConfig:
    """The corpus, its tokenizer, and the batches the model sees."""

    # pystdlib (the standard library's .py files) | pysrc (every .py file of the standard library and the
    # environment's site-packages, one document per distinct content) | text:<glob> | tfds:<name>[:<version>] |
    # shards:<glob>[,<glob>...] (local or gs:// files of .jsonl,
    # .jsonl.gz, .jsonl.zst, .json.gz JSON lines or .parquet; tokenized once into token shards under data_dir)
    source: str = "pystdlib"
    # sentencepiece-bpe | sentencepiece-unigram | byte | char | <path>.model | <path>/tokenizer.json | a Hugging
    # Face model directory (its tokenizer.model, else its tokenizer.json with the special tokens it declares)
    tokenizer: str = "sentencepiece-bpe"
    vocab_size: int = 4096  # for trained tokenizers; byte and char tokenizers have their own size
    seq_len: int = 256
    batch_size: int = 16  # global batch, in sequences
    cache_dir: str = ""  # prepared corpora and tokenizers; "" means ~/.cache/jaxlm
    val_fraction: float = 0.05
    num_workers: int = 0  # grain worker processes; 0 reads in the main process
    text_field: str = "text"  # the text field of .jsonl files and TFDS datasets
    train_split: str = "train"
    val_split: str = "validation"
    tfds_data_dir: str = ""
    document_mask: bool = False  # segment ids so attention never crosses a document boundary
    # Training reads each epoch's rows in a random order (documents are still packed in the epoch's order): on a
    # corpus of very uneven documents (pysrc's largest file is 1.3 MB), batches then come from all over the corpus
    # rather than from one long file for hundreds of steps. Streamed TFDS corpora ignore it.
    shuffle_rows: bool = False
    skip_bad_lines: bool = False
    tokenizer_sample_bytes: int = 20_000_000
    # shards: sources only. The validation split's own files (<glob>[,<glob>...], e.g. C4's c4-validation.*);
    # "": a stable hash of each document's text puts val_fraction of them in validation.
    val_source: str = ""
    data_dir: str = ""  # prepared token shards (local or gs://); "" means <cache_dir>/prepared
    prepare_workers: int = 0  # processes tokenizing on each host; 0 means one per CPU core

    def __post_init__(self):
        _positive(self, "vocab_size", "seq_len", "batch_size", "tokenizer_sample_bytes")
        _require(0.0 < self.val_fraction < 1.0, f"DataConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.num_workers >= 0, f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        source_ok = self.source in ("pystdlib", "pysrc") or self.source.startswith(("text:", "tfds:", "shards:"))
        _require(
            source_ok,
            f"DataConfig.source={self.source!r}: use pystdlib, pysrc, text:<glob>, shards:<glob>[,<glob>...] or "
            "tfds:<name>[:<version>]",
        )
        shards = self.source.startswith("shards:")
        _require(
            shards or not self.val_source,
            f"DataConfig.val_source is for shards: sources, not {self.source!r}: leave it empty",
        )
        _require(
            not shards or self.tokenizer != "char",
            "DataConfig.tokenizer=char needs a pass over the whole corpus: use byte or sentencepiece-bpe with "
            "shards: sources",
        )
        _require(self.prepare_workers >= 0, f"DataConfig.prepare_workers must be >= 0, got {self.prepare_workers}")

    @property
    def resolved_cache_dir(self) -> str:
        return os.path.expanduser(self.cache_dir or os.path.join("~", ".cache", "jaxlm"))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a learning-rate schedule, global-norm clipping and decoupled weight decay on matrices."""

    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the final fraction of steps over which the rate decays to min_lr
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables clipping

    def __post_init__(self):
        _one_of(self, "name", OPTIMIZERS)
        _one_of(self, "schedule", SCHEDULES)
        _positive(self, "lr", "eps")
        _require(0.0 <= self.min_lr <= self.lr, f"OptimConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _require(self.warmup_steps >= 0, f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0.0 < self.decay_fraction <= 1.0, f"OptimConfig.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _require(self.weight_decay >= 0.0, f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")
        _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "OptimConfig.b1 and b2 must be in [0, 1)")
        _require(self.grad_clip >= 0.0, f"OptimConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, evaluation, checkpoints, logging."""

    steps: int = 1000
    out_dir: str = ""  # the run directory; "" means runs/<experiment name>
    eval_every: int = 200
    eval_steps: int = 10  # batches per evaluation: the same rows each time, drawn from all over the validation split
    ckpt_every: int = 500
    ckpt_every_minutes: float = 0.0  # also save when this long has passed since the last save (0: off)
    log_every: int = 10
    seed: int = 0
    grad_accum: int = 1  # microbatches per step
    keep_checkpoints: int = 3
    keep_best: bool = False  # also keep the checkpoint with the lowest validation loss
    async_checkpoints: bool = True  # write checkpoints in the background while training goes on
    skip_nonfinite: bool = False  # skip an update whose loss or gradient norm is not finite
    max_nonfinite: int = 3  # stop after this many skipped updates in a row
    init_from: str = ""  # a run directory or checkpoint path whose params initialise this run
    samples: int = 3  # samples written to samples.txt at the end (0: none)
    sample_tokens: int = 128
    tensorboard: bool = True  # TensorBoard event files in the run directory, beside metrics.jsonl
    wandb_project: str = ""  # also log to this Weights & Biases project ("" : off; needs `pip install wandb`)
    wandb_entity: str = ""  # the W&B team or user ("" : your default)
    wandb_name: str = ""  # the W&B run's display name ("" : the experiment's name)
    wandb_tags: tuple[str, ...] = ()
    profile_steps: str = ""  # "a:b": a jax.profiler trace of steps a to b-1 into the run directory ("" : none)

    def __post_init__(self):
        _positive(self, "steps", "eval_every", "eval_steps", "ckpt_every", "log_every", "grad_accum")
        _positive(self, "keep_checkpoints", "max_nonfinite", "sample_tokens")
        _require(self.samples >= 0, f"TrainConfig.samples must be >= 0, got {self.samples}")
        _require(
            self.ckpt_every_minutes >= 0,
            f"TrainConfig.ckpt_every_minutes must be >= 0 (0 disables), got {self.ckpt_every_minutes}",
        )
        object.__setattr__(self, "wandb_tags", tuple(self.wandb_tags))  # config.json holds a list
        if self.profile_steps:
            self.profiled_steps()  # raises on a malformed range

    def profiled_steps(self) -> range:
        """The steps `profile_steps` names (empty when it is "")."""
        if not self.profile_steps:
            return range(0)
        first, sep, end = self.profile_steps.partition(":")
        try:
            a, b = int(first), int(end)
        except ValueError:
            a = b = 0
        _require(
            bool(sep) and 1 <= a < b,
            f"TrainConfig.profile_steps={self.profile_steps!r} must be 'a:b' with 1 <= a < b (steps a to b-1), "
            "e.g. --train.profile-steps 10:13",
        )
        return range(a, b)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes (one size may be -1: the remaining devices) and multi-process start-up."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    coordinator_address: str = ""  # host:port of process 0; "" lets JAX detect a TPU pod or cluster
    num_processes: int = 0
    process_id: int = -1
    init_timeout_s: int = 300

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            _require(size == -1 or size > 0, f"MeshConfig.{name} must be positive or -1, got {size}")
        _require(list(sizes.values()).count(-1) <= 1, "MeshConfig: at most one of data, fsdp, tensor may be -1")
        if self.coordinator_address:
            _require(self.num_processes > 0, "MeshConfig.num_processes must be set with coordinator_address")
            _require(
                0 <= self.process_id < self.num_processes,
                f"MeshConfig.process_id must be in [0, {self.num_processes}), got {self.process_id}",
            )


@dataclass(frozen=True)
class Experiment:
    """One run: a name and one of each section."""

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        _require(bool(self.name) and "/" not in self.name, f"Experiment.name={self.name!r} must be a non-empty word")
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"DataConfig.seq_len={self.data.seq_len} is beyond ModelConfig.max_seq_len={self.model.max_seq_len}",
        )
        if self.model.attention == "splash":
            check_splash_length(self.data.seq_len)
        trained = self.data.tokenizer.startswith("sentencepiece-")
        _require(
            not trained or self.data.vocab_size <= self.model.vocab_size,
            f"ModelConfig.vocab_size={self.model.vocab_size} is smaller than DataConfig.vocab_size="
            f"{self.data.vocab_size}: set --model.vocab-size to at least {self.data.vocab_size}",
        )
        padded = -(-self.data.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
        _require(
            not trained or self.model.vocab_size <= padded,
            f"ModelConfig.vocab_size={self.model.vocab_size} is beyond the tokenizer's DataConfig.vocab_size="
            f"{self.data.vocab_size} (rows it never produces, which samples could still draw): set --model.vocab-size "
            f"{self.data.vocab_size} (up to {padded} to pad), or --data.vocab-size {self.model.vocab_size}",
        )
        _require(
            self.data.batch_size % self.train.grad_accum == 0,
            f"DataConfig.batch_size={self.data.batch_size} must be divisible by TrainConfig.grad_accum="
            f"{self.train.grad_accum}",
        )

    def check_warmup(self) -> None:
        """A warmup asked for beyond the run's last step is a ConfigError. Not checked when a config is built:
        a run shortened from an experiment keeps that experiment's warmup, which the schedule then cuts to the
        run (jaxlm.optim); the command line checks it when it sets the warmup."""
        _require(
            self.optim.warmup_steps <= self.train.steps,
            f"OptimConfig.warmup_steps={self.optim.warmup_steps} is longer than the run's TrainConfig.steps="
            f"{self.train.steps}: set --optim.warmup-steps to at most {self.train.steps}",
        )

    @property
    def run_dir(self) -> str:
        return self.train.out_dir or os.path.join("runs", self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "mesh": MeshConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                known = {f.name for f in dataclasses.fields(sections[key])}
                unknown = set(value) - known
                _require(not unknown, f"unknown {key} fields: {', '.join(sorted(unknown))}")
                kwargs[key] = sections[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _gpt2(n_layers: int, d_model: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        family="gpt2", n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab_size=50257, max_seq_len=1024
    )


# Published models, with the shapes of their released checkpoints.
PRESETS: dict[str, ModelConfig] = {
    "gpt2-124m": _gpt2(12, 768, 12),
    "gpt2-355m": _gpt2(24, 1024, 16),
    "gpt2-774m": _gpt2(36, 1280, 20),
    "gpt2-1.5b": _gpt2(48, 1600, 25),
    "llama2-7b": ModelConfig(
        family="llama", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=32000,
        max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    ),
    "llama3-8b": ModelConfig(
        family="llama", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256,
        max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5,
    ),
    "llama3.2-1b": ModelConfig(
        family="llama", n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192, vocab_size=128256,
        max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
        rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
    ),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", n_layers=28, d_model=1024, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072,
        vocab_size=151936, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True,
    ),
}
