"""Finetuning a pretrained model: a classifier, or an assistant (instruction tuning, then preference tuning with
DPO), fully or with LoRA.

A finetuning run is an `Experiment` (model, tokenizer, optimizer, steps, batch size, seed, run directory;
`TrainConfig.init_from` names the pretrained weights: a jaxlm run directory, a checkpoint step directory, or a
Hugging Face model directory) plus a `FinetuneConfig` (the task, its files, and what is trained). An experiment
module hands both to `run_finetune`, which applies `--section.field` and `--finetune.field` overrides.

Classification: the model's final hidden state at the last token of each example (an end-of-sequence token
closes every example) goes through a linear head that replaces the LM head. Inputs are CSV, TSV or JSONL files
with a text and a label column; label ids are stored with the run (labels.json); loss and accuracy on every
split, a confusion matrix at the end (confusion.txt, confusion.json).

Instruction tuning: JSONL in the Alpaca layout (instruction, optional input, output) or the chat layout
(messages: a list of {role, content}), rendered by a prompt template; only response tokens count in the loss.
Rows hold one example each (padded) or several (packed); segment ids keep attention inside each example and
positions restart at each.

Preference tuning (DPO, Rafailov et al. 2023): JSONL pairs (prompt, chosen, rejected; strings or chat messages);
the policy learns to prefer the chosen answer relative to a frozen reference, the starting model (under LoRA its
base weights). Validation logs the DPO loss, reward accuracy and margins.

Every example starts after an end-of-sequence token, as documents do in pretraining, and responses end with one.

From the experiment: the model (replaced by the Hugging Face config when init_from is such a directory), the
data section's tokenizer fields (checked against the pretrained run's), `data.batch_size` (examples; rows when
instruction tuning), the optimizer and schedule, the train section (steps, evaluation and checkpoint intervals,
gradient accumulation, seed, init_from, the run directory) and the mesh. Evaluation reads whole splits, so
`train.eval_steps` and `data.seq_len` play no part. Each task is a Task of the one training loop
(`jaxlm.train.fit`): sharded over the mesh, checkpointed, resumed exactly after an interruption or SIGTERM.

What the run directory holds: config.json and finetune.json; metrics.jsonl; summary.json; checkpoints/ (the
loop's, for resuming); for a classifier, classifier.safetensors (the backbone and head, or with LoRA only the
adapters and head) and labels.json; for an assistant, its checkpoints are language-model checkpoints (full
finetuning: every jaxlm tool loads them), or adapters.safetensors (LoRA: `load_lm` folds them into the base
weights); samples.txt.

The package: `config` (FinetuneConfig, constants), `data` (input files, encoding, templates, packing, batches),
`backbone` (applying the model, pretrained weights, what is trained), `task` (what the two tasks share),
`rundir` (the run directory), `classify`, `instruct` and `preference` (the three tasks), `cli` (the command line).
"""

from jaxlm.finetune.config import (
    ADAPTERS_FILE,
    CLASSIFIER_FILE,
    FINETUNE_FILE,
    HF_WEIGHTS,
    LABELS_FILE,
    LAYOUTS,
    ROLES,
    TASKS,
    FinetuneConfig,
    Params,
    check_experiment,
)
from jaxlm.finetune.data import (
    ClassifySplit,
    EpochBatches,
    InstructSplit,
    alpaca_prompt,
    chat_prompt,
    chat_prompt_ids,
    classify_epoch,
    encode_classify,
    encode_segments,
    fixed_batches,
    instruct_epoch,
    label_ids,
    pack_rows,
    process_rows,
    prompt_ids,
    read_instruct,
    read_jsonl,
    read_table,
    template_segments,
)
from jaxlm.finetune.backbone import (
    apply_model,
    classifier_logits,
    full_backbone,
    is_hf_dir,
    last_k_mask,
    load_base,
    load_tokenizer,
    response_losses,
)
from jaxlm.finetune.rundir import (
    load_tree,
    read_run,
    save_tree,
    write_or_check_finetune,
)
from jaxlm.finetune.task import (
    FinetuneTask,
)
from jaxlm.finetune.classify import (
    Classification,
    Classifier,
    confusion_matrix,
    format_confusion,
    load_classifier,
    train_classifier,
)
from jaxlm.finetune.instruct import (
    InstructionTuning,
    instruction_tuned,
    load_lm,
    run_layout,
    train_instruct,
    user_prompt,
    write_samples,
)
from jaxlm.finetune.preference import (
    PreferenceSplit,
    PreferenceTuning,
    answer_logprobs,
    dpo_terms,
    pair_segments,
    read_preferences,
    train_dpo,
)
from jaxlm.finetune.cli import (
    parse,
    run_finetune,
    train_finetune,
)

__all__ = [
    "ADAPTERS_FILE",
    "CLASSIFIER_FILE",
    "FINETUNE_FILE",
    "HF_WEIGHTS",
    "LABELS_FILE",
    "LAYOUTS",
    "ROLES",
    "TASKS",
    "FinetuneConfig",
    "Params",
    "check_experiment",
    "ClassifySplit",
    "EpochBatches",
    "InstructSplit",
    "alpaca_prompt",
    "chat_prompt",
    "chat_prompt_ids",
    "classify_epoch",
    "encode_classify",
    "encode_segments",
    "fixed_batches",
    "instruct_epoch",
    "label_ids",
    "pack_rows",
    "process_rows",
    "prompt_ids",
    "read_instruct",
    "read_jsonl",
    "read_table",
    "template_segments",
    "apply_model",
    "classifier_logits",
    "full_backbone",
    "is_hf_dir",
    "last_k_mask",
    "load_base",
    "load_tokenizer",
    "response_losses",
    "load_tree",
    "read_run",
    "save_tree",
    "write_or_check_finetune",
    "FinetuneTask",
    "Classification",
    "Classifier",
    "confusion_matrix",
    "format_confusion",
    "load_classifier",
    "train_classifier",
    "InstructionTuning",
    "instruction_tuned",
    "load_lm",
    "run_layout",
    "train_instruct",
    "user_prompt",
    "write_samples",
    "PreferenceSplit",
    "PreferenceTuning",
    "answer_logprobs",
    "dpo_terms",
    "pair_segments",
    "read_preferences",
    "train_dpo",
    "parse",
    "run_finetune",
    "train_finetune",
]
