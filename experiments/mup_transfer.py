"""muP width transfer: does the best learning rate of a narrow model stay the best as the model widens?

What it tests: the maximal update parametrization (Yang et al. 2022, Tensor Programs V; ModelConfig.parametrization
"mup", base width 32) against the standard one, on the embedded corpus (`pystdlib` bytes). A sweep of 5 peak
learning rates (3e-4 to 3e-2) x 4 widths (32, 64, 128, 256; 4 heads that widen with the model, 2 layers) under
each parametrization: 40 runs of 300 steps of 16 x 128 bytes with a cosine schedule (5% warmup, 10x decay), each
scored by its final validation loss on 32 x 16 x 128 held-out bytes. Under muP the best learning rate should be
the same at every width; under SP it should fall as the width grows.

Cost: 40 runs from 0.03M to 1.7M parameters, 12,000 steps in all.

Run: `python -m experiments.mup_transfer` trains the members under runs/mup_transfer/<member> (skipping finished
ones; `--sweep.members 0:20` runs a slice, `--sweep.status` shows them), then, once all are finished, prints the
best learning rate per width under each parametrization and plots validation loss against learning rate per
width (runs/mup_transfer/transfer.png).

Found (2026-12-07, 40 runs in 38 minutes on two shared CPU cores; runs/mup_transfer/transfer.png, copied to
docs/scaling/mup_transfer.png): under SP the best learning rate falls as the model widens, 3e-3 at widths 32 and
64, 1e-3 at 128 and 256 (final validation losses 2.725, 2.524, 2.513, 2.404). Under muP the curves of all four
widths lie on one another at 3e-4 and 1e-3, as muP intends, and the best learning rate stays within 3e-3 to 3e-2
(3e-3, 3e-2, 3e-3, 1e-2: a flat floor, within 0.05 nats between 3e-3 and 3e-2 at every width of 64 and up),
but in 300 steps the wide muP models do not beat the narrow ones (best losses 2.725, 2.610, 2.712, 2.633): at
this length the 1/width hidden learning rate leaves them under-trained, and SP's widest model is best overall.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from jaxlm import storage
from jaxlm.cli import SWEEP_FAILED, guarded, parse_sweep, program_name, run_sweep
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.scaling import all_finished, read_run
from jaxlm.scaling.status import sweep_dir

BASE_WIDTH = 32
WIDTHS = (32, 64, 128, 256)
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
PARAMETRIZATIONS = ("sp", "mup")
SWEEP_DIR = os.path.join("runs", "mup_transfer")

BASE = Experiment(
    name="mup_transfer",
    # Unrolled layers: at 2 layers a scan only adds loop overhead on a CPU.
    model=ModelConfig(family="gpt2", n_layers=2, d_model=BASE_WIDTH, n_heads=4, vocab_size=260, max_seq_len=128,
                      scan_layers=False),
    data=DataConfig(source="pystdlib", tokenizer="byte", seq_len=128, batch_size=16),
    optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=15, schedule="cosine", weight_decay=0.0),
    # Evaluate at the start and the end only, on 65k held-out bytes.
    train=TrainConfig(steps=300, eval_every=10**9, eval_steps=32, ckpt_every=1000, keep_checkpoints=1, log_every=50,
                      samples=0, out_dir=SWEEP_DIR),
)


def member(parametrization: str, width: int, lr: float) -> Experiment:
    name = f"mup_transfer-{parametrization}-w{width}-lr{lr:.0e}"
    model = dataclasses.replace(BASE.model, d_model=width, parametrization=parametrization,
                                mup_base_width=BASE_WIDTH if parametrization == "mup" else 0)
    return dataclasses.replace(
        BASE, name=name, model=model, optim=dataclasses.replace(BASE.optim, lr=lr, min_lr=lr / 10),
        train=dataclasses.replace(BASE.train, out_dir=os.path.join(SWEEP_DIR, name), eval_every=BASE.train.steps),
    )


SWEEP = tuple(member(p, w, lr) for p in PARAMETRIZATIONS for w in WIDTHS for lr in LEARNING_RATES)


def best_learning_rates(results: dict[tuple[str, int, float], float]) -> dict[tuple[str, int], tuple[float, float]]:
    """(parametrization, width) -> (the learning rate of the lowest validation loss, that loss), from
    {(parametrization, width, lr): final validation loss}; non-finite losses (diverged runs) never win."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for (p, w, lr), loss in results.items():
        if np.isfinite(loss) and ((p, w) not in best or loss < best[p, w][1]):
            best[p, w] = (lr, loss)
    return best


def final_losses(members=SWEEP) -> dict[tuple[str, int, float], float]:
    out = {}
    for m in members:
        _, _, evals = read_run(m.run_dir)
        out[m.model.parametrization, m.model.d_model, m.optim.lr] = evals[-1]["val_loss"] if evals else float("nan")
    return out


def report(results: dict[tuple[str, int, float], float], path: str) -> None:
    """Print the best learning rate per width under each parametrization; plot loss against learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_learning_rates(results)
    for p in PARAMETRIZATIONS:
        print(f"{p}: " + ", ".join(f"width {w}: lr {best[p, w][0]:.0e} (loss {best[p, w][1]:.4f})"
                                   for w in WIDTHS if (p, w) in best))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(WIDTHS)))
    for ax, p in zip(axes, PARAMETRIZATIONS):
        for w, colour in zip(WIDTHS, colours):
            lrs = [lr for lr in LEARNING_RATES if (p, w, lr) in results]
            ax.plot(lrs, [results[p, w, lr] for lr in lrs], marker="o", color=colour, label=f"width {w}")
            if (p, w) in best:
                ax.plot(*best[p, w], marker="*", ms=14, color=colour, mec="black")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title("standard parametrization" if p == "sp" else f"muP (base width {BASE_WIDTH})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss (nats per byte)")
    fig.tight_layout()
    with storage.local_copy(path, "w") as local:
        fig.savefig(local, dpi=120, format="png")
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    sweep_args, members, everyone = guarded(lambda: parse_sweep(SWEEP, sys.argv[1:], program_name()))
    _, failed = guarded(lambda: run_sweep(sweep_args, members, everyone))
    # The members as overridden: --train.out-dir D moves the sweep, and its report, to D.
    if not sweep_args.status and all_finished(everyone):
        report(final_losses(everyone), storage.join(sweep_dir(everyone), "transfer.png"))
    if failed:
        sys.exit(SWEEP_FAILED)


if __name__ == "__main__":
    main()
