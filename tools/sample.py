"""Sample text from a trained run or from a Hugging Face model directory.

    python -m tools.sample --run runs/quickstart --prompt "def " --max-new-tokens 200 \\
        --temperature 0.8 --top-k 40 --top-p 0.95 --batch 4 --seed 0
    python -m tools.sample --hf path/to/llama --prompt "The capital of France is" --max-new-tokens 20

--run reads the run's config.json, its latest checkpoint (or a checkpoints/<step> directory) and its tokenizer;
the prompt is placed after an end-of-document token, where a document starts in the packed training rows.
--hf reads the directory with jaxlm.hf.load_hf; with a sentencepiece `tokenizer.model` or a Hugging Face
`tokenizer.json` (GPT-2, Llama 3, Qwen) the prompt is text, after the bos token where the tokenizer has one (as
Llama was trained; GPT-2's is <|endoftext|>); a directory with neither takes and prints token ids ("464 3290 318").
--start bos|eos|none overrides that start token (e.g. bos for a run imported from Llama with tools.convert_hf).
--chat wraps the prompt in the prompt template of an instruction-tuned run (experiments.finetune_instruct; a LoRA
run's adapters are merged first) and prints only the answer.
Each of the --batch samples is drawn independently; generation stops at the end-of-sequence token or after
--max-new-tokens. Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxlm.config import DataConfig, ModelConfig
from jaxlm.errors import ConfigError, JaxlmError

USAGE_ERROR = 2


class TokenIds:
    """Stands in for a tokenizer when a model comes without one: text is a list of integer token ids."""

    def __init__(self, bos_id: int | None, eos_id: int | None):
        self.bos_id = -1 if bos_id is None else bos_id
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        try:
            return [int(piece) for piece in text.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(
                f"this model has no tokenizer.model or tokenizer.json, so the prompt must be token ids such as "
                f"'464 3290', got {text!r}"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)


@dataclass
class Model:
    cfg: ModelConfig
    params: Any
    tokenizer: Any  # encode(str) -> ids, decode(ids) -> str
    start_ids: list[int]  # put before every prompt
    eos_id: int | None


def run_tokenizer(data: DataConfig):
    """The tokenizer of a run. Byte tokenizers and tokenizer files need no corpus; trained ones come from the
    data cache."""
    from jaxlm.data.tokenizer import TokenizerSpec, build_tokenizer, is_named_kind

    if data.tokenizer == "byte" or not is_named_kind(data.tokenizer):
        spec = TokenizerSpec(data.tokenizer, data.vocab_size, data.tokenizer_sample_bytes, corpus_fingerprint="")
        return build_tokenizer(spec, data.resolved_cache_dir, [], [])[0]
    from jaxlm.data import prepare_data

    with contextlib.redirect_stdout(sys.stderr):  # corpus statistics are not samples
        return prepare_data(data).tokenizer


def load_run(path: str) -> Model:
    from jaxlm.checkpoint import load_params

    experiment, params = load_params(path)
    tokenizer = run_tokenizer(experiment.data)
    return Model(experiment.model, params, tokenizer, [tokenizer.eos_id], tokenizer.eos_id)


def _first_id(value: int | list[int] | None) -> int | None:
    # Some configs list several stop ids; generation stops at one, the first.
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def load_hf_dir(path: str) -> Model:
    from jaxlm.data.tokenizer import HF_TOKENIZER_FILE, load_hf_tokenizer, load_sentencepiece
    from jaxlm.hf import CONFIG_FILE, load_hf

    cfg, params = load_hf(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        hf = json.load(f)
    bos_id, eos_id = _first_id(hf.get("bos_token_id")), _first_id(hf.get("eos_token_id"))
    spm_path = os.path.join(path, "tokenizer.model")
    if os.path.isfile(spm_path):
        tokenizer: Any = load_sentencepiece(spm_path)
        bos_id = tokenizer.bos_id if bos_id is None else bos_id
        eos_id = tokenizer.eos_id if eos_id is None else eos_id
    elif os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE)):
        # Its special tokens as tokenizer_config.json names them (Llama 3 Instruct: eos <|eot_id|>).
        tokenizer = load_hf_tokenizer(os.path.join(path, HF_TOKENIZER_FILE))
        bos_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        eos_id = tokenizer.eos_id
    else:
        tokenizer = TokenIds(bos_id, eos_id)
    start = [bos_id] if bos_id is not None and 0 <= bos_id < cfg.vocab_size else []
    return Model(cfg, params, tokenizer, start, eos_id)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a jaxlm run directory, or one of its checkpoints/<step> directories")
    source.add_argument("--hf", help="a Hugging Face GPT-2 or Llama directory (config.json + safetensors)")
    p.add_argument("--prompt", default="", help="text to continue (token ids for --hf without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="0: no cut")
    p.add_argument("--top-p", type=float, default=0.95, help="1: no cut")
    p.add_argument("--batch", type=int, default=1, help="how many samples to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--chat", action="store_true",
                   help="--run is an instruction-tuned run: wrap the prompt in its template, print the answer")
    p.add_argument("--start", choices=("auto", "bos", "eos", "none"), default="auto",
                   help="token before the prompt (auto: eos for --run, bos for --hf)")
    args = p.parse_args(argv)
    if args.chat and not args.run:
        raise ConfigError("--chat needs --run (an instruction-tuned run directory)")
    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    return args


def sample(model: Model, args: argparse.Namespace) -> list[str]:
    from jaxlm.generate import generate

    start_ids = model.start_ids
    if args.start != "auto":
        special = None if args.start == "none" else getattr(model.tokenizer, f"{args.start}_id", None)
        if args.start != "none" and (special is None or special < 0):
            raise ConfigError(f"--start {args.start}: this model's tokenizer has no {args.start} token")
        start_ids = [] if special is None else [special]
    prompt_ids = start_ids + model.tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty and no start token goes before it: give a --prompt or a --start token")
    outputs = generate(
        model.cfg, model.params, [prompt_ids] * args.batch, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_id=None if args.ignore_eos else model.eos_id,
    )
    # Decoding prompt and continuation together keeps the space sentencepiece puts at the start of a word.
    return [model.tokenizer.decode(prompt_ids + out) for out in outputs]


def chat(run_dir: str, args: argparse.Namespace) -> list[str]:
    """Answers of an instruction-tuned run to one request, in the template it was trained with."""
    from jaxlm import finetune
    from jaxlm.generate import generate

    experiment, params = finetune.load_lm(run_dir)  # a classification run is refused here
    if not finetune.instruction_tuned(run_dir):
        print(f"warning: {run_dir} was not instruction-tuned (no finetune.json with task instruct): --chat wraps the "
              "prompt in a chat template it never saw; leave out --chat to continue the text", file=sys.stderr)
    tokenizer = finetune.load_tokenizer(experiment)
    ids = finetune.prompt_ids(tokenizer, finetune.user_prompt(args.prompt, finetune.run_layout(run_dir)))
    outputs = generate(
        experiment.model, params, [ids] * args.batch, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_id=None if args.ignore_eos else tokenizer.eos_id,
    )
    return [tokenizer.decode(out) for out in outputs]


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        if args.chat:
            texts = chat(args.run, args)
        else:
            model = load_run(args.run) if args.run else load_hf_dir(args.hf)
            texts = sample(model, args)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    for i, text in enumerate(texts):
        print(f"--- sample {i} (seed {args.seed})")
        print(text)


if __name__ == "__main__":
    main()
