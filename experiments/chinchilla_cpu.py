"""Chinchilla on a CPU: an IsoFLOP sweep of tiny GPT-2s on the Python standard library, then the three fits.

What it tests: that jaxlm's sweep machinery (isoflop_grid, run directories, resume, collect_results) and fits
(jaxlm.scaling's approaches 1-3, tools.fit_scaling) find a compute-optimal frontier in real training runs, end to
end, on hardware everyone has. 3 compute budgets (3e11, 1e12, 3e12 FLOPs) x 5 sizes, log-spaced over a factor of
9 around D = 300 N; byte-level tokens (vocab 260, so that embeddings do not swamp models this small); GPT-2
shapes of 1-2 layers and widths 8 to 64 (head size 8 to 16); 4k to 125k parameters (N counts every parameter,
embeddings included, as Hoffmann et al. 2022 do). Every member trains on D = C / flops_per_token tokens in
batches of 16 x 128 under a cosine schedule as long as the run (peak 3e-3 for all, 5% warmup, 10x decay), and is
scored by its final validation loss (nats per byte) on the same 64 x 16 x 128 held-out bytes.

Cost: 2.15e13 training FLOPs and 56k steps in all, 37.5 minutes on two shared CPU cores; the smallest
budget's members run 495 to 4,987 steps; the most any member reads is 2.5 epochs of the 10.9M training bytes
(the smallest model of the largest budget).

Run: `python -m experiments.chinchilla_cpu` trains every member under runs/chinchilla_cpu/<member>, skipping
finished ones and resuming unfinished ones, then (on process 0, once every member is finished) fits and plots into
runs/chinchilla_cpu/fits. `--sweep.members 3:6` runs a slice; the fit alone is
`python -m tools.fit_scaling runs/chinchilla_cpu --out runs/chinchilla_cpu/fits --bootstrap 200 --unfittable skip`.
Overrides apply to every member as given: each member's steps were fixed when this module was imported, so an
override that changes a member's compute (--data.batch-size, --data.seq-len, --train.steps, model shape fields)
is refused with exit status 2 instead of silently leaving the IsoFLOP budgets; change BASE or BUDGETS here and the
grid is rebuilt. `--train.out-dir D` moves the sweep to D/<member> (fits in D/fits); --name is refused.

Found (2026-11-29): approach 3 gives a = 0.49 [0.17, 0.82] and a compute-optimal D/N of about 450 bytes per
parameter; approach 2, a = 0.58 [0.41, 0.86] over 2 budgets (at 1e12 the optimum lies below the smallest size).
The grid is centred at D = 300 N because a first grid at D = 20 N put every optimum below its smallest size.
Fits, plots and discussion: docs/results.md, docs/scaling/.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.cli import run_isoflop_sweep
from jaxlm.scaling import AspectRatioShapes, budget_grid

BUDGETS = (3e11, 1e12, 3e12)
SIZES_PER_BUDGET = 5
TOKENS_PER_PARAM = 300.0  # the grid's centre, D = 300 N (see "Found": at D = 20 N every optimum lay below the grid)
SPAN = 3.0  # sizes from centre / SPAN to centre x SPAN
BOOTSTRAP = 200


@dataclass(frozen=True)
class FewerHeads:
    """`rule`'s depth and width, with the head count whose head size is nearest `head_dim`.

    Parameters and FLOPs do not depend on how a width is split into heads; many heads of 8 only make a CPU slower.
    """

    rule: Callable[[ModelConfig, float], ModelConfig]
    head_dim: int = 16

    def __call__(self, base: ModelConfig, n_params: float) -> ModelConfig:
        cfg = self.rule(base, n_params)
        divisors = [h for h in range(1, cfg.d_model + 1) if cfg.d_model % h == 0]
        heads = min(divisors, key=lambda h: (abs(cfg.d_model / h - self.head_dim), h))
        return cfg.replace(n_heads=heads, n_kv_heads=heads)  # head_dim follows: d_model // heads


# Widths in steps of 8 (so the ladder of sizes is fine enough at 4k-100k parameters), near 32 x depth.
SHAPES = FewerHeads(AspectRatioShapes(aspect=32.0, head_dim=8, band=4.0), head_dim=16)

BASE = Experiment(
    name="chinchilla_cpu",
    # Unrolled layers: at 1-2 layers a scan only adds loop overhead on a CPU.
    model=ModelConfig(
        family="gpt2", n_layers=1, d_model=32, n_heads=2, vocab_size=260, max_seq_len=128, scan_layers=False
    ),
    data=DataConfig(source="pystdlib", tokenizer="byte", seq_len=128, batch_size=16),
    optim=OptimConfig(lr=3e-3, min_lr=3e-4, schedule="cosine", weight_decay=0.1),
    # Evaluate at the start and the end only (eval_every is capped at each member's steps), on 131k bytes.
    train=TrainConfig(
        out_dir=os.path.join("runs", "chinchilla_cpu"), eval_every=10**9, eval_steps=64, ckpt_every=1000,
        keep_checkpoints=1, log_every=10, samples=0,
    ),
)


SWEEP, BUDGET_OF = budget_grid(
    BASE, BUDGETS, sizes_per_budget=SIZES_PER_BUDGET, shape_rule=SHAPES, span=SPAN, tokens_per_param=TOKENS_PER_PARAM
)
SWEEP_DIR = BASE.run_dir
FITS_DIR = os.path.join(SWEEP_DIR, "fits")


def main() -> None:
    run_isoflop_sweep(SWEEP, BUDGET_OF, FITS_DIR, bootstrap=BOOTSTRAP, unfittable="skip")


if __name__ == "__main__":
    main()
