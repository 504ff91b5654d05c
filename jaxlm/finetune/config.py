"""The finetuning config (`FinetuneConfig`), the package's constants and the config checks shared by the tasks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jaxlm import lora as lora_lib
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError

TASKS = ("classify", "instruct", "dpo")
LAYOUTS = ("auto", "alpaca", "chat")
ROLES = ("system", "user", "assistant")
FINETUNE_FILE = "finetune.json"
LABELS_FILE = "labels.json"
CLASSIFIER_FILE = "classifier.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

Params = dict[str, Any]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class FinetuneConfig:
    """What a finetuning run learns from, and which parameters it trains."""

    task: str = "classify"  # classify | instruct | dpo (preference pairs)
    train_file: str = ""
    val_file: str = ""  # "" skips validation
    test_file: str = ""  # "" skips the test split
    text_column: str = "text"  # classify
    label_column: str = "label"  # classify
    labels: tuple[str, ...] = ()  # classify: the classes in id order; () takes the sorted labels of train_file
    balanced: bool = False  # classify: draw every class equally often
    layout: str = "auto"  # instruct, dpo: alpaca | chat | auto (each line by its fields)
    pack: bool = False  # instruct: several examples per row (attention kept inside each)
    max_len: int = 256  # tokens the model reads per example (classify: with both end tokens) or per row
    truncate: bool = True  # an example longer than max_len is cut (and counted); False: it is an error
    train_last_k: int = -1  # -1 trains everything; k >= 0 only the last k blocks, the final norm and the head
    lora_rank: int = 0  # > 0: train low-rank adapters (and the classifier head) instead of the weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    dpo_beta: float = 0.1  # dpo: the strength of the KL tie to the reference model (Rafailov et al. 2023's beta)
    samples: int = 3  # instruct, dpo: validation prompts answered greedily at the end (samples.txt)
    sample_tokens: int = 96

    def __post_init__(self):
        _require(self.task in TASKS, f"FinetuneConfig.task={self.task!r} is not one of {', '.join(TASKS)}")
        _require(bool(self.train_file), "FinetuneConfig.train_file is empty: set --finetune.train-file")
        _require(self.layout in LAYOUTS, f"FinetuneConfig.layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")
        _require(self.max_len >= 3, f"FinetuneConfig.max_len must be at least 3, got {self.max_len}")
        _require(
            self.train_last_k >= -1, f"FinetuneConfig.train_last_k must be -1 (all) or >= 0, got {self.train_last_k}"
        )
        _require(self.lora_rank >= 0, f"FinetuneConfig.lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        _require(
            self.lora_rank == 0 or self.train_last_k == -1,
            "FinetuneConfig.lora_rank and train_last_k are alternatives: set one of them",
        )
        _require(self.samples >= 0, f"FinetuneConfig.samples must be >= 0, got {self.samples}")
        _require(self.sample_tokens > 0, f"FinetuneConfig.sample_tokens must be positive, got {self.sample_tokens}")
        _require(
            not self.balanced or self.task == "classify", "FinetuneConfig.balanced applies to --finetune.task classify"
        )
        _require(not self.pack or self.task == "instruct", "FinetuneConfig.pack applies to --finetune.task instruct")
        _require(self.dpo_beta > 0, f"FinetuneConfig.dpo_beta must be positive, got {self.dpo_beta}")
        _require(len(set(self.labels)) == len(self.labels), f"FinetuneConfig.labels repeats a label: {self.labels}")
        _require(len(self.labels) != 1, "FinetuneConfig.labels needs at least two classes")
        _ = self.lora  # building the spec runs its checks

    @property
    def lora(self) -> lora_lib.LoraSpec | None:
        if self.lora_rank == 0:
            return None
        return lora_lib.LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _require(not unknown, f"unknown finetune fields: {', '.join(sorted(unknown))}")
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})


def check_experiment(experiment: Experiment, ft: FinetuneConfig) -> None:
    """The checks that need both configs."""
    _require(
        ft.max_len <= experiment.model.max_seq_len,
        f"FinetuneConfig.max_len={ft.max_len} is beyond the model's context of {experiment.model.max_seq_len}: "
        f"lower --finetune.max-len",
    )
