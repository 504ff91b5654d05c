"""Chinchilla on a CPU: an IsoFLOP sweep of tiny GPT-2s on the Python source of this machine, then the fits.

What it tests: that jaxlm's sweep machinery (isoflop_grid, run directories, resume, collect_results) and fits
(jaxlm.scaling's approaches 1-3, tools.fit_scaling) find a compute-optimal frontier in real training runs, end to
end, on hardware everyone has. 4 compute budgets (4e11, 7e11, 1e12, 2e12 FLOPs) x 7 sizes, log-spaced over a
factor of 6.25 around D = 450 N (the D/N that the first version of this sweep fitted), x 2 seeds (initialisation
and data order): a run's own noise, 0.03-0.05 nats, is as large as the differences near a budget's optimum, and
the fits take both runs of every point. Byte-level tokens (vocab 260, so that embeddings do not swamp models this
small); GPT-2 shapes of one family, 2 layers and one head, widths 8 to 46 in steps of 2; 4.9k to 70k parameters
(N counts every parameter, embeddings included, as Hoffmann et al. 2022 do). Every member trains on D = C /
flops_per_token tokens in batches of 32 x 128 (rows drawn from all over the corpus, `--data.shuffle-rows`) under
a cosine schedule as long as the run (peak 3e-3 for all, 5% warmup, 10x decay), and is scored by its final
validation loss (nats per byte) on the same 64 x 32 x 128 held-out bytes.

Data: `pysrc`, every .py file of the standard library and of the environment's site-packages, one document per
distinct content: about 376 MB of training bytes where jaxlm's test extra is installed (what it holds depends on
what is installed: each member's summary.json records its data fingerprint). No member reads more
than 22M bytes, so none repeats data; `main` refuses to start where the corpus is smaller than that.

Cost: 5.7e13 training FLOPs in 56 runs, about 41 minutes on two idle CPU cores (20.6 per seed); the smallest
budget's members run 403 to 2,110 steps.

Run: `python -m experiments.chinchilla_cpu` trains every member under runs/chinchilla_cpu/<member>, skipping
finished ones and resuming unfinished ones, then (on process 0, once every member is finished) fits and plots into
runs/chinchilla_cpu/fits. `--sweep.members 3:6` runs a slice; the fit alone is
`python -m tools.fit_scaling runs/chinchilla_cpu --out runs/chinchilla_cpu/fits --bootstrap 200 --unfittable skip`.
Overrides apply to every member as given: each member's steps were fixed when this module was imported, so an
override that changes a member's compute (--data.batch-size, --data.seq-len, --train.steps, model shape fields)
is refused with exit status 2 instead of silently leaving the IsoFLOP budgets; change BASE, BUDGETS or SEEDS here
and the grid is rebuilt. `--train.out-dir D` moves the sweep to D/<member> (fits in D/fits); --name is refused.

Found (2026-12-07, docs/results.md "Chinchilla on a CPU", docs/scaling/chinchilla_cpu_twoseeds_*): every budget
bracketed, the optima rising with C; a = 0.66 [0.59, 0.73] by approach 2, 0.70 [0.47, 0.87] by approach 3. One
seed per point gave intervals twice as wide (0.67 [0.49, 0.84] and 0.66 [0.52, 0.85] for the two seeds alone);
the earlier family of 1-3 layers, one seed, 0.47 [0.28, 0.71] and 0.65 [0.37, 0.84]; rows in the packed order,
jagged profiles. The first version of this sweep (3 budgets x 5 sizes on the standard library alone, D = 300 N,
2026-11-29) bracketed 2 of its 3 budgets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.cli import run_isoflop_sweep
from jaxlm.flops import count_params
from jaxlm.scaling import budget_grid, reshape_model

BUDGETS = (4e11, 7e11, 1e12, 2e12)
SIZES_PER_BUDGET = 7
SEEDS = (0, 1)  # every shape trained twice
TOKENS_PER_PARAM = 450.0  # the grid's centre: the compute-optimal D/N that the sweep's first version fitted
SPAN = 2.5  # sizes from centre / SPAN to centre x SPAN
BOOTSTRAP = 200


@dataclass(frozen=True)
class OneDepth:
    """Every size at one depth, with one head: the width (a multiple of `step`) whose parameter count is nearest
    the target. Neighbouring sizes then differ only in width (a family of 1-3 layers added a step between depths
    to the profiles)."""

    n_layers: int = 2
    step: int = 2
    min_width: int = 8

    def __call__(self, base: ModelConfig, n_params: float) -> ModelConfig:
        shapes = [reshape_model(base, self.n_layers, w, w) for w in range(self.min_width, 257, self.step)]
        return min(shapes, key=lambda cfg: abs(math.log(count_params(cfg) / n_params)))


SHAPES = OneDepth()

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
    BASE, BUDGETS, sizes_per_budget=SIZES_PER_BUDGET, shape_rule=SHAPES, span=SPAN, tokens_per_param=TOKENS_PER_PARAM,
    seeds=SEEDS,
)
SWEEP_DIR = BASE.run_dir
FITS_DIR = os.path.join(SWEEP_DIR, "fits")


def most_tokens() -> int:
    """The most tokens any member reads."""
    return max(m.train.steps * m.data.batch_size * m.data.seq_len for m in SWEEP)


def check_no_repeats(members: Sequence[Experiment]) -> None:
    """A corpus that depends on what is installed: refuse to start where a member would read it twice. The data
    settings are the members' as overridden (--data.cache-dir)."""
    from jaxlm.data import prepare_data
    from jaxlm.errors import DataError

    train_tokens = prepare_data(members[0].data).stats["train"]["tokens"]
    if train_tokens < most_tokens():
        raise DataError(
            f"the pysrc corpus of this environment holds {train_tokens:,} training tokens, and a member reads "
            f"{most_tokens():,}: install more packages (pip install -e '.[test]') so that no member repeats data"
        )


def main() -> None:
    # Bad flags and overrides that would change a member's budget are refused before the corpus is prepared.
    run_isoflop_sweep(SWEEP, BUDGET_OF, FITS_DIR, bootstrap=BOOTSTRAP, unfittable="skip",
                      before_training=check_no_repeats)


if __name__ == "__main__":
    main()
