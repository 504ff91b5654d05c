"""Sweeps: model shapes (`reshape_model`, `AspectRatioShapes`), IsoFLOP grids of Experiments (`isoflop_grid`,
`budget_grid`), WSD runs of one model that branch from a shared trunk (`wsd_branches`, `branch_from_trunk`), and
checking an IsoFLOP sweep before it runs (`member_flops`, `check_budgets` and
`all_finished`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from jaxlm import storage
from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.flops import count_params, flops_per_token
from jaxlm.logging import read_metrics


def member_train(base: Experiment, name: str, steps: int):
    """A sweep member's train section: `steps` long, in its own directory under the sweep's, evaluating and
    logging at least at its last step."""
    return dataclasses.replace(
        base.train,
        steps=steps,
        out_dir=storage.join(base.run_dir, name),
        eval_every=min(base.train.eval_every, steps),
        log_every=min(base.train.log_every, steps),
    )


def reshape_model(base: ModelConfig, n_layers: int, d_model: int, head_dim: int) -> ModelConfig:
    """`base` with a new depth and width and heads of `head_dim`, built afresh so that derived fields resolve.

    A d_ff by rule (4 d_model for GELU, Llama's for SwiGLU) stays by rule; a custom one keeps its ratio to d_model. Grouped-query attention
    keeps (as near as the head count allows) its group size.
    """
    heads = d_model // head_dim
    group = base.n_heads // base.n_kv_heads
    if d_model % head_dim or heads % group:
        raise ConfigError(
            f"d_model={d_model} is not a whole number of {group}-head groups of head_dim {head_dim}: pick a width "
            f"that is a multiple of {group * head_dim}"
        )
    kv = heads // group
    d_ff = None if base.d_ff == base.rule("d_ff") else max(1, round(base.d_ff * d_model / base.d_model))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(n_layers=n_layers, d_model=d_model, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, d_ff=d_ff)
    return ModelConfig(**fields)


@dataclass(frozen=True)
class AspectRatioShapes:
    """A family of shapes: d_model / n_layers near `aspect`, d_model a multiple of `head_dim`, heads of `head_dim`.

    Called with a base config and a target parameter count, it returns the shape whose count (`count`) is nearest
    the target in log; among shapes within 5% of that, the one whose aspect ratio is nearest `aspect`. Widths
    within a factor `band` of aspect * n_layers are allowed, which keeps the ladder of sizes fine at small scale.
    With grouped-query attention, widths are whole numbers of head groups, so the group size is kept.
    """

    aspect: float = 64.0
    head_dim: int = 64
    band: float = 2.0
    max_layers: int = 256
    count: Callable[[ModelConfig], int] = count_params

    def __post_init__(self):
        if not (self.aspect > 0 and self.head_dim > 0 and self.band >= 1 and self.max_layers > 0):
            raise ConfigError(
                f"AspectRatioShapes(aspect={self.aspect}, head_dim={self.head_dim}, band={self.band}, "
                f"max_layers={self.max_layers}): aspect, head_dim and max_layers must be positive and band >= 1"
            )

    def _widths(self, n_layers: int, group: int) -> range:
        step = self.head_dim * group
        lo = max(1, math.ceil(self.aspect * n_layers / self.band / step))
        hi = max(lo, math.floor(self.aspect * n_layers * self.band / step))
        return range(lo * step, hi * step + 1, step)

    def __call__(self, base: ModelConfig, n_params: float) -> ModelConfig:
        target = math.log(max(n_params, 1.0))
        group = base.n_heads // base.n_kv_heads
        best: list[tuple[float, float, ModelConfig]] = []
        for n_layers in range(1, self.max_layers + 1):
            widths = self._widths(n_layers, group)
            # Counts grow with depth at a fixed width band: stop once the narrowest shape is far above target.
            if _shape(base, n_layers, widths[0], self.head_dim, self.count)[1] > target + math.log(4):
                break
            for d_model in widths:
                cfg, log_count = _shape(base, n_layers, d_model, self.head_dim, self.count)
                best.append((abs(log_count - target), abs(math.log(d_model / (n_layers * self.aspect))), cfg))
        if not best:
            return reshape_model(base, 1, self._widths(1, group)[0], self.head_dim)
        nearest = min(b[0] for b in best)
        return min((b for b in best if b[0] <= nearest + math.log(1.05)), key=lambda b: (b[1], b[0]))[2]


@functools.lru_cache(maxsize=1 << 14)
def _shape(base: ModelConfig, n_layers: int, d_model: int, head_dim: int, count) -> tuple[ModelConfig, float]:
    """A candidate shape and the log of its count. Cached: a grid's budgets search the same shapes of one base."""
    cfg = reshape_model(base, n_layers, d_model, head_dim)
    return cfg, math.log(count(cfg))


def _describe(cfg: ModelConfig) -> str:
    layers = "layer" if cfg.n_layers == 1 else "layers"
    return f"{cfg.n_layers} {layers} x d_model {cfg.d_model}, {cfg.n_heads} heads"


def isoflop_grid(
    base: Experiment,
    budgets: Sequence[float],
    *,
    sizes_per_budget: int = 5,
    shape_rule: Callable[[ModelConfig, float], ModelConfig] = AspectRatioShapes(),
    tokens_per_param: float = 20.0,
    span: float = 3.0,
    warmup_fraction: float = 0.05,
    count: Callable[[ModelConfig], int] = count_params,
    seeds: Sequence[int] | None = None,
) -> tuple[Experiment, ...]:
    """An IsoFLOP sweep: for each compute budget C, `sizes_per_budget` shapes spanning the expected optimum.

    The centre is Chinchilla's rule of thumb, D = tokens_per_param x N with C = 6ND, i.e. N = sqrt(C / (6 x 20));
    sizes are log-spaced from centre / span to centre x span and mapped to shapes by `shape_rule(base.model, N)`.
    Each member trains on D = C / flops_per_token tokens: TrainConfig.steps = D / (batch_size x seq_len), which is
    also the learning-rate schedule's length, with `warmup_fraction` of it as warmup. Members are named
    f"{base.name}-C{C:.0e}-N{N}" (N by `count`, which should be the count the shape rule targets) and write to
    <base run dir>/<member name>, so that the base's run directory is the sweep's (`collect_results`). With
    `seeds`, each shape is trained once per seed (TrainConfig.seed: initialisation and data order), named
    f"...-N{N}-s{seed}": the fits take every run, so the runs' own noise averages out.
    """
    if sizes_per_budget < 3:
        raise ConfigError(
            f"sizes_per_budget={sizes_per_budget}: a parabola per budget needs at least 3 sizes (5 is usual)"
        )
    if not (span > 1 and tokens_per_param > 0 and 0 <= warmup_fraction < 1):
        raise ConfigError(
            f"span={span}, tokens_per_param={tokens_per_param}, warmup_fraction={warmup_fraction}: span must exceed 1, "
            "tokens_per_param be positive and warmup_fraction be in [0, 1)"
        )
    if not budgets:
        raise ConfigError("isoflop_grid needs at least one compute budget")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"seeds={tuple(seeds)!r}: give one or more distinct seeds, or None for the base's own")
    tokens_per_step = base.data.batch_size * base.data.seq_len
    smallest = shape_rule(base.model, 1.0)
    n_smallest = count(smallest)
    members: list[Experiment] = []
    for C in sorted(float(c) for c in budgets):
        if not (math.isfinite(C) and C > 0):
            raise ConfigError(f"compute budget {C!r} is not a positive number of FLOPs")
        centre = math.sqrt(C / (6.0 * tokens_per_param))
        if centre / span < n_smallest:
            c_min = 6.0 * tokens_per_param * (n_smallest * span) ** 2
            raise ConfigError(
                f"budget C={C:.3g} is too small for the smallest shape ({_describe(smallest)}, N={n_smallest:,}): its "
                f"sizes would start at {centre / span:,.0f} parameters; use budgets of at least {c_min:.3g} FLOPs"
            )
        shapes: dict[tuple[int, int, int], ModelConfig] = {}
        for target in centre * np.geomspace(1 / span, span, sizes_per_budget):
            cfg = shape_rule(base.model, float(target))
            shapes[(cfg.n_layers, cfg.d_model, cfg.n_heads)] = cfg
        if len(shapes) < sizes_per_budget:
            raise ConfigError(
                f"budget C={C:.3g}: the shape rule gives only {len(shapes)} distinct shapes for sizes "
                f"{centre / span:,.0f} to {centre * span:,.0f}; widen span or use a finer shape family"
            )
        for cfg in sorted(shapes.values(), key=count):
            n = count(cfg)
            steps = round(C / flops_per_token(cfg, base.data.seq_len) / tokens_per_step)
            if steps < 1:
                raise ConfigError(
                    f"budget C={C:.3g} gives the {n:,}-parameter model less than one step of "
                    f"{tokens_per_step:,} tokens; raise the budget or lower batch_size x seq_len"
                )
            for seed in (base.train.seed,) if seeds is None else seeds:
                name = f"{base.name}-C{C:.0e}-N{n}" + ("" if seeds is None else f"-s{seed}")
                members.append(
                    dataclasses.replace(
                        base,
                        name=name,
                        model=cfg,
                        optim=dataclasses.replace(base.optim, warmup_steps=round(warmup_fraction * steps)),
                        train=dataclasses.replace(member_train(base, name, steps), seed=seed),
                    )
                )
    return tuple(members)


def budget_grid(
    base: Experiment, budgets: Sequence[float], **grid
) -> tuple[tuple[Experiment, ...], Mapping[str, float]]:
    """The sweep's members (budget by budget) and each member's declared compute budget, by name.

    `grid` holds `isoflop_grid`'s keyword arguments (sizes_per_budget, shape_rule, span, tokens_per_param, ...).
    """
    members, budget_of = [], {}
    for budget in budgets:
        for member in isoflop_grid(base, [budget], **grid):
            members.append(member)
            budget_of[member.name] = float(budget)
    return tuple(members), MappingProxyType(budget_of)


def member_flops(member: Experiment) -> float:
    """Training FLOPs of a member as configured: flops_per_token x steps x tokens per step."""
    tokens = member.train.steps * member.data.batch_size * member.data.seq_len
    return flops_per_token(member.model, member.data.seq_len) * tokens


def check_budgets(members: Sequence[Experiment], budget_of: Mapping[str, float], rtol: float = 0.01) -> None:
    """Raise ConfigError unless every member still spends its declared budget (whole steps: within rtol)."""
    for member in members:
        budget = budget_of.get(member.name)
        if budget is None:
            raise ConfigError(f"{member.name!r} is not a member of this sweep: do not override --name")
        spent = member_flops(member)
        if abs(spent / budget - 1) > rtol:
            raise ConfigError(
                f"{member.name}: the overrides make it train on {spent:.3g} FLOPs, not its budget {budget:.3g} "
                "(a member's steps are fixed by the grid): change the sweep's base or budgets in its module instead"
            )


def all_finished(members: Sequence[Experiment]) -> bool:
    """Whether every member's run has finished (its run directory holds summary.json)."""
    return all(storage.exists(storage.join(m.run_dir, "summary.json")) for m in members)


def wsd_branches(
    base: Experiment, tokens: Sequence[float], *, decay_fraction: float = 0.2, warmup_fraction: float = 0.05
) -> tuple[Experiment, ...]:
    """Runs of one model (`base.model`) to several token counts under the WSD schedule (Hägele et al. 2024).

    Each member is a complete run: warmup, a stable phase at the peak rate, and a linear cooldown over its final
    `decay_fraction` of steps (OptimConfig.schedule='wsd'). Warmup is a fraction of the longest run and is the
    same for all, so up to its cooldown every member follows exactly the learning rate, data order and updates of
    the longest one: the members share one stable phase. The longest member comes first (the trunk) and saves a
    checkpoint at each other member's cooldown start. Run it, then start each shorter member from the trunk's
    checkpoint with `branch_from_trunk(trunk, member)`, which copies that checkpoint (parameters, optimizer state,
    data position) into the member's run directory so that the trainer resumes it there: only its cooldown is
    trained, and its result is identical to training it alone. (`TrainConfig.init_from=<trunk>/checkpoints/<step>`
    is a lighter alternative that loads the parameters only: the optimizer moments and data order start afresh,
    so the result is close to, not the same as, the full run.) Members are named f"{base.name}-wsd-D{D:.0e}".
    """
    if not tokens:
        raise ConfigError("wsd_branches needs at least one token count")
    if not (0 < decay_fraction < 1 and 0 <= warmup_fraction < 1):
        raise ConfigError(
            f"decay_fraction={decay_fraction}, warmup_fraction={warmup_fraction}: both must be in (0, 1) ([0, 1) for "
            "warmup)"
        )
    tokens_per_step = base.data.batch_size * base.data.seq_len
    steps = sorted({round(t / tokens_per_step) for t in tokens}, reverse=True)
    if steps[-1] < 1:
        raise ConfigError(f"token count {min(tokens):.3g} is less than one step of {tokens_per_step:,} tokens")
    warmup = round(warmup_fraction * steps[0])
    optim = dataclasses.replace(base.optim, schedule="wsd", decay_fraction=decay_fraction, warmup_steps=warmup)
    starts = [cooldown_start(s, optim) for s in steps[1:]]
    if starts and min(starts) <= warmup:
        raise ConfigError(
            f"the shortest run ({steps[-1]} steps) would start its cooldown before the shared warmup of {warmup} "
            "steps ends; lower warmup_fraction or drop the shortest token count"
        )
    trunk_saves = math.gcd(*starts) if starts else base.train.ckpt_every
    members = []
    for i, n_steps in enumerate(steps):
        name = f"{base.name}-wsd-D{n_steps * tokens_per_step:.0e}"
        train = member_train(base, name, n_steps)
        if i == 0 and starts:
            train = dataclasses.replace(train, ckpt_every=trunk_saves, keep_checkpoints=n_steps // trunk_saves + 1)
        members.append(dataclasses.replace(base, name=name, optim=optim, train=train))
    return tuple(members)


def cooldown_start(steps: int, optim) -> int:
    """The step after which a WSD run of `steps` steps starts its cooldown (as jaxlm.optim.make_schedule has it)."""
    return steps - max(int(round(optim.decay_fraction * steps)), 1)


def branch_from_trunk(trunk: Experiment, branch: Experiment) -> str:
    """Seed `branch`'s run directory with the trunk's checkpoint at the branch's cooldown start, and the trunk's
    metrics up to it, so that training the branch resumes there. Returns the checkpoint directory copied."""
    step = cooldown_start(branch.train.steps, branch.optim)
    same = ("model", "data", "mesh")
    if any(getattr(trunk, s) != getattr(branch, s) for s in same) or trunk.optim != branch.optim:
        raise ConfigError(f"{branch.name} is not a branch of {trunk.name}: their model, data or optimizer differ")
    if trunk.train.seed != branch.train.seed or branch.train.steps > trunk.train.steps:
        raise ConfigError(f"{branch.name} is not a branch of {trunk.name}: it has another seed or is longer")
    source = os.path.join(trunk.run_dir, "checkpoints", str(step))
    if not os.path.isdir(source):
        raise ConfigError(
            f"the trunk {trunk.run_dir} has no checkpoint at step {step}, where {branch.name} starts its cooldown: "
            "train the trunk first (wsd_branches makes it save there)"
        )
    target = os.path.join(branch.run_dir, "checkpoints", str(step))
    if os.path.exists(os.path.join(branch.run_dir, "checkpoints")):
        raise ConfigError(f"{branch.run_dir} already has checkpoints; delete it to branch it again")
    shutil.copytree(source, target)
    rows = [r for r in read_metrics(os.path.join(trunk.run_dir, "metrics.jsonl")) if r["step"] <= step]
    with open(os.path.join(branch.run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return target
