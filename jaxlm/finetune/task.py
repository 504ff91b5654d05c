"""What the finetuning tasks share as Tasks of the one training loop (`jaxlm.train.fit`): the pretrained start,
which of its parameters are trained (all, the last k blocks, or LoRA adapters), and batches with a saveable
position.

The backbone's params keep the logical axis names of the pretrained model, so that the loop shards them over the
mesh like pretraining does; a classifier head and LoRA adapters are small and replicated.
"""

from __future__ import annotations

import abc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lora as lora_lib
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError
from jaxlm.finetune.backbone import last_k_mask, load_base, load_tokenizer
from jaxlm.finetune.config import FinetuneConfig, Params, check_experiment
from jaxlm.finetune.data import EpochBatches, fixed_batches, process_rows
from jaxlm.finetune.rundir import write_or_check_finetune
from jaxlm.model import Transformer


class FinetuneTask(abc.ABC):
    """The shared part of a finetuning Task; subclasses supply the data, the loss and the evaluation."""

    tokens_per_step = None  # examples, not a token stream: no tokens/s or MFU figures
    flops_per_token = None
    keeps_lm_head = True  # False: the task replaces the output projection (a classifier head)

    def __init__(self, experiment: Experiment, ft: FinetuneConfig):
        self.experiment, self.ft = experiment, ft
        self.base: Params | None = None  # the pretrained backbone, until it is placed on the devices
        self.tokenizer = None

    # ---------------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        self.experiment, base = load_base(self.experiment)
        check_experiment(self.experiment, self.ft)
        n_layers = self.experiment.model.n_layers
        if self.ft.train_last_k > n_layers:
            raise ConfigError(f"FinetuneConfig.train_last_k={self.ft.train_last_k} exceeds the model's {n_layers} blocks")
        write_or_check_finetune(self.experiment.run_dir, self.ft)
        self.tokenizer = load_tokenizer(self.experiment)
        self.base = self._backbone(base)
        self.read_data()

    @abc.abstractmethod
    def read_data(self) -> None:
        """Read and encode the task's files."""

    def _backbone(self, params: Params) -> Params:
        return params if self.keeps_lm_head else {k: v for k, v in params.items() if k != "lm_head"}

    # ---------------------------------------------------------------------------------------------- params

    def boxed_backbone(self) -> Params:
        cfg = self.experiment.model
        tokens = jnp.zeros((1, 1), jnp.int32)
        boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens)["params"])
        return self._backbone(boxed)

    def abstract_adapters(self) -> Params:
        backbone = nn.unbox(self.boxed_backbone())
        return jax.eval_shape(lambda: lora_lib.init_lora(self.experiment.model, backbone, self.ft.lora, jax.random.key(0)))

    def place_backbone(self, shardings: Params) -> Params:
        base, self.base = self.base, None  # the host copy is not needed once placed
        return jax.tree.map(lambda x, s: jax.device_put(x, s), base, shardings)

    def init_adapters(self, rng: jax.Array, shardings: Params) -> Params:
        cfg, spec, backbone = self.experiment.model, self.ft.lora, nn.unbox(self.boxed_backbone())
        return jax.jit(lambda key: lora_lib.init_lora(cfg, backbone, spec, key), out_shardings=shardings)(rng)

    def backbone_mask(self) -> Params | None:
        """1/0 per backbone parameter (per layer for scanned blocks) when only the last k blocks train."""
        if self.ft.lora is not None or self.ft.train_last_k < 0:
            return None
        return last_k_mask(self.experiment.model, nn.unbox(self.boxed_backbone()), self.ft.train_last_k)

    def count_trainable(self) -> int:
        trainable, _ = self.abstract_params()
        leaves = jax.tree.leaves(nn.unbox(trainable))
        mask = self.update_mask()
        if mask is None:
            return sum(int(np.prod(x.shape)) for x in leaves)
        return sum(int(np.sum(np.broadcast_to(m, x.shape))) for x, m in zip(leaves, jax.tree.leaves(mask)))

    def uses_dropout(self) -> bool:
        lora = self.ft.lora
        return self.experiment.model.dropout > 0 or (lora is not None and lora.dropout > 0)

    # --------------------------------------------------------------------------------------------- batches

    @abc.abstractmethod
    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        """The training rows of one epoch, a pure function of the epoch (and the seed)."""

    def train_batches(self) -> EpochBatches:
        return EpochBatches(
            self.epoch_rows, self.experiment.data.batch_size, jax.process_index(), jax.process_count()
        )

    def split_batches(self, arrays: dict[str, np.ndarray], valid: str):
        """This process's rows of a whole split in batches, the padding rows' `valid` field zeroed."""
        for batch, real in fixed_batches(arrays, self.experiment.data.batch_size):
            batch[valid] = batch[valid].copy()
            batch[valid][real:] = 0
            yield process_rows(batch, jax.process_index(), jax.process_count())
