"""Chinchilla on C4: the IsoFLOP sweep of experiments.chinchilla_cpu at accelerator scale, declared, not yet run.

What it tests: Hoffmann et al. 2022's approaches 1-3 on C4 (allenai/c4, en) with Llama-family models (RoPE,
RMSNorm, SwiGLU, untied embeddings), over two decades of compute: 5 budgets (1e18, 3e18, 1e19, 3e19, 1e20
FLOPs) x 7 sizes from centre / 3 to centre x 3 around Chinchilla's D = 20 N; 32M to 2.8B parameters, 4 to 37
layers, width about 64 x depth in heads of 128. Sequences of 2,048 tokens, global batches of 256 (524k tokens),
bfloat16 compute with fused attention (splash on TPU, cuDNN on GPU), activations rematerialised except each
block's attention and MLP outputs. The learning rate shrinks with width (3e-3 x 256 / d_model; 5% warmup, cosine
decay to a tenth).

Cost: 1.0e21 training FLOPs in all (35 members, each spending its budget): at 40% MFU, about 700 H100-hours or
1,500 TPU v5p chip-hours, two days on the slice it is sized for, a v5p-64 (32 chips, 8 hosts). Every member's
train step compiles for that slice without the hardware: `python -m tools.aot --experiment chinchilla_c4 --sweep
--topology v5p-64` (docs/aot.md has its table). The longest member runs 93k steps; the
largest member of the smallest budget, 1,041.
No member reads more than 49B tokens, about a third of C4's training split (156B tokens by Dodge et al. 2021's
count), so none repeats data.

Data: allenai/c4's en shards (1,024 train and 8 validation .json.gz files, about 305 GB), local or in a bucket:
`huggingface-cli download allenai/c4 --repo-type dataset --include 'en/*' --local-dir c4` (or `gsutil -m cp -r` /
`gcloud storage cp -r` of a copy into gs://BUCKET/c4). C4's own validation files are the validation split. Give the
folder on the command line, `--data.source 'shards:DIR/en/c4-train.*.json.gz' --data.val-source
'DIR/en/c4-validation.*.json.gz'` (default DIR: ./c4), and prepare once on every host
(`python -m tools.prepare_data --experiment chinchilla_c4 --data.source ... --data.data-dir gs://BUCKET/prepared`,
with --process-index/--process-count across hosts): the tokenizer is trained and every file tokenized into token
shards there, and every member reads them. Then `python -m experiments.chinchilla_c4` with the same --data flags;
on several hosts, give each a slice (`--sweep.members 0:12`, ...). Attention is `auto`: the splash kernel on
TPUs, cuDNN's on GPUs. A data-parallel mesh holds 16 bytes per parameter on every chip (float32 weights,
gradients and two Adam moments), 45 GB for the largest member: on chips with less memory, shard them with
`--mesh.data 1 --mesh.fsdp -1`; `--train.grad-accum K` cuts activation memory. Overrides that change a member's compute are refused, as in experiments.chinchilla_cpu.
Once every member is finished, process 0 fits and plots into runs/chinchilla_c4/fits.

Found: not run yet.
"""

from __future__ import annotations

import dataclasses
import os

from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.cli import run_isoflop_sweep
from jaxlm.scaling import AspectRatioShapes, budget_grid

BUDGETS = (1e18, 3e18, 1e19, 3e19, 1e20)
SIZES_PER_BUDGET = 7
TOKENS_PER_PARAM = 20.0  # centred on Chinchilla's D = 20 N
SPAN = 3.0
SHAPES = AspectRatioShapes(aspect=64.0, head_dim=128)
BOOTSTRAP = 1000
LR_AT_256 = 3e-3  # the peak learning rate of a 256-wide model; others scale as 1 / d_model

BASE = Experiment(
    name="chinchilla_c4",
    model=ModelConfig(
        family="llama", n_layers=4, d_model=512, n_heads=4, vocab_size=32000, max_seq_len=2048,
        dtype="bfloat16", attention="auto", remat="attn_mlp",
    ),
    data=DataConfig(
        source="shards:c4/en/c4-train.*.json.gz", val_source="c4/en/c4-validation.*.json.gz",
        tokenizer="sentencepiece-bpe", vocab_size=32000, seq_len=2048, batch_size=256,
        num_workers=16,
    ),
    optim=OptimConfig(lr=LR_AT_256, min_lr=LR_AT_256 / 10, schedule="cosine", weight_decay=0.1, grad_clip=1.0),
    train=TrainConfig(
        out_dir=os.path.join("runs", "chinchilla_c4"), eval_every=2000, eval_steps=20, ckpt_every=1000,
        keep_checkpoints=2, log_every=50,
    ),
    mesh=MeshConfig(data=-1),
)


def scale_lr(member: Experiment) -> Experiment:
    """The member with its peak (and final) learning rate scaled as 1 / d_model from LR_AT_256."""
    lr = LR_AT_256 * 256 / member.model.d_model
    return dataclasses.replace(member, optim=dataclasses.replace(member.optim, lr=lr, min_lr=lr / 10))


_GRID, BUDGET_OF = budget_grid(
    BASE, BUDGETS, sizes_per_budget=SIZES_PER_BUDGET, shape_rule=SHAPES, span=SPAN, tokens_per_param=TOKENS_PER_PARAM
)
SWEEP = tuple(scale_lr(m) for m in _GRID)
SWEEP_DIR = BASE.run_dir
FITS_DIR = os.path.join(SWEEP_DIR, "fits")


def main() -> None:
    run_isoflop_sweep(SWEEP, BUDGET_OF, FITS_DIR, bootstrap=BOOTSTRAP)


if __name__ == "__main__":
    main()
