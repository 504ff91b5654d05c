"""Evaluate a jaxlm model with EleutherAI's lm-evaluation-harness: any of its tasks, or tasks of your own.

    python -m tools.lm_eval --run runs/quickstart --tasks lambada_openai,hellaswag --limit 200
    python -m tools.lm_eval --run gs://bucket/runs/big --tasks arc_easy --batch-size 64
    python -m tools.lm_eval --hf path/to/llama --tasks arc_easy
    python -m tools.lm_eval --run runs/quickstart --include-path my_tasks/ --tasks my_task

`--run` takes a run directory (local or gs://), a checkpoint step directory or a finetuned run; `--hf` a Hugging
Face directory (config.json, safetensors and its tokenizer). `--include-path` adds a folder of task YAML files
(a task reads local data with `dataset_path: json` and `dataset_kwargs: {data_files: ...}`). The model runs on every
device (params sharded as in training, each batch's rows split over the devices); see jaxlm.harness for how each
request is scored. Prints the harness's table and writes its results as JSON into the run directory
(`lm_eval.json`, or `--out`). Needs `pip install 'jaxlm[eval]'`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import tyro

from jaxlm import storage
from jaxlm.errors import ConfigError

RESULTS_FILE = "lm_eval.json"


@dataclass(frozen=True)
class Args:
    tasks: str  # comma-separated task names (lm_eval's, or those of --include-path)
    run: str = ""  # a run directory (local or gs://), checkpoint step directory or finetuned run
    hf: str = ""  # or a Hugging Face model directory
    include_path: str = ""  # a folder of task YAML files of your own
    batch_size: int = 16  # requests per forward pass (rounded up to a multiple of the data-parallel devices)
    limit: float = 0  # at most this many documents per task (a fraction below 1); 0: all
    num_fewshot: int = -1  # examples put before each request; -1: the task's default
    max_gen_tokens: int = 256  # for generation tasks that set no max_gen_toks
    seed: int = 1234
    log_samples: bool = False  # also write each request and the model's answers into the results JSON
    out: str = ""  # the results JSON; "" : lm_eval.json in the run (or Hugging Face) directory


def load_model(args: Args):
    """(cfg, params, tokenizer, start ids, the directory the results go to) of --run or --hf."""
    if args.run:
        from jaxlm.finetune import load_lm, load_tokenizer

        experiment, params = load_lm(args.run)
        tokenizer = load_tokenizer(experiment)
        return experiment.model, params, tokenizer, [tokenizer.eos_id], args.run
    from tools.sample import TokenIds, load_hf_dir

    model = load_hf_dir(args.hf)
    if isinstance(model.tokenizer, TokenIds):
        raise ConfigError(f"{args.hf} has no tokenizer: lm_eval's tasks are text, so the model needs its tokenizer")
    return model.cfg, model.params, model.tokenizer, model.start_ids or [model.eos_id], args.hf


def task_manager(args: Args, names: list[str]):
    from lm_eval.tasks import TaskManager

    if args.include_path:
        if not os.path.isdir(args.include_path):
            raise ConfigError(f"--include-path {args.include_path} is not a folder of task YAML files")
        local = TaskManager(include_path=args.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local  # indexing lm_eval's own few thousand tasks takes a while
    manager = TaskManager(include_path=args.include_path or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task {', '.join(unknown)}: see `lm_eval ls tasks`, or add --include-path with its YAML file"
        )
    return manager


def lm_eval_main(args: Args) -> dict:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("tools.lm_eval needs lm-evaluation-harness: pip install 'jaxlm[eval]'") from None
    from jaxlm import sharding
    from jaxlm.config import MeshConfig
    from jaxlm.harness import JaxlmLM, on_mesh

    if bool(args.run) == bool(args.hf):
        raise ConfigError("give one of --run (a jaxlm run) or --hf (a Hugging Face directory)")
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks is empty: give task names separated by commas, e.g. --tasks arc_easy,lambada_openai")
    manager = task_manager(args, names)
    cfg, params, tokenizer, start_ids, folder = load_model(args)
    out = args.out or storage.join(folder, RESULTS_FILE)
    mesh = sharding.make_mesh(MeshConfig())
    params, batch_sharding, batch_size = on_mesh(cfg, params, mesh, args.batch_size)
    model = JaxlmLM(
        cfg, params, tokenizer, start_ids, batch_size=batch_size, max_gen_tokens=args.max_gen_tokens,
        batch_sharding=batch_sharding,
    )
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model, tasks=names, task_manager=manager, num_fewshot=None if args.num_fewshot < 0 else args.num_fewshot,
        limit=args.limit or None, log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed, bootstrap_iters=0,
    )
    wall_s = time.perf_counter() - started
    from lm_eval.utils import make_table

    print(make_table(results))
    documents = sum(n["effective"] for n in results.get("n-samples", {}).values())
    record = {
        "model": args.run or args.hf, "tasks": names, "results": results["results"],
        "n-shot": results.get("n-shot"), "n-samples": results.get("n-samples"), "versions": results.get("versions"),
        "documents": documents, "wall_s": wall_s, "documents_per_sec": documents / wall_s if wall_s else None,
    }
    if args.log_samples:
        record["samples"] = results["samples"]
    storage.write_text_atomic(out, json.dumps(record, indent=2, default=str))
    print(f"{documents} documents in {wall_s:.1f}s ({record['documents_per_sec']:.1f}/s) -> {out}")
    return record


def main(argv: Sequence[str] | None = None) -> dict:
    args = tyro.cli(
        Args, args=list(sys.argv[1:] if argv is None else argv), description=__doc__.split("\n\n")[0],
        prog="python -m tools.lm_eval",
    )
    from jaxlm.cli import guarded

    return guarded(lambda: lm_eval_main(args))


if __name__ == "__main__":
    main()
