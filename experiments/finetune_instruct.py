"""Instruction tuning: "write the docstring of this function", on the standard library's functions.

What it tests: turning the pretrained quickstart model (`runs/quickstart`; run `python -m experiments.quickstart`
first) into an assistant that answers in the chat template, with only the answer's tokens counted in the loss.
The experiment builds its data with `ast` from the running Python's standard library: for each short function
with a docstring, the user message is the function with its docstring removed and the assistant's reply is the
docstring's first paragraph. Training examples come from the files the quickstart model was trained on
(4,261 examples), validation examples from the files it held out (163); see runs/data/docstrings/. Rows of 256
tokens are packed, with attention kept inside each example. By default every weight is trained;
`--finetune.lora-rank 8` trains rank-8 adapters on all six attention and MLP matrices instead.

Cost: 200 steps of 8 packed rows; 72 s on two CPU cores.

Found (2026-11-29, from the 600-step quickstart): validation loss per answer token 5.972 -> 4.674
(full) and -> 4.912 (LoRA r=8, 73,728 trained parameters, `--finetune.lora-rank 8 --optim.lr 1e-2
--optim.min-lr 1e-3`). The model learns the form of an answer, little of its content. Details: docs/results.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import textwrap

from experiments.quickstart import EXPERIMENT as QUICKSTART
from jaxlm.config import Experiment, OptimConfig, TrainConfig
from jaxlm.data.corpora import STDLIB_SKIP_DIRS, stable_fraction, stdlib_files
from jaxlm.finetune import FinetuneConfig, run_finetune

DATA_DIR = os.path.join("runs", "data", "docstrings")
FILES = {split: os.path.join(DATA_DIR, f"{split}.jsonl") for split in ("train", "validation")}
REQUEST = "Write the docstring of this function.\n\n"
MAX_CODE_CHARS = 400
MAX_DOC_CHARS = 160
MAX_VALIDATION = 200

EXPERIMENT = Experiment(
    name="finetune_instruct",
    model=QUICKSTART.model,
    data=dataclasses.replace(QUICKSTART.data, batch_size=8),  # the pretrained run's tokenizer
    optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.0),
    train=TrainConfig(steps=200, eval_every=100, log_every=10, init_from=QUICKSTART.run_dir),
    mesh=QUICKSTART.mesh,
)

FINETUNE = FinetuneConfig(
    task="instruct",
    train_file=FILES["train"],
    val_file=FILES["validation"],
    layout="chat",
    pack=True,
    max_len=256,
    lora_rank=0,  # 8: adapters instead of full finetuning
    lora_alpha=16.0,
    lora_targets=("query", "key", "value", "out", "gate", "up", "proj"),
    samples=4,
    sample_tokens=64,
)


def _summary_line(doc: str) -> str:
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()


def docstring_examples(val_fraction: float) -> dict[str, list[dict]]:
    """Chat examples from every short documented function, split by the pretraining split of its file."""
    root, files = stdlib_files()
    out: dict[str, list[dict]] = {"train": [], "validation": []}
    seen = set()
    for path in files:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if set(rel.split("/")) & STDLIB_SKIP_DIRS:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        split = "validation" if stable_fraction(rel) < val_fraction else "train"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            answer = _summary_line(doc)
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            docnode = node.body[0]
            kept = lines[first - 1 : docnode.lineno - 1] + lines[docnode.end_lineno : node.end_lineno]
            code = textwrap.dedent("\n".join(kept)).strip("\n")
            if not answer or len(answer) > MAX_DOC_CHARS or len(code) > MAX_CODE_CHARS or code in seen:
                continue
            seen.add(code)
            out[split].append({
                "messages": [
                    {"role": "user", "content": REQUEST + code},
                    {"role": "assistant", "content": answer},
                ]
            })
    out["validation"] = out["validation"][:MAX_VALIDATION]
    return out


def build_files(val_fraction: float) -> None:
    """Write train.jsonl and validation.jsonl (once; they depend only on the standard library's source)."""
    if all(os.path.exists(p) for p in FILES.values()):
        return
    os.makedirs(DATA_DIR, exist_ok=True)
    for split, records in docstring_examples(val_fraction).items():
        write_jsonl(FILES[split], records)


def write_jsonl(path: str, records) -> None:
    """One JSON line per record, written under a temporary name and then renamed (whole or not at all)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


def prepare(experiment: Experiment, finetune: FinetuneConfig) -> None:
    """The data files, when the run reads this experiment's own (a missing `runs/quickstart` is reported by the
    run itself: train it first with `python -m experiments.quickstart`)."""
    if finetune.train_file == FILES["train"]:
        build_files(QUICKSTART.data.val_fraction)


def main() -> None:
    run_finetune(EXPERIMENT, FINETUNE, prepare=prepare)


if __name__ == "__main__":
    main()
