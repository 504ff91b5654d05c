"""Finetuning a pretrained model: a classifier, or an assistant (instruction tuning), fully or with LoRA.

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

Every example starts after an end-of-sequence token, as documents do in pretraining, and responses end with one.

From the experiment: the model (replaced by the Hugging Face config when init_from is such a directory), the
data section's tokenizer fields (checked against the pretrained run's), `data.batch_size` (examples; rows when
instruction tuning), the optimizer and schedule, `train.steps`, `eval_every`, `log_every`, `seed`, `init_from`
and the run directory. Evaluation reads whole splits, so `train.eval_steps` and `data.seq_len` play no part.
Finetuning runs on one device and starts over if interrupted (runs are minutes long; a finished run is not
repeated).

What the run directory holds: config.json and finetune.json; metrics.jsonl; summary.json; for a classifier,
classifier.safetensors (the backbone and head, or with LoRA only the adapters and head) and labels.json; for an
assistant, a jaxlm checkpoint (full finetuning: every jaxlm tool loads it as a language model) or
adapters.safetensors (LoRA: `load_lm` folds them into the base weights); samples.txt.

The package: `config` (FinetuneConfig, constants), `data` (input files, encoding, templates, packing, batches),
`backbone` (applying the model, pretrained weights, what is trained), `loop` (the shared training loop),
`rundir` (the run directory), `classify` and `instruct` (the two tasks), `cli` (the command line).
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
)
from jaxlm.finetune.data import (
    alpaca_prompt,
    chat_prompt,
    chat_prompt_ids,
    classify_batches,
    ClassifySplit,
    encode_classify,
    encode_segments,
    instruct_batches,
    InstructSplit,
    label_ids,
    pack_rows,
    prompt_ids,
    read_instruct,
    read_jsonl,
    read_table,
    template_segments,
)
from jaxlm.finetune.backbone import (
    apply_model,
    classifier_logits,
    count_trainable,
    full_backbone,
    is_hf_dir,
    last_k_mask,
    load_base,
    load_tokenizer,
    response_losses,
)
from jaxlm.finetune.rundir import (
    load_tree,
    save_tree,
)
from jaxlm.finetune.classify import (
    Classifier,
    confusion_matrix,
    format_confusion,
    load_classifier,
    train_classifier,
)
from jaxlm.finetune.instruct import (
    instruction_tuned,
    load_lm,
    run_layout,
    train_instruct,
    user_prompt,
    write_samples,
)
from jaxlm.finetune.cli import (
    parse,
    run_finetune,
    train_finetune,
)

__all__ = [
    "TASKS",
    "LAYOUTS",
    "ROLES",
    "FINETUNE_FILE",
    "LABELS_FILE",
    "CLASSIFIER_FILE",
    "ADAPTERS_FILE",
    "HF_WEIGHTS",
    "Params",
    "FinetuneConfig",
    "read_table",
    "read_jsonl",
    "ClassifySplit",
    "label_ids",
    "encode_classify",
    "classify_batches",
    "alpaca_prompt",
    "chat_prompt",
    "chat_prompt_ids",
    "prompt_ids",
    "template_segments",
    "encode_segments",
    "InstructSplit",
    "read_instruct",
    "pack_rows",
    "instruct_batches",
    "apply_model",
    "full_backbone",
    "classifier_logits",
    "response_losses",
    "is_hf_dir",
    "load_base",
    "load_tokenizer",
    "last_k_mask",
    "count_trainable",
    "save_tree",
    "load_tree",
    "confusion_matrix",
    "format_confusion",
    "train_classifier",
    "Classifier",
    "load_classifier",
    "train_instruct",
    "write_samples",
    "load_lm",
    "instruction_tuned",
    "run_layout",
    "user_prompt",
    "train_finetune",
    "parse",
    "run_finetune",
]
