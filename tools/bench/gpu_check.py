"""The GPU throughput check: per-GPU train-step MFU of gpt2-124m (seq 1024) and llama3.2-1b (seq 2048) in bfloat16.

    python -m tools.bench.gpu_check [--out DIR] [--budget-s 400] [--tiny]

Runs `tools.bench`'s train benchmark over a few batch sizes and remat policies per model, with bfloat16 compute,
all in one process (one JAX start-up), printing each table and JSON line and appending every record to
DIR/gpu_results.jsonl. Each setting runs first with `--model.attention auto`, as users get it, then with cuDNN's
fused attention forced, as a second row. Batches are per GPU (times the GPUs of the machine, data-parallel), and
MFU is per GPU: tokens/s x FLOPs per token / (GPUs x the GPU's dense bf16 peak from jaxlm.flops.CHIPS, which tells
H100 SXM from PCIe). It stops starting new runs when the time budget is spent, and records an out-of-memory or
other failure as a row instead of stopping. Targets: MFU >= 45% (gpt2-124m) and >= 50% (llama3.2-1b). `--tiny`
runs the same code on small shapes with XLA attention, to check it on a CPU. `tools/bench/gpu_check.sh` is the
usual entry point. Without `--tiny` it refuses to start (status 2) where JAX has no GPU; it exits with status 1
when every run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

USAGE_ERROR = 2
TARGETS = {"gpt2-124m": 0.45, "llama3.2-1b": 0.50}
ATTENTIONS = ("auto", "cudnn")  # as users get it, then cuDNN forced

# (preset, seq_len, batch_size per GPU, remat): cheapest first, so a short budget still measures each model.
RUNS = [
    ("gpt2-124m", 1024, 32, "none"),
    ("gpt2-124m", 1024, 64, "dots"),
    ("llama3.2-1b", 2048, 8, "dots"),
    ("llama3.2-1b", 2048, 8, "none"),
    ("llama3.2-1b", 2048, 16, "dots"),
    ("gpt2-124m", 1024, 128, "dots"),
]


def overrides(seq_len: int, batch: int, remat: str, attention: str, tiny: bool) -> list[str]:
    args = [
        "--model.dtype", "bfloat16", "--model.remat", remat, "--model.attention", "xla" if tiny else attention,
        "--data.seq-len", str(seq_len), "--data.batch-size", str(batch),
    ]
    if tiny:  # the same code path on shapes a CPU runs in seconds
        args = [
            "--model.n-layers", "1", "--model.d-model", "64", "--model.n-heads", "2", "--model.n-kv-heads", "2",
            "--model.d-ff", "128", "--model.vocab-size", "512", "--model.max-seq-len", "64",
            *args[:6], "--data.seq-len", "32", "--data.batch-size", "8", "--data.tokenizer", "char",
        ]
    return args


def per_gpu(record: dict, n_gpus: int) -> dict:
    """Throughput and MFU per GPU, against the GPU's own peak."""
    from jaxlm import flops

    chip = flops.chip(record["device"])
    peak = chip.bf16_flops if chip else record["peak_flops"] / n_gpus
    tokens = record["tokens_per_sec"] / n_gpus
    return {"gpus": n_gpus, "tokens_per_sec_per_gpu": tokens, "peak_flops_per_gpu": peak,
            "mfu_per_gpu": tokens * record["flops_per_token"] / peak}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no new run after this many seconds")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="small shapes and XLA attention (CPU check)")
    args = parser.parse_args(argv)

    import jax

    from jaxlm.logging import print_grid
    from tools.bench import bench

    if not args.tiny and jax.default_backend() != "gpu":
        print(f"error: tools.bench.gpu_check needs a CUDA GPU (JAX's backend here is {jax.default_backend()}); --tiny runs "
              "the same code path on CPU-sized shapes", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "gpu_results.jsonl")
    started = time.perf_counter()
    print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    records = []
    n_gpus = jax.device_count()
    for (preset, seq_len, batch, remat), attention in ((run, a) for run in RUNS for a in ATTENTIONS):
        if args.tiny and attention != "auto":
            continue  # cuDNN is a GPU kernel
        elapsed = time.perf_counter() - started
        total_batch = batch * (1 if args.tiny else n_gpus)
        if elapsed > args.budget_s:
            print(f"time budget spent ({elapsed:.0f} s): skipping {preset} b{total_batch} remat {remat} "
                  f"attention {attention}", flush=True)
            continue
        argv_run = ["--preset", preset, *overrides(seq_len, total_batch, remat, attention, args.tiny)]
        print(f"\n=== {preset} seq {seq_len} batch {total_batch} ({n_gpus} devices) remat {remat} attention "
              f"{attention} (t={elapsed:.0f} s)", flush=True)
        try:
            experiment = bench.load_experiment("quickstart", argv_run[2:], preset=preset)
            record = bench.bench_train(experiment, steps=args.steps, warmup=2)
            bench.print_train(record)
            record.update(per_gpu(record, n_gpus))
        except Exception as e:  # an OOM at one batch size must not lose the other runs
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            traceback.print_exc(limit=2)
            record = {"benchmark": "train", "error": first}
        record.update({"preset": preset, "attention_asked": attention, "target_mfu": TARGETS[preset],
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "command": "python -m tools.bench train --experiment quickstart " + " ".join(argv_run)})
        records.append(record)
        with open(results_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        bench.emit_json(record)
        jax.clear_caches()

    print("\nsummary (MFU per GPU against its dense bf16 peak; targets: gpt2-124m 45%, llama3.2-1b 50%)")
    rows = []
    for r in records:
        mfu = r.get("mfu_per_gpu")
        rows.append([r["preset"], r["attention_asked"], r.get("attention", ""), r.get("batch_size", ""),
                     r.get("seq_len", ""), r.get("remat", ""), f"{r['step_ms']:.1f}" if "step_ms" in r else "",
                     f"{r['tokens_per_sec_per_gpu']:,.0f}" if mfu else "",
                     f"{mfu:.1%}" if mfu is not None else r.get("error", "")[:60],
                     "" if mfu is None else ("yes" if mfu >= r["target_mfu"] else "no")])
    print_grid(["model", "attention asked", "attention", "batch", "seq", "remat", "ms/step", "tokens/s/GPU",
                "MFU/GPU", "target met"], rows)
    best = {}
    for r in records:
        key = f"{r['preset']} attention={r['attention_asked']}"
        if r.get("mfu_per_gpu") is not None and r["mfu_per_gpu"] > best.get(key, {}).get("mfu_per_gpu", -1):
            best[key] = r
    summary = {"benchmark": "gpu_check", "gpus": n_gpus, "device": jax.devices()[0].device_kind,
               "best": {k: {"mfu_per_gpu": v["mfu_per_gpu"], "tokens_per_sec_per_gpu": v["tokens_per_sec_per_gpu"],
                            "batch_size": v["batch_size"], "remat": v["remat"], "command": v["command"]}
                        for k, v in best.items()},
               "runs": len(records), "elapsed_s": time.perf_counter() - started}
    with open(os.path.join(args.out, "gpu_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    bench.emit_json(summary)
    return records


def exit_status(records: list[dict]) -> int:
    """0 when at least one run measured its step; 1 when every run failed or none started."""
    return 0 if any("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(exit_status(main()))
