"""Compile an experiment's train and eval steps for a Cloud TPU slice, without the hardware.

    python -m tools.aot --experiment quickstart --topology v5e-16
    python -m tools.aot --experiment quickstart --preset llama3-8b --data.seq-len 8192 --topology v5p-128 --fit
    python -m tools.aot --experiment chinchilla_c4 --sweep --topology v5p-64 --model.attention xla

The steps are compiled from abstract shapes by the TPU compiler (libtpu: `pip install -e '.[tpu]'`): no data is
prepared and no parameter allocated: a model of any size costs only its compile time. Each compiled step prints
one JSON line as soon as it is compiled (so a long sweep that is stopped keeps what it compiled), and at the end a
table row: topology, devices, hosts, mesh, the attention kernel found in the compiled
program, bytes per device (arguments, temp, total) against the chip's HBM and whether they fit, the compiler's FLOPs
per step beside the model's own count, the all-gathers, reduce-scatters and all-reduces per step (count, bytes per
device), the compile time, and a roofline lower bound on the step time and upper bound on MFU from the compiler's
FLOPs and bytes and the chip's published peaks (bounds, not measurements).

--topology takes Cloud TPU accelerator types (v4 and v5p count TensorCores: v5p-8 is 4 chips; v5e/v5litepod and
v6e count chips) or jax's names (v5p:2x2x1, v5e:4x4). --fit searches the smallest change (remat policy,
--train.grad-accum, FSDP width) under which the train step fits and prints it as overrides. --sweep compiles
every selected member of a sweep experiment (--sweep.members 3:6 selects some). Other arguments are the
experiment's overrides (--section.field value). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jaxlm import cli
from jaxlm.errors import ConfigError

HEADER = ["member", "step", "topology", "mesh d/f/t", "attention", "remat", "loss chunk", "accum", "args GiB", "temp GiB",
          "total GiB", "HBM GiB", "fits", "compiler TFLOP", "model TFLOP", "all-gather", "reduce-scatter",
          "all-reduce", "compile s", "step s >=", "MFU <="]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _collective(c: dict[str, int]) -> str:
    return f"{c['count']} / {_gib(c['bytes'])} GiB"


def row(r: dict[str, Any]) -> list[Any]:
    m, b = r["mesh"], r["bytes_per_device"]
    bounds, counts, flops = r.get("bounds", {}), r.get("collectives"), r["flops_per_step"]
    mfu = bounds.get("mfu_upper_bound")
    return [
        r["experiment"], r["step"], f"{r['topology']} ({r['devices']} chips, {r['hosts']} hosts)",
        f"{m['data']}/{m['fsdp']}/{m['tensor']}", r["attention"] or "", r["remat"], r["loss_chunk"] or "none",
        r["grad_accum"],
        _gib(b["arguments"]), _gib(b["temp"]), _gib(b["total"]), _gib(r["hbm_per_device"]),
        "yes" if r["fits"] else "NO", "" if flops["compiler"] is None else f"{flops['compiler'] / 1e12:,.1f}",
        f"{flops['model'] / 1e12:,.1f}",
        *(_collective(counts[k]) if counts else "" for k in ("all-gather", "reduce-scatter", "all-reduce")),
        f"{r['compile_s']:.1f}", f"{bounds['step_s_lower_bound']:.4f}" if bounds else "",
        "" if mfu is None else f"{mfu:.1%}",
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.aot", allow_abbrev=False, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", required=True, help="a file in experiments/ (e.g. quickstart, chinchilla_c4)")
    parser.add_argument("--topology", required=True, help="v5p-128, v5e-16, v6e-8, v4-32, v5p:2x2x1, ...")
    parser.add_argument("--preset", default=None, help="swap in a published model shape (jaxlm.config.PRESETS)")
    parser.add_argument("--sweep", action="store_true", help="every selected member of a sweep experiment")
    parser.add_argument("--fit", action="store_true",
                        help="search the smallest change (remat, grad-accum, FSDP width) under which the step fits")
    parser.add_argument("--train-only", action="store_true", help="compile the train step only")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for docs/)")
    args, overrides = parser.parse_known_args(argv)

    def command() -> list[dict[str, Any]]:
        from jaxlm import aot
        from jaxlm.logging import print_grid

        experiments = cli.load_experiments(args.experiment, overrides, preset=args.preset,
                                           prog=f"python -m tools.aot --experiment {args.experiment}")
        devices = aot.topology_devices(args.topology)
        if len(experiments) > 1 and not args.sweep:
            raise ConfigError(f"{args.experiment} is a sweep of {len(experiments)} members: add --sweep (and "
                              "--sweep.members 3:6 for some of them)")
        steps = ("train",) if args.train_only or args.fit else ("train", "eval")
        records, fixes = [], []
        for experiment in experiments:
            print(f"compiling {experiment.name} for {args.topology} ({len(devices)} chips)", file=sys.stderr,
                  flush=True)
            if args.fit:
                found, flags, tried = aot.fit_search(
                    experiment, args.topology, devices, log=lambda s: print(s, file=sys.stderr, flush=True)
                )
                fixes.append((experiment.name, found, flags))
            else:
                tried = aot.compile_steps(experiment, args.topology, steps=steps, devices=devices)
            for r in tried:  # at once: a sweep stopped after hours keeps every step it compiled
                print(json.dumps(r, sort_keys=True), flush=True)
            records.extend(tried)
        rows = [row(r) for r in records]
        if args.markdown:
            table = [HEADER, ["---"] * len(HEADER), *rows]
            print("\n".join("| " + " | ".join(map(str, line)) + " |" for line in table))
        else:
            print_grid(HEADER, rows)
        for experiment_name, found, flags in fixes:
            if found is None:
                print(f"{experiment_name}: no candidate fits (remat, grad-accum and FSDP width exhausted): "
                      "use more chips or --mesh.tensor")
            else:
                print(f"{experiment_name}: fits with: {' '.join(flags) or '(no change)'}")
        return records

    return cli.guarded(command)


if __name__ == "__main__":
    main()
