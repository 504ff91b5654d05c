"""Fit scaling laws to a sweep and plot them: `python -m tools.fit_scaling <sweep dir or CSV> [--out DIR]`.

Input: a sweep's run directory (each member's config.json and metrics.jsonl), a results CSV written by
`jaxlm.scaling.write_csv`, or Epoch AI's Chinchilla data (`Model Size`, `Training FLOP`, `loss`; D = C / 6N).
Prints Chinchilla's approaches 1 (training-curve envelope, when curves are available), 2 (IsoFLOP parabolas) and
3 (parametric L(N, D)) with bootstrap intervals (with --law kaplan or chinchilla,kaplan, Kaplan et al. 2020's L(N),
L(D) and L(N, D) too), and writes PNG plots and fits.json to --out. Bad input or a fit
that fails prints one line on stderr and exits with status 2. The work is `jaxlm.scaling.fit_and_plot`'s; this is
its command line.
"""

from __future__ import annotations

import argparse
import sys

from jaxlm import scaling
from jaxlm.errors import JaxlmError

USAGE_ERROR = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.fit_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a sweep's run directory, or a results CSV")
    p.add_argument("--out", default="", help="where plots and fits.json go (default: <source>_fits)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for intervals (0: none)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=("auto", "val", "train"), default="auto",
                   help="which final loss to fit (auto: validation when the table has it)")
    p.add_argument("--drop-highest", type=int, default=0, metavar="K",
                   help="leave out the K runs with the highest loss (Epoch AI drop 5 of Chinchilla's)")
    p.add_argument("--budget-rtol", type=float, default=0.05,
                   help="runs whose compute agrees within this fraction share an IsoFLOP budget")
    p.add_argument("--unfittable", choices=("error", "skip"), default=None,
                   help="an IsoFLOP budget without a bracketed optimum: fail, or leave it out (default: error, "
                        "but skip for Epoch's layout, whose runs are not one clean IsoFLOP grid)")
    p.add_argument("--allow-unfinished", action="store_true", help="leave unfinished runs out instead of failing")
    p.add_argument("--approaches", default="1,2,3", help="which of Chinchilla's approaches to fit, e.g. 2,3")
    p.add_argument("--law", default="chinchilla",
                   help="chinchilla (approaches 1-3), kaplan (Kaplan et al. 2020: L(N), L(D), L(N, D)) or "
                        "chinchilla,kaplan (both, and their compute-optimal frontiers side by side)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        scaling.fit_and_plot(
            args.source, args.out, bootstrap=args.bootstrap, level=args.level, seed=args.seed, loss=args.loss,
            drop_highest=args.drop_highest, budget_rtol=args.budget_rtol, unfittable=args.unfittable,
            allow_unfinished=args.allow_unfinished, approaches=args.approaches, law=args.law,
        )
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
