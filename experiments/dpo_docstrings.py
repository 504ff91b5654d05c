"""Preference tuning with DPO: "write the docstring of this function", preferring the function's own docstring.

What it tests: DPO (Rafailov et al. 2023) on the one training loop, starting from the instruction-tuned
quickstart (`runs/finetune_instruct`; run `python -m experiments.quickstart`, then
`python -m experiments.finetune_instruct`, first). The pairs come from the instruction-tuning data built with
`ast` from the running Python's standard library: the prompt is the function without its docstring, the chosen
answer its docstring's first paragraph, the rejected answer that of another function of the same split (a
seeded derangement). Training pairs come from the files the quickstart model was trained on, validation pairs
from the files it held out. The reference is the frozen starting model; `--finetune.lora-rank 8` trains adapters
instead, with the base weights as the reference.

What it reports: at every evaluation the held-out DPO loss, reward accuracy (how often the chosen answer's
implicit reward beta log(pi/ref) beats the rejected one's), the mean margin and `val_reference_accuracy`, how
often the starting model alone already gives the chosen answer the higher likelihood; the same for each split at
the end (summary.json).

Cost: 150 steps of 8 pairs, four forward passes of 256-token rows each (policy and reference, both answers).

Found (2026-12-07, after `experiments.quickstart` and `experiments.finetune_instruct`; 150 steps in 5.5 min, 12.5
min with the end-of-run scoring of every pair, on two CPU cores shared with a sweep): held-out reward accuracy
0.607 (chance 0.5; the starting model alone prefers the chosen docstring in 0.491), mean margin 0.083, loss 0.693
-> 0.666; on the training pairs 0.606 and 0.118. It rises over the run: 0.552 at step 50, 0.595 at 100.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments.finetune_instruct import EXPERIMENT as INSTRUCT
from experiments.finetune_instruct import FINETUNE as INSTRUCT_FINETUNE
from experiments.finetune_instruct import docstring_examples, write_jsonl
from experiments.quickstart import EXPERIMENT as QUICKSTART
from jaxlm.config import Experiment, OptimConfig, TrainConfig
from jaxlm.finetune import FinetuneConfig, run_finetune

DATA_DIR = os.path.join("runs", "data", "docstrings_dpo")
FILES = {split: os.path.join(DATA_DIR, f"{split}.jsonl") for split in ("train", "validation")}
PAIR_SEED = 0

EXPERIMENT = Experiment(
    name="dpo_docstrings",
    model=INSTRUCT.model,
    data=INSTRUCT.data,  # the pretrained run's tokenizer
    optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=10, weight_decay=0.0),
    train=TrainConfig(steps=150, eval_every=50, log_every=10, init_from=INSTRUCT.run_dir),
    mesh=INSTRUCT.mesh,
)

# The instruction-tuning run's template, row length, LoRA targets and samples; pairs instead of packed examples.
FINETUNE = dataclasses.replace(
    INSTRUCT_FINETUNE, task="dpo", train_file=FILES["train"], val_file=FILES["validation"], pack=False, dpo_beta=0.1
)


def preference_pairs(examples: list[dict], seed: int) -> list[dict]:
    """Each example's prompt with its own answer (chosen) against another example's answer (rejected)."""
    n = len(examples)
    if n < 2:
        return []
    # A shift by 1..n-1 of a random order is a derangement: no example is paired with itself.
    order = np.random.default_rng(seed).permutation(n)
    other = np.empty(n, dtype=int)
    other[order] = order[(np.arange(n) + 1) % n]
    pairs = []
    for i, example in enumerate(examples):
        user, answer = example["messages"]
        rejected = examples[other[i]]["messages"][1]
        if rejected["content"] == answer["content"]:
            continue  # two functions with the same docstring: no preference between them
        pairs.append({"prompt": [user], "chosen": [answer], "rejected": [rejected]})
    return pairs


def build_files(val_fraction: float) -> None:
    """Write train.jsonl and validation.jsonl (once; they depend only on the standard library's source)."""
    if all(os.path.exists(p) for p in FILES.values()):
        return
    os.makedirs(DATA_DIR, exist_ok=True)
    for split, examples in docstring_examples(val_fraction).items():
        write_jsonl(FILES[split], preference_pairs(examples, PAIR_SEED))


def prepare(experiment: Experiment, finetune: FinetuneConfig) -> None:
    """The data files, when the run reads this experiment's own (a missing `runs/finetune_instruct` is reported
    by the run itself)."""
    if finetune.train_file == FILES["train"]:
        build_files(QUICKSTART.data.val_fraction)


def main() -> None:
    run_finetune(EXPERIMENT, FINETUNE, prepare=prepare)


if __name__ == "__main__":
    main()
