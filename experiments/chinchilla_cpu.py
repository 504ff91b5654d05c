"""Chinchilla on a CPU: an IsoFLOP sweep of tiny GPT-2s on the Python source of this machine, then the fits.

What it tests: that jaxlm's sweep machinery (isoflop_grid, run directories, resume, collect_results) and fits
(jaxlm.scaling's approaches 1-3, tools.fit_scaling) find a compute-optimal frontier in real training runs, end to
end, on hardware everyone has. 4 compute budgets (4e11, 7e11, 1e12, 2e12 FLOPs) x 7 sizes, log-spaced over a
factor of 6.25 around D = 450 N (the D/N that the first version of this sweep fitted); byte-level tokens (vocab
260, so that embeddings do not swamp models this small); GPT-2 shapes of 1-3 layers and widths 8 to 44 in steps
of 4 (head size up to 16); 4k to 65k parameters (N counts every parameter, embeddings included, as Hoffmann et
al. 2022 do). Every member trains on D = C / flops_per_token tokens in batches of 32 x 128 (rows drawn from
all over the corpus, `--data.shuffle-rows`) under a cosine
schedule as long as the run (peak 3e-3 for all, 5% warmup, 10x decay), and is scored by its final validation
loss (nats per byte) on the same 64 x 32 x 128 held-out bytes.

Data: `pysrc`, every .py file of the standard library and of the environment's site-packages, one document per
distinct content: about 376 MB of training bytes where jaxlm's test extra is installed (what it holds depends on
what is installed: each member's summary.json records its data fingerprint). No member reads more
than 22M bytes, so none repeats data; `main` refuses to start where the corpus is smaller than that.

Cost: 2.9e13 training FLOPs and 58k steps in all, about 31 minutes; the smallest budget's members run 477
to 3,324 steps.

Run: `python -m experiments.chinchilla_cpu` trains every member under runs/chinchilla_cpu/<member>, skipping
finished ones and resuming unfinished ones, then (on process 0, once every member is finished) fits and plots into
runs/chinchilla_cpu/fits. `--sweep.members 3:6` runs a slice; the fit alone is
`python -m tools.fit_scaling runs/chinchilla_cpu --out runs/chinchilla_cpu/fits --bootstrap 200 --unfittable skip`.
Overrides apply to every member as given: each member's steps were fixed when this module was imported, so an
override that changes a member's compute (--data.batch-size, --data.seq-len, --train.steps, model shape fields)
is refused with exit status 2 instead of silently leaving the IsoFLOP budgets; change BASE or BUDGETS here and the
grid is rebuilt. `--train.out-dir D` moves the sweep to D/<member> (fits in D/fits); --name is refused.

Found (2026-12-07, 31 minutes): every budget bracketed; a = 0.47 [0.28, 0.71] by approach 2, 0.65 [0.37, 0.84]
by approach 3, 0.45 by approach 1 (docs/results.md, "Chinchilla on a CPU"; docs/scaling/chinchilla_cpu_pysrc_*).
Rows in the packed order instead gave jagged profiles and a = 0.62 / 0.38; a family of one depth (2 layers, one
head) gave 0.67 [0.49, 0.84] / 0.69 [0.16, 0.91], no narrower: the runs' own noise limits it. The first version of this sweep (3
budgets x 5 sizes on the standard library alone, D = 300 N, 2026-11-29) bracketed 2 of its 3 budgets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.cli import run_isoflop_sweep
from jaxlm.scaling import AspectRatioShapes, budget_grid, check_budgets

BUDGETS = (4e11, 7e11, 1e12, 2e12)
SIZES_PER_BUDGET = 7
TOKENS_PER_PARAM = 450.0  # the grid's centre: the compute-optimal D/N that the sweep's first version fitted
SPAN = 2.5  # sizes from centre / SPAN to centre x SPAN
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


# Widths in steps of 4 (so the ladder of sizes is fine enough at 4k-65k parameters), near 32 x depth.
SHAPES = FewerHeads(AspectRatioShapes(aspect=32.0, head_dim=4, band=4.0), head_dim=16)

BASE = Experiment(
    name="chinchilla_cpu",
    # Unrolled layers: at 1-2 layers a scan only adds loop overhead on a CPU.
    model=ModelConfig(
        family="gpt2", n_layers=1, d_model=32, n_heads=2, vocab_size=260, max_seq_len=128, scan_layers=False
    ),
    # Rows in a random order: pysrc's documents are very uneven (up to 1.3 MB), and in the packed order a member
    # would end its schedule on whatever long file happened to come last.
    data=DataConfig(source="pysrc", tokenizer="byte", seq_len=128, batch_size=32, shuffle_rows=True),
    optim=OptimConfig(lr=3e-3, min_lr=3e-4, schedule="cosine", weight_decay=0.1),
    # Evaluate at the start and the end only (eval_every is capped at each member's steps), on 262k bytes.
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


def most_tokens() -> int:
    """The most tokens any member reads."""
    return max(m.train.steps * m.data.batch_size * m.data.seq_len for m in SWEEP)


def check_no_repeats(data: DataConfig) -> None:
    """A corpus that depends on what is installed: refuse to start where a member would read it twice."""
    from jaxlm.data import prepare_data
    from jaxlm.errors import DataError

    train_tokens = prepare_data(data).stats["train"]["tokens"]
    if train_tokens < most_tokens():
        raise DataError(
            f"the pysrc corpus of this environment holds {train_tokens:,} training tokens, and a member reads "
            f"{most_tokens():,}: install more packages (pip install -e '.[test]') so that no member repeats data"
        )


def main() -> None:
    from jaxlm.cli import guarded, parse_sweep, program_name

    # Bad flags and overrides that would change a member's budget are refused before the corpus is prepared.
    sweep_args, members, _ = guarded(lambda: parse_sweep(SWEEP, sys.argv[1:], program_name()))
    guarded(lambda: check_budgets(members, BUDGET_OF))
    if members and not sweep_args.status:
        guarded(lambda: check_no_repeats(members[0].data))  # the data settings as overridden (--data.cache-dir)
    run_isoflop_sweep(SWEEP, BUDGET_OF, FITS_DIR, bootstrap=BOOTSTRAP, unfittable="skip")


if __name__ == "__main__":
    main()
