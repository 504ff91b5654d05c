"""Benchmarks: the train step, KV-cache decoding, the input pipeline, and compilation.

    python -m tools.bench train --experiment quickstart [--preset gpt2-124m] [--model.n-layers 6 ...] --steps 20
    python -m tools.bench train --experiment quickstart --torch      # also the PyTorch reference, interleaved
    python -m tools.bench train --experiment quickstart --versus='--model.remat none'   # an A/B in one run
    python -m tools.bench train --experiment quickstart --torch --profile 3   # where each step's time goes
    python -m tools.bench decode [--prompt-len 64] [--new-tokens 32]
    python -m tools.bench data --experiment quickstart
    python -m tools.bench compile --experiment quickstart [--depths 2 8 24]
    python -m tools.bench checkpoint --experiment quickstart [--steps 60 --every 5 --rounds 2]
    python -m tools.bench harness --run runs/quickstart [--items 200]   # lm_eval against jaxlm's scorer

Arguments other than the tool's own are the experiment's overrides (`--section.field value`, as for
`python -m experiments.<name>`); `--preset NAME` first swaps in a published model shape from
`jaxlm.config.PRESETS`. The train benchmark feeds random tokens (no corpus is read), so it times the step alone.
Every subcommand prints a table and ends with one JSON line holding its figures.

Step times are medians over the timed steps, each step waited for; the spread is the 10th-90th percentile
range. On a machine shared with other work, compare only figures measured in the same run: `--torch`
interleaves the two implementations step by step for that reason. On an oversubscribed CPU a multi-threaded
PyTorch step slows down far more than a JAX one (its threads wait for each other at every operation), so
`taskset -c 0 ... --torch --torch-threads 1` gives the steadier one-core comparison.

The two CPU comparison configs (GPT-2 style: no biases, GELU, tied embeddings, AdamW, clipping):

    python -m tools.bench train --experiment quickstart_gpt2 --model.n-layers 6 --model.d-model 384 \\
        --model.n-heads 6 --model.n-kv-heads 6 --model.d-ff 1536 --model.bias False --model.qkv-bias False \\
        --model.vocab-size 65 --data.tokenizer char --data.seq-len 256 --data.batch-size 8 --steps 5 --torch
    python -m tools.bench train --experiment quickstart_gpt2 --model.n-layers 4 --model.d-model 128 \\
        --model.n-heads 4 --model.n-kv-heads 4 --model.d-ff 512 --model.bias False --model.qkv-bias False \\
        --model.vocab-size 65 --data.tokenizer char --data.seq-len 64 --data.batch-size 12 --steps 20 --torch
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxlm.config import PRESETS, REMAT_POLICIES, DataConfig, Experiment
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.logging import print_grid

USAGE_ERROR = 2


# ------------------------------------------------------------------------------------------------ experiments


def load_experiment(name: str, overrides: Sequence[str], preset: str | None = None) -> Experiment:
    """`experiments.<name>.EXPERIMENT` (or the first selected member of its SWEEP), preset and overrides applied."""
    from jaxlm import cli

    return cli.load_experiments(name, overrides, preset=preset)[0]


def synthetic_tokens(experiment: Experiment, seed: int = 0) -> np.ndarray:
    """Random token rows [batch, seq_len + 1]: inputs are the first seq_len, targets the last seq_len."""
    rng = np.random.default_rng(seed)
    shape = (experiment.data.batch_size, experiment.data.seq_len + 1)
    return rng.integers(0, experiment.model.vocab_size, shape, dtype=np.int32)


# --------------------------------------------------------------------------------------------------- helpers


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = ("temp", "argument", "output", "alias", "generated_code")
    return {f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes", 0)) for n in names}


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def emit_json(record: dict[str, Any]) -> None:
    """The last line of every subcommand: one JSON object."""
    print(json.dumps(record, sort_keys=True, default=float), flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class CompiledStep:
    """A compiled train step with the state and batch it runs on (the state is donated: use `run`)."""

    compiled: Any
    state: Any
    batch: dict[str, Any]
    lower_s: float
    compile_s: float
    memory: dict[str, int]

    def run(self) -> None:
        import jax

        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])


def _settings(experiment: Experiment) -> dict[str, str]:
    """Remat and attention as they took effect: "dots (auto)" where "auto" chose dots."""
    from jaxlm import model

    m = experiment.model
    remat, attention = model.remat_policy(m), model.attention_impl(m, experiment.data.seq_len)
    return {
        "remat": f"{remat} (auto)" if m.remat == "auto" else m.remat,
        "attention": f"{attention} (auto)" if m.attention == "auto" else m.attention,
    }


def build_train_step(experiment: Experiment, tokens: np.ndarray) -> CompiledStep:
    """jaxlm's jitted train step, as `jaxlm.train.train` builds it, compiled ahead of time on a fixed batch."""
    from jaxlm import sharding, train

    mesh = sharding.make_mesh(experiment.mesh)
    sharding.check_fits(experiment, mesh)
    state = train.init_train_state(experiment, mesh)
    batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
    compiled, lower_s, compile_s = _compile_timed(train.jit_train_step(experiment, mesh), state, batch)
    return CompiledStep(compiled, state, batch, lower_s, compile_s, _memory(compiled))


def _compile_timed(jitted: Any, *args: Any) -> tuple[Any, float, float]:
    """`jitted` lowered and compiled for `args`: (the compiled function, seconds lowering, seconds compiling).

    The persistent compilation cache is bypassed: its key leaves out the program's source metadata, so a cached
    executable may carry the op names of another program with the same computation (which the profile reads), and
    a cache hit would be timed as a compile."""
    import jax

    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _import_torch() -> tuple[Any, Any]:
    """(torch, tools.bench.torch_reference), or a ConfigError saying how to get PyTorch: checked before compiling."""
    try:
        import torch

        from tools.bench import torch_reference
    except ImportError:
        raise ConfigError(
            "--torch needs PyTorch: pip install torch (the CPU build is enough), or leave out --torch"
        ) from None
    return torch, torch_reference


def _torch_step(
    experiment: Experiment, tokens: np.ndarray, threads: int | None = None
) -> tuple[Callable[[], None], dict[str, Any]]:
    torch, torch_reference = _import_torch()
    if threads:
        torch.set_num_threads(threads)
    step, model = torch_reference.make_train_step(experiment)
    batch = torch.from_numpy(tokens.astype(np.int64))

    def run() -> None:
        float(step(batch))  # reading the loss is the step's end (eager CPU ops are already done)

    info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_params": torch_reference.count_params(model)}
    return run, info


def _step_stats(times: Sequence[float], tokens_per_step: int, prefix: str = "") -> dict[str, float]:
    median = statistics.median(times)
    return {
        f"{prefix}step_ms": 1e3 * median,
        f"{prefix}step_ms_p10": 1e3 * _percentile(times, 10),
        f"{prefix}step_ms_p90": 1e3 * _percentile(times, 90),
        f"{prefix}step_ms_min": 1e3 * min(times),
        f"{prefix}tokens_per_sec": tokens_per_step / median,
    }


def variants(experiment: Experiment, module: str, versus: Sequence[str]) -> list[tuple[str, Experiment]]:
    """The experiment with each string of further overrides applied, parsed before anything compiles so that
    a typo fails at once (its hint names `python -m experiments.<module> --help`, which lists them)."""
    import shlex

    from jaxlm import cli

    prog = f"python -m experiments.{module}"
    return [(overrides, cli.parse(experiment, shlex.split(overrides), prog=prog)[0]) for overrides in versus]


def bench_train(
    experiment: Experiment,
    steps: int = 10,
    warmup: int = 2,
    with_torch: bool = False,
    peak: float | None = None,
    torch_threads: int | None = None,
    versus: Sequence[tuple[str, Experiment]] = (),
    profile: int = 0,
) -> dict[str, Any]:
    """Time jaxlm's train step (and, with `with_torch`, the PyTorch reference, step for step) on random tokens.

    Each entry of `versus` is (overrides, the experiment with them applied), as `variants` makes them: that
    variant's step is timed in the same run, interleaved with the others, for A/B comparisons on a noisy
    machine. With `profile` > 0, that many further steps of each implementation are profiled
    (`tools.bench.step_profile`), after the timed ones.
    """
    import jax

    from jaxlm import flops, model

    if steps < 1 or warmup < 0 or profile < 0:
        raise ConfigError(
            f"--steps must be >= 1, --warmup and --profile >= 0, got {steps}, {warmup} and {profile}"
        )
    if with_torch:
        _import_torch()  # a missing PyTorch fails here, not after compiling jaxlm's step
    tokens = synthetic_tokens(experiment, experiment.train.seed)
    step = build_train_step(experiment, tokens)
    runners: dict[str, Callable[[], None]] = {"jax": step.run}
    versus_steps = []
    for i, (overrides, variant) in enumerate(versus):
        variant_step = build_train_step(variant, synthetic_tokens(variant, variant.train.seed))
        runners[f"versus{i}"] = variant_step.run
        versus_steps.append((overrides, variant, variant_step))
    record: dict[str, Any] = {}
    if with_torch:
        runners["torch"], info = _torch_step(experiment, tokens, torch_threads)
        record.update(info)
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(steps):  # interleaved, so that both see the same machine load
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    if profile:
        from tools.bench import step_profile

        jax_profile = step_profile.profile_jax(step.run, step.compiled.as_text(), profile, jax.devices()[0].platform)
        record["profile"] = {"steps": profile, "jax": jax_profile}
        if with_torch:
            record["profile"]["torch"] = step_profile.profile_torch(runners["torch"], profile)

    if peak is None:
        peak_flops, peak_source = flops.peak_flops()
    else:
        peak_flops, peak_source = peak, "given on the command line"
    m, d = experiment.model, experiment.data
    tokens_per_step = d.batch_size * d.seq_len
    fpt = flops.flops_per_token(m, d.seq_len)
    record.update(_step_stats(times["jax"], tokens_per_step))
    achieved = record["tokens_per_sec"] * fpt
    record.update({
        "benchmark": "train", "experiment": experiment.name, "date": _now(),
        "device": jax.devices()[0].device_kind, "device_count": jax.device_count(), "jax_version": jax.__version__,
        "architecture": m.architecture, "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
        "vocab_size": m.vocab_size, "seq_len": d.seq_len, "batch_size": d.batch_size, "dtype": m.dtype,
        **_settings(experiment), "scan_layers": m.scan_layers,
        "grad_accum": experiment.train.grad_accum, "params": flops.count_params(m),
        "steps": steps, "warmup": warmup, "tokens_per_step": tokens_per_step,
        "flops_per_token": fpt, "achieved_flops": achieved, "peak_flops": peak_flops, "peak_source": peak_source,
        "mfu": achieved / peak_flops, "lower_s": step.lower_s, "compile_s": step.compile_s, **step.memory,
        "compiler_options": model.compiler_options(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    })
    record["versus"] = []
    for i, (overrides, variant, variant_step) in enumerate(versus_steps):
        stats = _step_stats(times[f"versus{i}"], variant.data.batch_size * variant.data.seq_len)
        record["versus"].append({
            "overrides": overrides, **stats, "ratio_vs_base": stats["tokens_per_sec"] / record["tokens_per_sec"],
            **_settings(variant),
            "compile_s": variant_step.compile_s, **variant_step.memory,
        })
    if with_torch:
        record.update(_step_stats(times["torch"], tokens_per_step, prefix="torch_"))
        record["torch_mfu"] = record["torch_tokens_per_sec"] * fpt / peak_flops
        record["ratio_vs_torch"] = record["tokens_per_sec"] / record["torch_tokens_per_sec"]
        notes = []
        if m.dropout > 0:
            notes.append("the reference has no dropout")
        if m.dtype != "float32":
            notes.append("the reference runs in float32")
        if experiment.train.grad_accum > 1:
            notes.append("the reference does not accumulate microbatches")
        if notes:
            record["torch_notes"] = "; ".join(notes)
    return record


def print_train(record: dict[str, Any]) -> None:
    r = record
    spread = f"p10 {r['step_ms_p10']:.1f} / p90 {r['step_ms_p90']:.1f} / min {r['step_ms_min']:.1f} ms"
    rows = [
        ("model", f"{r['architecture']} {r['n_layers']}L d{r['d_model']} h{r['n_heads']} V{r['vocab_size']} "
                  f"({r['params']:,} params, {r['dtype']}, remat {r['remat']}, scan {r['scan_layers']}, "
                  f"attention {r['attention']})"),
        ("batch", f"{r['batch_size']} x {r['seq_len']} tokens, grad_accum {r['grad_accum']}"),
        ("device", f"{r['device']} x {r['device_count']} (jax {r['jax_version']})"),
        ("step time", f"{r['step_ms']:.1f} ms median over {r['steps']} steps ({spread})"),
        ("tokens/s", f"{r['tokens_per_sec']:,.0f}"),
        ("model FLOPs/token", f"{r['flops_per_token']:,.0f}"),
        ("achieved FLOP/s", f"{r['achieved_flops'] / 1e9:,.1f} GFLOP/s"),
        ("peak FLOP/s", f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_source']})"),
        ("MFU", f"{r['mfu']:.1%}"),
        ("compile", f"{r['compile_s']:.1f} s (+ {r['lower_s']:.1f} s tracing and lowering)"),
        ("memory", f"temp {_fmt_bytes(r.get('temp_bytes'))}, arguments {_fmt_bytes(r.get('argument_bytes'))}, "
                   f"outputs {_fmt_bytes(r.get('output_bytes'))}, aliased {_fmt_bytes(r.get('alias_bytes'))}"),
    ]
    for v in r.get("versus", []):
        rows.append((f"versus {v['overrides']}",
                     f"{v['step_ms']:.1f} ms median (p10 {v['step_ms_p10']:.1f} / p90 {v['step_ms_p90']:.1f} ms), "
                     f"{v['ratio_vs_base']:.2f}x the tokens/s above; temp {_fmt_bytes(v.get('temp_bytes'))}"))
    if "torch_step_ms" in r:
        rows += [
            ("torch step time", f"{r['torch_step_ms']:.1f} ms median (p10 {r['torch_step_ms_p10']:.1f} / "
                                f"p90 {r['torch_step_ms_p90']:.1f} ms; torch {r['torch_version']}, "
                                f"{r['torch_threads']} threads)"),
            ("torch tokens/s", f"{r['torch_tokens_per_sec']:,.0f} (MFU {r['torch_mfu']:.1%})"),
            ("jaxlm / torch", f"{r['ratio_vs_torch']:.2f}x tokens/s (same run, steps interleaved)"),
        ]
        if "torch_notes" in r:
            rows.append(("torch notes", r["torch_notes"]))
    print_table(f"train step: {r['experiment']}", rows)
    if "profile" in r:
        from tools.bench.step_profile import print_profile

        print_profile(r["profile"], r["step_ms"], r.get("torch_step_ms"))


# ---------------------------------------------------------------------------------------------------- decode


def bench_decode(
    models: dict[str, Any], batches: Sequence[int], prompt_len: int, new_tokens: int, uncached_steps: int | None
) -> list[dict[str, Any]]:
    """`tools.bench.decode.benchmark_decode` for each model and batch size."""
    from tools.bench.decode import benchmark_decode

    rows = []
    for label, cfg in models.items():
        for batch in batches:
            result = benchmark_decode(cfg, batch, prompt_len, new_tokens, seed=0, uncached_steps=uncached_steps)
            rows.append({"model": label, **result})
            print(f"  {label} batch {batch}: done", flush=True)
    return rows


def print_decode(rows: list[dict[str, Any]]) -> None:
    shape = ("n_layers", "d_model", "vocab_size")
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k not in shape]
    header = ["model"] + keys
    grid = [[r["model"]] + [f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in keys] for r in rows]
    print("decode (KV cache vs full recompute)")
    print_grid(header, grid)


# ------------------------------------------------------------------------------------------------------ data


def loader_tokens_per_sec(data_config, prepared, seconds: float = 3.0) -> float:
    """Input tokens per second the train iterator delivers to one process, after a short warm-up."""
    from jaxlm.data import make_iterator

    it = make_iterator(data_config, prepared, "train", seed=0)
    try:
        for _ in range(3):
            next(it)
        tokens = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            tokens += next(it)["inputs"].size
        return tokens / (time.perf_counter() - start)
    finally:
        it.close()


def bench_data(
    experiment: Experiment, seconds: float, train_steps: int, gpt2_train_steps: int
) -> list[dict[str, Any]]:
    """Loader tokens/s beside train-step tokens/s: for the experiment, and for GPT-2 124M's 8 x 1024 batches."""
    from jaxlm.data import prepare_data

    prepared = prepare_data(experiment.data)
    gpt2 = PRESETS["gpt2-124m"]
    gpt2_data = dataclasses.replace(experiment.data, seq_len=1024, batch_size=8)
    gpt2_model = dataclasses.replace(gpt2, vocab_size=max(gpt2.vocab_size, prepared.vocab_size))
    cases = [
        (experiment.name, experiment, train_steps),
        ("gpt2-124m 8x1024", dataclasses.replace(experiment, data=gpt2_data, model=gpt2_model), gpt2_train_steps),
    ]
    rows = []
    for label, exp, steps in cases:
        loader = loader_tokens_per_sec(exp.data, prepared, seconds=seconds)
        row: dict[str, Any] = {
            "case": label, "batch_size": exp.data.batch_size, "seq_len": exp.data.seq_len,
            "loader_tokens_per_sec": loader, "train_tokens_per_sec": None,
        }
        if steps > 0:
            train = bench_train(exp, steps=steps, warmup=1, peak=float("nan"))
            row["train_tokens_per_sec"] = train["tokens_per_sec"]
            row["loader_headroom"] = loader / train["tokens_per_sec"]
        rows.append(row)
    return rows


def _synthetic_c4(folder: str, files: int, mb_per_file: float) -> int:
    """C4-layout .json.gz shards of text whose 30,000 made-up words follow Zipf's law, as a language's do;
    returns the bytes of text written."""
    import gzip
    import json

    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(1, 11, 30_000)
    words = np.array(["".join(rng.choice(letters, n, p=None)) for n in lengths])
    zipf = 1.0 / np.arange(1, words.size + 1)
    zipf /= zipf.sum()
    total = 0
    os.makedirs(os.path.join(folder, "en"), exist_ok=True)
    for i in range(files):
        lines, size = [], 0
        while size < mb_per_file * 1e6:
            text = " ".join(rng.choice(words, int(rng.integers(100, 800)), p=zipf)) + "."
            lines.append(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x.org"}))
            size += len(text)
        total += size
        with gzip.open(os.path.join(folder, "en", f"c4-train.{i:05d}-of-01024.json.gz"), "wt") as f:
            f.write("\n".join(lines) + "\n")
    return total


def bench_prepare(workers: Sequence[int], files: int, mb_per_file: float, vocab_size: int) -> list[dict[str, Any]]:
    """Preparation of C4-layout shards (sentencepiece BPE, trained once beforehand): text MB/s with each number
    of worker processes, and loader tokens/s at 256 x 2048 rows for one process."""
    import tempfile

    from jaxlm.data import prepare_data

    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-data-") as tmp:
        text_bytes = _synthetic_c4(tmp, files, mb_per_file)
        base = DataConfig(source=f"shards:{tmp}/en/*.json.gz", val_fraction=0.1, vocab_size=vocab_size,
                          tokenizer_sample_bytes=2_000_000, cache_dir=os.path.join(tmp, "cache"), seq_len=2048,
                          batch_size=256)
        base = dataclasses.replace(base, data_dir=os.path.join(tmp, "prepared"), prepare_workers=max(workers))
        prepared = prepare_data(base)  # untimed: trains the tokenizer, which every timed run then reuses
        for n in workers:
            shutil.rmtree(prepared.tokens_dir)
            start = time.perf_counter()
            prepared = prepare_data(dataclasses.replace(base, prepare_workers=n))
            seconds = time.perf_counter() - start
            rows.append({"workers": n, "text_mb": text_bytes / 1e6, "seconds": seconds,
                         "mb_per_sec": text_bytes / 1e6 / seconds,
                         "mb_per_sec_per_worker": text_bytes / 1e6 / seconds / n})
        loader = loader_tokens_per_sec(base, prepared, seconds=5.0)
        rows.append({"loader_rows": "256x2048", "loader_tokens_per_sec": loader})
    return rows


def print_prepare(rows: list[dict[str, Any]]) -> None:
    print("shard preparation (C4-layout .json.gz, sentencepiece BPE) and the loader")
    grid = [[r["workers"], f"{r['text_mb']:.0f}", f"{r['seconds']:.1f}", f"{r['mb_per_sec']:.2f}",
             f"{r['mb_per_sec_per_worker']:.2f}"] for r in rows if "workers" in r]
    print_grid(["workers", "text MB", "seconds", "MB/s", "MB/s per worker"], grid)
    for r in rows:
        if "loader_rows" in r:
            print(f"loader, {r['loader_rows']} rows per process: {r['loader_tokens_per_sec']:,.0f} tokens/s")


def print_data(rows: list[dict[str, Any]]) -> None:
    print("input pipeline vs train step (tokens/s, one process)")
    grid = []
    for r in rows:
        train = r["train_tokens_per_sec"]
        grid.append([
            r["case"], f"{r['batch_size']}x{r['seq_len']}", f"{r['loader_tokens_per_sec']:,.0f}",
            "not measured" if train is None else f"{train:,.0f}",
            "" if train is None else f"{r['loader_headroom']:.1f}x",
        ])
    print_grid(["case", "batch", "loader tok/s", "train step tok/s", "loader / step"], grid)


# --------------------------------------------------------------------------------------------------- compile


def bench_compile(experiment: Experiment, depths: Sequence[int], policies: Sequence[str]) -> list[dict[str, Any]]:
    """Lowering and compile time, and the compiled step's memory, by depth and remat policy (scanned layers)."""
    import jax

    from jaxlm import sharding, train

    rows = []
    for n_layers in depths:
        for policy in policies:
            model = dataclasses.replace(experiment.model, n_layers=n_layers, remat=policy, scan_layers=True)
            exp = dataclasses.replace(experiment, model=model)
            mesh = sharding.make_mesh(exp.mesh)
            state = train.abstract_train_state(exp, mesh)
            batch_sharding = sharding.batch_sharding(mesh)
            shape = (exp.data.batch_size, exp.data.seq_len)
            batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding) for k in ("inputs", "targets")}
            compiled, lower_s, compile_s = _compile_timed(train.jit_train_step(exp, mesh), state, batch)
            rows.append({"n_layers": n_layers, "remat": policy, "lower_s": lower_s, "compile_s": compile_s,
                         **_memory(compiled)})
            print(f"  {n_layers} layers, remat {policy}: {compile_s:.1f} s", flush=True)
    return rows


def print_compile(rows: list[dict[str, Any]]) -> None:
    print("compile time and memory of the train step (scanned layers)")
    grid = [[r["n_layers"], r["remat"], f"{r['lower_s']:.2f}", f"{r['compile_s']:.2f}",
             _fmt_bytes(r.get("temp_bytes")), _fmt_bytes(r.get("argument_bytes"))] for r in rows]
    print_grid(["layers", "remat", "lower s", "compile s", "temp memory", "arguments"], grid)


# ------------------------------------------------------------------------------------------------ checkpoint

CHECKPOINT_MODES = ("none", "async", "blocking")


def bench_checkpoint(experiment: Experiment, steps: int, every: int, rounds: int) -> list[dict[str, Any]]:
    """The real training loop on the experiment's data, without intermediate checkpoints, with asynchronous saves
    every `every` steps, and with blocking ones; the three alternate for `rounds` rounds, each run in a fresh
    temporary directory (a fresh prefix under `--train.out-dir` when that is a gs:// URI, removed afterwards).
    A run's ms/step is the loop's own throughput figure (its first step, which compiles,
    left out), so a save counts with the steps around it."""
    import contextlib
    import io
    import tempfile
    import uuid

    from jaxlm import storage, train

    @contextlib.contextmanager
    def fresh_dir():
        if not storage.is_uri(experiment.train.out_dir):
            with tempfile.TemporaryDirectory() as local:
                yield local
            return
        remote = storage.join(experiment.train.out_dir, f"bench-{uuid.uuid4().hex[:8]}")
        try:
            yield remote
        finally:
            storage.rmtree(remote, missing_ok=True)

    if steps < 2 or not 1 <= every < steps or rounds < 1:
        raise ConfigError(
            f"need --steps >= 2, 1 <= --every < --steps and --rounds >= 1, got {steps}, {every} and {rounds}"
        )
    tokens_per_step = experiment.data.batch_size * experiment.data.seq_len
    rows = []
    for round_ in range(rounds):
        for mode in CHECKPOINT_MODES:
            with fresh_dir() as out_dir:
                settings = dataclasses.replace(
                    experiment.train, out_dir=out_dir, steps=steps, ckpt_every=steps if mode == "none" else every,
                    async_checkpoints=mode != "blocking", keep_checkpoints=steps, keep_best=False,
                    eval_every=steps, eval_steps=1, log_every=every, samples=0, init_from="",
                )
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    summary = train.train(dataclasses.replace(experiment, train=settings))
                saved = [n for n in storage.listdir(storage.join(out_dir, "checkpoints")) if n.isdigit()]
            row = {"round": round_, "mode": mode, "checkpoints": len(saved),
                   "step_ms": 1e3 * tokens_per_step / summary["tokens_per_sec"]}
            rows.append(row)
            print(f"  round {round_ + 1}, {mode}: {row['step_ms']:.1f} ms/step, {len(saved)} checkpoints", flush=True)
    return rows


def print_checkpoint(rows: list[dict[str, Any]], every: int) -> None:
    print(f"train loop ms/step with a checkpoint every {every} steps (none: only the final one)")
    rounds = sorted({r["round"] for r in rows})
    grid = [[mode] + [f"{r['step_ms']:.1f}" for r in rows if r["mode"] == mode] for mode in CHECKPOINT_MODES]
    print_grid(["saves"] + [f"round {i + 1}" for i in rounds], grid)


# ------------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    overrides = ("Other --section.field arguments override the experiment: `python -m experiments.<name> --help` "
                 "lists them.")
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__.split("\n\n")[0], allow_abbrev=False, epilog=overrides,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, allow_abbrev=False, help=help, epilog=overrides)
        p.add_argument("--experiment", default="quickstart", help="a module in experiments/ (default: quickstart)")
        p.add_argument("--preset", default=None, help=f"swap in a published model shape: {', '.join(PRESETS)}")
        return p

    p = command("train", help="time the train step on random tokens")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    p.add_argument("--torch", action="store_true", help="also run the PyTorch reference, interleaved")
    p.add_argument("--versus", action="append", default=[], metavar="OVERRIDES",
                   help="also time the step with these further overrides, interleaved (repeatable); write it "
                        "with '=', as the value starts with dashes: --versus='--model.remat none'")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N more steps: time by model part and operation (with --torch, its "
                        "operators too); exact on one core (taskset -c 1 ... --torch-threads 1)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch's intra-op threads (default: its own choice, one per core)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="FLOP/s to compute MFU against (default: the device table, or a measured matmul on CPU)")

    p = command("decode", help="KV-cache decoding, batch 1 and 16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--uncached-steps", type=int, default=4, help="full-recompute steps timed (0: all)")
    p.add_argument("--models", nargs="+", default=["experiment", "gpt2-124m"],
                   help="'experiment' (its model) and/or preset names (default: experiment gpt2-124m)")

    p = command("data", help="input pipeline tokens/s beside the train step's")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to read batches (default 5)")
    p.add_argument("--train-steps", type=int, default=5, help="timed train steps for the experiment (0: skip)")
    p.add_argument("--gpt2-train-steps", type=int, default=1,
                   help="timed train steps of GPT-2 124M at 8x1024 (slow on a CPU; 0: skip)")
    p.add_argument("--prepare-workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="worker processes for the shard-preparation figures (default: 1 and every core)")
    p.add_argument("--prepare-files", type=int, default=4, help="synthetic C4 files to prepare (default 4)")
    p.add_argument("--prepare-mb", type=float, default=8.0, help="MB of text per file (default 8)")

    p = command("compile", help="compile time and memory by depth and remat policy")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 8, 24])
    p.add_argument("--remat", nargs="+", default=[r for r in REMAT_POLICIES if r != "auto"], choices=REMAT_POLICIES)

    p = command("checkpoint", help="train-loop step time without, with asynchronous and with blocking checkpoints")
    p.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    p.add_argument("--every", type=int, default=5, help="steps between checkpoints (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three runs (default 2)")

    p = command("harness", help="lm-evaluation-harness against jaxlm's scorer: multiple-choice items/s")
    p.add_argument("--run", default="runs/quickstart", help="the run to evaluate (default runs/quickstart)")
    p.add_argument("--items", type=int, default=200, help="items from the standard library's source (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="requests per forward pass (default 32)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    try:
        experiment = load_experiment(args.experiment, overrides, args.preset)
        if args.command == "train":
            record = bench_train(
                experiment, steps=args.steps, warmup=args.warmup, with_torch=args.torch, peak=args.peak_flops,
                torch_threads=args.torch_threads, versus=variants(experiment, args.experiment, args.versus),
                profile=args.profile,
            )
            print_train(record)
        elif args.command == "decode":
            models = {}
            for name in args.models:
                if name == "experiment":
                    models[experiment.name] = experiment.model
                elif name in PRESETS:
                    models[name] = PRESETS[name]
                else:
                    raise ConfigError(f"--models: {name!r} is neither 'experiment' nor one of {', '.join(PRESETS)}")
            rows = bench_decode(models, args.batches, args.prompt_len, args.new_tokens, args.uncached_steps or None)
            print_decode(rows)
            record = {"benchmark": "decode", "date": _now(), "rows": rows}
        elif args.command == "data":
            rows = bench_data(experiment, args.seconds, args.train_steps, args.gpt2_train_steps)
            print_data(rows)
            prepare = bench_prepare(args.prepare_workers, args.prepare_files, args.prepare_mb,
                                    experiment.data.vocab_size)
            print_prepare(prepare)
            record = {"benchmark": "data", "experiment": experiment.name, "date": _now(), "rows": rows,
                      "prepare": prepare}
        elif args.command == "harness":
            from tools.bench.harness import bench_harness, print_harness

            record = {**bench_harness(args.run, args.items, args.batch_size), "date": _now()}
            print_harness(record)
        elif args.command == "checkpoint":
            rows = bench_checkpoint(experiment, args.steps, args.every, args.rounds)
            print_checkpoint(rows, args.every)
            record = {"benchmark": "checkpoint", "experiment": experiment.name, "date": _now(), "steps": args.steps,
                      "every": args.every, "rows": rows}
        else:
            rows = bench_compile(experiment, args.depths, args.remat)
            print_compile(rows)
            record = {"benchmark": "compile", "experiment": experiment.name, "date": _now(),
                      "seq_len": experiment.data.seq_len, "batch_size": experiment.data.batch_size, "rows": rows}
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    emit_json(record)
    return record


if __name__ == "__main__":
    main()
