"""Convert between Hugging Face model directories and jaxlm runs.

    python -m tools.convert_hf --to-jaxlm path/to/hf_model --out runs/imported
    python -m tools.convert_hf --from-run runs/quickstart --out exported/quickstart [--dtype bfloat16]

--to-jaxlm writes a jaxlm run directory: config.json (the imported model; the data section names the model's
tokenizer, copied into the run) and a step-0 checkpoint with fresh optimizer state. Sample from it with
`python -m tools.sample --run`, or start training from its weights with `--train.init-from`. The model's own
tokenizer is its sentencepiece tokenizer.model (copied as <out>/tokenizer.model) or else its tokenizer.json
(GPT-2, Llama 3, Qwen: copied into <out>/tokenizer/ with a tokenizer_config.json naming its bos, eos and pad
tokens). A model with neither needs `--tokenizer`: any DataConfig.tokenizer value, knowing that a tokenizer other
than the model's own makes its weights meaningless.

--from-run writes a directory that transformers loads with `from_pretrained` (GPT2LMHeadModel, LlamaForCausalLM
or Qwen3ForCausalLM, by the model's features) from the run's latest checkpoint (or a checkpoints/<step> directory),
with the run's tokenizer (tokenizer.model, or tokenizer.json and tokenizer_config.json, which transformers'
AutoTokenizer loads) and its bos and eos ids in config.json.
Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jaxlm import storage
from jaxlm.errors import ConfigError, JaxlmError

USAGE_ERROR = 2


def to_jaxlm(hf_dir: str, out: str, tokenizer: str = "") -> str:
    """Import a Hugging Face directory as a jaxlm run directory; returns the run directory."""
    from jaxlm.checkpoint import save_params, write_or_check_config
    from jaxlm.config import DataConfig, Experiment, TrainConfig
    from jaxlm.data.tokenizer import (
        HF_TOKENIZER_FILE,
        SENTENCEPIECE_FILE,
        is_named_kind,
        load_hf_tokenizer,
        save_hf_tokenizer,
        tokenizer_file,
    )
    from jaxlm.hf import load_hf

    cfg, params = load_hf(hf_dir)
    out = storage.abspath(out).rstrip("/")
    own = [os.path.join(hf_dir, name) for name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)]
    tokenizer = tokenizer or next((path for path in own if os.path.isfile(path)), "")
    if not tokenizer:
        raise ConfigError(
            f"{hf_dir} has no tokenizer.model or tokenizer.json: pass --tokenizer (a tokenizer file, a model "
            "directory, or a DataConfig tokenizer), or sample from the directory as it is with "
            "`python -m tools.sample --hf`"
        )
    if not is_named_kind(tokenizer) and not tokenizer.endswith(".model"):  # a tokenizer.json or a directory
        tokenizer = tokenizer_file(tokenizer)
        if tokenizer.endswith(".json"):  # with the special tokens its directory declares, into <out>/tokenizer
            hf_tokenizer = load_hf_tokenizer(tokenizer)
            tokenizer = storage.join(out, "tokenizer")
            save_hf_tokenizer(hf_tokenizer, tokenizer)
    if tokenizer.endswith(".model"):
        if not storage.isfile(tokenizer):
            raise ConfigError(f"--tokenizer {tokenizer} does not exist: give the path of a sentencepiece .model file")
        storage.makedirs(out)
        copied = storage.join(out, "tokenizer.model")
        if storage.abspath(tokenizer) != copied:
            storage.write_bytes(copied, storage.read_bytes(tokenizer))
        tokenizer = copied
    experiment = Experiment(
        name=storage.basename(out) or "imported",
        model=cfg,
        data=DataConfig(tokenizer=tokenizer, vocab_size=cfg.vocab_size, seq_len=min(256, cfg.max_seq_len)),
        train=TrainConfig(out_dir=out),
    )
    write_or_check_config(experiment)
    save_params(experiment, params)
    return out


def from_run(run: str, out: str, dtype: str = "float32", with_tokenizer: bool = True) -> str:
    """Export a run's checkpoint as a Hugging Face directory; returns the directory."""
    from jaxlm.checkpoint import load_params
    from jaxlm.data.tokenizer import HFTokenizer, save_hf_tokenizer
    from jaxlm.hf import save_hf
    from tools.sample import run_tokenizer

    experiment, params = load_params(run)
    tokenizer = run_tokenizer(experiment.data) if with_tokenizer else None
    bos_id = getattr(tokenizer, "bos_id", None)
    eos_id = getattr(tokenizer, "eos_id", None)
    save_hf(
        experiment.model, params, out, dtype=dtype,
        bos_id=bos_id if bos_id is not None and bos_id >= 0 else None, eos_id=eos_id,
    )
    proto = getattr(tokenizer, "model_proto", None)
    if proto is not None:
        with open(os.path.join(out, "tokenizer.model"), "wb") as f:
            f.write(proto)
    if isinstance(tokenizer, HFTokenizer):
        save_hf_tokenizer(tokenizer, out)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.convert_hf", description=__doc__.split("\n\n")[0])
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-jaxlm", metavar="HF_DIR", help="import a Hugging Face directory as a jaxlm run")
    direction.add_argument("--from-run", metavar="RUN_DIR", help="export a jaxlm run as a Hugging Face directory")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--tokenizer", default="",
                   help="--to-jaxlm: the run's tokenizer (default: HF_DIR/tokenizer.model, else HF_DIR/tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="--from-run: tensor type of the written weights (float32 is exact)")
    p.add_argument("--no-tokenizer", action="store_true", help="--from-run: do not load or write the tokenizer")
    return p.parse_args(argv)


def check_out(out: str) -> None:
    """--out must be a directory that can be created, or one that exists: checked before any conversion starts."""
    if storage.is_uri(out):
        storage.makedirs(out)  # a missing bucket or a missing permission: one line now
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a directory: give a new path or an existing directory")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the directory itself, or the nearest folder above it that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--out {out} cannot be created: {existing} is a file; give a path under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: {existing} is not writable; choose another path")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_out(args.out)
        if args.to_jaxlm:
            out = to_jaxlm(args.to_jaxlm, args.out, args.tokenizer)
            print(f"wrote jaxlm run {out}: sample with `python -m tools.sample --run {out}`")
        else:
            out = from_run(args.from_run, args.out, args.dtype, not args.no_tokenizer)
            print(f"wrote Hugging Face model {out}: load with transformers' AutoModelForCausalLM.from_pretrained")
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()
