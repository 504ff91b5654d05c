"""Learning rate x width: a grid search of small GPT-2s on the Python standard library, reported by validation loss.

What it tests: jaxlm's hyperparameter searches (`jaxlm.scaling.search.grid_search`, any config fields) and sweeps
side by side on Ray, end to end: 3 peak learning rates (1e-3, 3e-3, 1e-2; cosine to 1e-4) x 2 widths (d_model 32
and 64, 2 layers, 2 heads), byte-level tokens, 120 steps of 16 x 64 bytes each, scored on the same 8 x 16 x 64
held-out bytes. Once no member is unfinished it prints the members sorted by final validation loss and writes
runs/lr_search/search.csv and search.png (validation loss against each field, one line per value of the other).

Run: `python -m experiments.lr_search` (one member after another, in this process) or
`python -m experiments.lr_search --sweep.ray` (side by side on a local Ray, one CPU device per member); finished
members are skipped, so either resumes the other. A random search instead: `random_search(BASE, {"optim.lr":
LogUniform(1e-3, 3e-2), "model.d_model": Choice((32, 64))}, n=6, seed=0)`.

Cost and found: docs/results.md ("lr_search").
"""

from __future__ import annotations

import os

from jaxlm.cli import run_search
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.scaling.search import grid_search

BASE = Experiment(
    name="lr_search",
    # Unrolled layers: at 2 layers a scan only adds loop overhead on a CPU.
    model=ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=2, vocab_size=260, max_seq_len=64,
                      scan_layers=False),
    data=DataConfig(source="pystdlib", tokenizer="byte", seq_len=64, batch_size=16),
    optim=OptimConfig(lr=3e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.1),
    train=TrainConfig(steps=120, out_dir=os.path.join("runs", "lr_search"), eval_every=10**9, eval_steps=8,
                      ckpt_every=60, keep_checkpoints=1, log_every=10, samples=0),
)
FIELDS = {"optim.lr": (1e-3, 3e-3, 1e-2), "model.d_model": (32, 64)}
SWEEP = grid_search(BASE, FIELDS)


def main() -> None:
    run_search(SWEEP, list(FIELDS))


if __name__ == "__main__":
    main()
