"""Evaluate a checkpoint: loss, perplexity and bits per byte on a corpus split, multiple-choice accuracy, or the
answers it generates to prompts.

    python -m tools.evaluate --run runs/quickstart                        # the run's validation split, whole
    python -m tools.evaluate --run runs/quickstart --split train --batches 50
    python -m tools.evaluate --run runs/quickstart --source text:notes/*.txt   # another corpus, same tokenizer
    python -m tools.evaluate --run runs/quickstart --hellaswag hellaswag_val.jsonl
    python -m tools.evaluate --run runs/finetune_instruct --generate prompts.jsonl \
        --judge-url http://localhost:8000/v1 --judge-model judge

--generate reads a JSONL file of prompts with reference answers ({"prompt": ..., "reference": ...}, or the Alpaca
layout: instruction, optional input, output), generates greedily (an instruction-tuned run's prompts in its
template, other runs' as text to continue), writes each prompt, reference and response to --responses (default:
<run>/responses-<file name>.jsonl) and scores the responses by exact match (after stripping surrounding
whitespace; and normalized: case, punctuation, articles and spacing ignored). With --judge-url (any
OpenAI-compatible endpoint: `tools.serve`, vLLM, OpenAI; a key in --judge-api-key or OPENAI_API_KEY) a judge
model is asked for each item whether the response is correct given the reference; its accuracy is the share of
CORRECT verdicts among the replies that gave one.

`--run` takes a run directory, a checkpoint step directory (runs/<name>/checkpoints/<step>), or an
instruction-tuned run (LoRA adapters are folded into their base weights). Prints one summary line and the
figures as JSON (also written to `--out` when given).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import tyro

from jaxlm import storage
from jaxlm.errors import ConfigError, JaxlmError


@dataclass(frozen=True)
class Args:
    run: str  # run directory, checkpoint step directory, or finetuned run
    split: str = "validation"  # train | validation (or any split of a tfds: corpus)
    source: str = ""  # another corpus (pystdlib | text:<glob> | tfds:<name>); "" is the run's own
    batches: int = 0  # batches to evaluate; 0 reads the whole split once
    batch_size: int = 0  # 0: the run's batch size
    seq_len: int = 0  # 0: the run's sequence length
    hellaswag: str = ""  # a JSONL file of ctx, endings, label: multiple-choice scoring instead of loss
    generate: str = ""  # a JSONL file of prompts and reference answers: generate, score by exact match and judge
    max_new_tokens: int = 128  # --generate: most tokens of a response
    responses: str = ""  # --generate: the JSONL of responses to write; "" is <run>/responses-<file name>.jsonl
    judge_url: str = ""  # --generate: an OpenAI-compatible API, e.g. http://localhost:8000/v1
    judge_model: str = ""  # --generate: the judge's model name at that API
    judge_api_key: str = ""  # --generate: the API's key; "" reads OPENAI_API_KEY (none for tools.serve)
    out: str = ""  # also write the figures to this JSON file (its directory is created)


def prepare_out(out: str) -> None:
    """Create the folder of --out (as the other tools do) before evaluating, so a bad path fails at once."""
    if storage.is_uri(out):
        storage.makedirs(out)  # a missing bucket or a missing permission: one line now
        return
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory: give the path of the JSON file to write")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        where = e.filename or folder
        why = f"{where} is a file" if os.path.isfile(where) else e.strerror or type(e).__name__
        raise ConfigError(
            f"--out {out}: its directory {folder} cannot be created ({why}): choose another path"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: its directory {folder} is not writable: choose another path")


def evaluate(args: Args) -> dict:
    from jaxlm import evaluate as ev
    from jaxlm.finetune import load_lm, load_tokenizer

    if args.out:
        prepare_out(args.out)
    experiment, params = load_lm(args.run)
    if args.generate:
        from jaxlm.generations import evaluate_generations

        result = evaluate_generations(experiment, params, args)
    elif args.hellaswag:
        items = ev.read_choices(args.hellaswag)
        result = ev.score_choices(
            experiment.model, params, load_tokenizer(experiment), items, batch_size=args.batch_size or 16
        )
        result["file"] = args.hellaswag
        print(
            f"{args.run}: {result['items']} items  accuracy {result['accuracy']:.4f}  "
            f"accuracy_norm {result['accuracy_norm']:.4f}  (chance {result['chance']:.4f}"
            f"{', %d contexts shortened' % result['truncated_contexts'] if result['truncated_contexts'] else ''})"
        )
    else:
        result = ev.lm_metrics(
            experiment, params, split=args.split, source=args.source, batches=args.batches,
            batch_size=args.batch_size, seq_len=args.seq_len,
        )
        print(
            f"{args.run}: {result['source']} {result['split']}  loss {result['loss']:.4f}  "
            f"perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}  "
            f"({result['tokens']:,} tokens in {result['batches']} batches)"
        )
    result["run"] = args.run
    print(json.dumps(result, indent=2))
    if args.out:
        storage.write_text_atomic(args.out, json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    args = tyro.cli(
        Args, args=list(sys.argv[1:] if argv is None else argv), description=__doc__.split("\n\n")[0],
        prog="python -m tools.evaluate",
    )
    try:
        return evaluate(args)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
