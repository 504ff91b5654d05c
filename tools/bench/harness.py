"""lm-evaluation-harness against jaxlm's own scorer: multiple-choice items per second on the same items and model.

The items are built from the Python standard library's source (the quickstart's domain): a few consecutive lines
as the context, the line that follows (after a space) as the right ending among three lines drawn from elsewhere. jaxlm's
`score_choices` and `tools.lm_eval`'s model (through `lm_eval.simple_evaluate` on a task read from a local JSONL
file) score them; both are timed warm (a first pass compiles), and their accuracies must agree.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import tempfile
import time
from typing import Any

import numpy as np


def stdlib_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` multiple-choice items (ctx, endings, label) from the standard library's source lines."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rng = np.random.default_rng(seed)
    lines_of = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip() for line in f if 20 <= len(line.strip()) <= 80]
        if len(lines) > 10:
            lines_of.append(lines)
    items = []
    for _ in range(n):
        lines = lines_of[rng.integers(len(lines_of))]
        i = int(rng.integers(3, len(lines)))
        others = [lines_of[rng.integers(len(lines_of))] for _ in range(3)]
        endings = [o[rng.integers(len(o))].strip() for o in others]
        label = int(rng.integers(4))
        endings.insert(label, lines[i].strip())
        # No whitespace at the context's end: both scorers then join context and ending with one space.
        items.append({"ctx": "\n".join(lines[i - 3 : i]).rstrip(), "endings": endings, "label": label})
    return items


def bench_harness(run: str, n_items: int, batch_size: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxlm import evaluate as ev
    from jaxlm.finetune import load_lm, load_tokenizer
    from jaxlm.harness import JaxlmLM

    experiment, params = load_lm(run)
    tokenizer = load_tokenizer(experiment)
    records = stdlib_items(n_items)
    items = [ev.ChoiceItem(r["ctx"], tuple(r["endings"]), r["label"]) for r in records]
    record: dict[str, Any] = {"benchmark": "harness", "run": run, "items": n_items, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "items.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(folder, "stdlib_choice.yaml"), "w") as f:
            f.write(
                f"task: stdlib_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{ctx}}'\n"
                "doc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
            )
        manager = TaskManager(include_path=folder, include_defaults=False)
        model = JaxlmLM(experiment.model, params, tokenizer, [tokenizer.eos_id], batch_size=batch_size)
        for attempt in ("cold", "warm"):
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(model=model, tasks=["stdlib_choice"], task_manager=manager,
                                          bootstrap_iters=0, log_samples=False)
            record[f"lm_eval_{attempt}_s"] = time.perf_counter() - start
        record["lm_eval_accuracy"] = out["results"]["stdlib_choice"]["acc,none"]
    for attempt in ("cold", "warm"):
        start = time.perf_counter()
        ours = ev.score_choices(experiment.model, params, tokenizer, items, batch_size=batch_size)
        record[f"jaxlm_{attempt}_s"] = time.perf_counter() - start
    record["jaxlm_accuracy"] = ours["accuracy"]
    record["lm_eval_items_per_s"] = n_items / record["lm_eval_warm_s"]
    record["jaxlm_items_per_s"] = n_items / record["jaxlm_warm_s"]
    return record


def print_harness(r: dict[str, Any]) -> None:
    print(f"{r['items']} multiple-choice items (4 endings) on {r['run']}, batch {r['batch_size']}, warm:")
    print(f"  lm_eval (tools.lm_eval's model): {r['lm_eval_items_per_s']:8.1f} items/s  accuracy {r['lm_eval_accuracy']:.4f}")
    print(f"  jaxlm.evaluate.score_choices:    {r['jaxlm_items_per_s']:8.1f} items/s  accuracy {r['jaxlm_accuracy']:.4f}")
