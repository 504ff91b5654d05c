"""Ahead-of-time compilation for Cloud TPU topologies, on any machine: memory, FLOPs, collectives and bounds.

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes a TPU slice without the hardware
(`jax.experimental.topologies`) and compiles for it with the real TPU compiler. `compile_steps` compiles an
experiment's train and eval steps for such a slice from abstract shapes alone (no data prepared, no parameter
allocated), and reads off the compiled programs what a run on that slice would meet: the attention kernel,
bytes per device against the chip's HBM, the compiler's FLOPs and bytes, the collectives, and a roofline bound
on step time and MFU. `fit_search` finds the smallest change (remat policy, gradient accumulation, FSDP width)
under which the train step fits.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax

from jaxlm import flops, model, sharding, train
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError

# --------------------------------------------------------------------------------------------------- topologies

# Cloud TPU accelerator types: v4 and v5p names count TensorCores (two per chip: v5p-8 is 4 chips), v5e and v6e
# names count chips. `v5litepod` is v5e's name in the Cloud TPU API. Slices are 3-D tori (v4, v5p) or 2-D (v5e,
# v6e), in the shapes the Cloud TPU docs list for each size (v5p-128: 4x4x4, v5e-16: 4x4).
GENERATIONS: dict[str, tuple[str, int, int]] = {  # name -> (jax's name, TensorCores per name unit, dimensions)
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v5litepod": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}
TOPOLOGY_EXAMPLES = "v5p-8, v5p-128, v4-32, v5e-16, v5litepod-4, v6e-8, or jax's names such as v5p:2x2x1, v5e:2x2"


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The Cloud TPU slice shape of `chips` chips: from 2x2(x1) the last of the smallest sides doubles."""
    if chips == 1 and dims == 2:
        return (1, 1)
    shape = [2, 2, 1] if dims == 3 else [2, 2]
    if chips < math.prod(shape) or chips & (chips - 1):
        raise ValueError(chips)
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def jax_topology_name(topology: str) -> str:
    """`v5p-128` -> `v5p:4x4x4`; jax's own names (`v5p:2x2x1`) pass through. ConfigError for anything else."""
    text = topology.strip().lower()
    if ":" in text:
        generation, _, shape = text.partition(":")
        if generation in GENERATIONS and re.fullmatch(r"\d+(x\d+)*", shape) \
                and shape.count("x") + 1 == GENERATIONS[generation][2]:
            return f"{GENERATIONS[generation][0]}:{shape}"
    elif (match := re.fullmatch(r"(v\w+?)-(\d+)", text)) and match.group(1) in GENERATIONS:
        name, cores, dims = GENERATIONS[match.group(1)]
        count = int(match.group(2))
        try:
            if count % cores:
                raise ValueError(count)
            return f"{name}:{'x'.join(map(str, slice_shape(count // cores, dims)))}"
        except ValueError:
            pass
    raise ConfigError(
        f"unknown TPU topology {topology!r}: use a Cloud TPU accelerator type ({TOPOLOGY_EXAMPLES}; v4 and v5p "
        "count TensorCores from 8 up in powers of two, v5e and v6e count chips: 1, 4, 8, 16, ...)"
    )


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU slice (no hardware needed; libtpu must be installed)."""
    import os

    from jax.experimental import topologies

    # libtpu takes a lock file so that two processes never drive one TPU; compiling drives none, and a second
    # compiling process (a test worker, another user's) would otherwise be refused.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = jax_topology_name(topology)
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # libtpu missing, or a shape the compiler refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "install libtpu: pip install -e '.[tpu]'" if "install" in first.lower() \
            else f"use another shape ({TOPOLOGY_EXAMPLES})"
        raise ConfigError(f"cannot describe TPU topology {topology!r} ({name}): {first}; {hint}") from None


def chip_of(devices: list) -> flops.Chip:
    kind = devices[0].device_kind
    found = flops.chip(kind)
    if found is None:
        raise ConfigError(f"no published figures for {kind!r} in jaxlm.flops.CHIPS: add them there")
    return found


# ------------------------------------------------------------------------------------------------ HLO reading

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.*?)\s(?P<op>all-gather|reduce-scatter|all-reduce)"
    r"(?P<start>-start)?\((?P<operands>.*?)\)(?:,|$)"
)
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s[\w\-]+\(")
# The TPU compiler writes a reduce-scatter as a fusion calling a computation named all-reduce-scatter.N.
_TPU_REDUCE_SCATTER = "all-reduce-scatter"
_TPU_REDUCE_SCATTER_CALL = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\sfusion\((.*?)\),.*\bcalls=%?all-reduce-scatter[\w.\-]*"
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(condition|body|calls|to_apply|branch_computations|called_computations)=\{?([^}\s]*)\}?")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _array_bytes(text: str) -> int:
    return sum(
        _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(text)
    )


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """HLO text split into its computations' instruction lines, and the name of the entry computation."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            if (match := _COMPUTATION.match(line)) and "=" not in line.split("(")[0]:
                current = match.group(1)
                bodies[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            bodies[current].append(line)
    return bodies, entry


def _counted_loop(line: str, bodies: dict[str, list[str]]) -> int:
    """The trip count of a while loop whose condition is `i < N` for a constant N (how jax writes scan and
    fori_loop, counting from 0; the TPU compiler keeps no known_trip_count); 1 for anything else."""
    match = re.search(r"\bwhile\(.*\bcondition=%?([\w.\-]+)", line)
    condition = bodies.get(match.group(1), []) if match else []
    constants = [int(m.group(1)) for text in condition if (m := re.search(r"s32\[\][^=]*constant\((\d+)\)", text))]
    compares = [text for text in condition if "compare(" in text and "direction=LT" in text]
    return constants[0] if len(constants) == 1 and len(compares) == 1 else 1


def _executions(bodies: dict[str, list[str]], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per execution of the program: a while loop's body and condition
    count its known trip count (scanned layers: once per layer); a loop of unknown count counts once."""
    calls: dict[str, list[tuple[str, int]]] = {name: [] for name in bodies}
    for name, lines in bodies.items():
        for line in lines:
            trips = int(m.group(1)) if (m := _TRIP_COUNT.search(line)) else _counted_loop(line, bodies)
            for kind, targets in _CALLED.findall(line):
                for target in targets.split(","):
                    target = target.strip().lstrip("%")
                    if target in bodies:
                        calls[name].append((target, trips if kind in ("body", "condition") else 1))
    counts: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        counts[name] = counts.get(name, 0) + times
        for target, factor in calls[name]:
            visit(target, times * factor)

    if entry is not None:
        visit(entry, 1)
    return counts


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Count and bytes per device of each all-gather, reduce-scatter and all-reduce one execution of a compiled
    program runs (loop bodies counted by their trip counts). An operation's bytes are those of its larger side:
    the gathered result, the operand before reduce-scattering, the all-reduced array."""
    bodies, entry = _computations(hlo)
    runs = _executions(bodies, entry)
    # Operands are printed by name: their shapes are where they are defined.
    shapes = {m.group(1): m.group(2) for lines in bodies.values() for line in lines if (m := _DEFINITION.match(line))}

    def operand_bytes(operands: str) -> int:
        named = re.findall(r"%([\w.\-]+)", operands)
        return sum(_array_bytes(shapes.get(name, "")) for name in named) if named else _array_bytes(operands)

    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for name, lines in bodies.items():
        times = runs.get(name, 0)
        if not times or name.startswith(_TPU_REDUCE_SCATTER):  # counted where it is called, below
            continue
        for line in lines:
            if (fused := _TPU_REDUCE_SCATTER_CALL.match(line)) is not None:
                op, result_text, operands_text, start = "reduce-scatter", fused.group(1), fused.group(2), None
            elif (match := _INSTRUCTION.match(line)) is not None:
                op, result_text, operands_text = match.group("op"), match.group("result"), match.group("operands")
                start = match.group("start")
            else:
                continue
            result, operand = _array_bytes(result_text), operand_bytes(operands_text)
            if start and result > operand > 0:
                result -= operand  # an async start's result holds its operands beside its outputs
            found[op]["count"] += times
            found[op]["bytes"] += times * max(result, operand)
    return found


def attention_kernel(hlo: str) -> str:
    """The attention implementation a compiled program contains: a Pallas splash kernel, cuDNN's fused
    attention, or XLA's own (plain dot products)."""
    if re.search(r"splash|flash_attention", hlo) and "tpu_custom_call" in hlo:
        return "splash (Pallas)"
    if "__cudnn$fmha" in hlo:
        return "cudnn"
    if "tpu_custom_call" in hlo:
        return "Pallas kernel"
    return "xla (dot)"


# ------------------------------------------------------------------------------------------------ compiling


def for_target(experiment: Experiment) -> Experiment:
    """The experiment as it would run on a TPU: refused where it names a GPU-only kernel. (`auto` settings are
    the model's to resolve, by the devices of the mesh it is compiled for.)"""
    if experiment.model.attention == "cudnn":
        raise ConfigError(f"{experiment.name}: ModelConfig.attention='cudnn' is NVIDIA's fused kernel, not a TPU's: "
                          "add --model.attention auto (splash on TPUs) or xla")
    return experiment


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    parts = {
        "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
    }
    # Donated arguments are reused for the outputs they alias: they count once.
    parts["total"] = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temp"] + parts["code"]
    return parts


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def _resolved(experiment: Experiment, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The remat policy and loss chunk the model takes on the mesh's devices (`auto` resolved)."""
    with sharding.activation_sharding(mesh):
        return {"remat": model.remat_policy(experiment.model),
                "loss_chunk": model.loss_chunk_size(experiment.model, experiment.data.seq_len)}


def _identity(step: str, experiment: Experiment, devices: list, mesh: jax.sharding.Mesh,
              topology: str) -> dict[str, Any]:
    chip = chip_of(devices)
    return {
        "experiment": experiment.name, "step": step, "topology": topology, "chip": chip.device_kind,
        "devices": len(devices), "hosts": len({d.process_index for d in devices}),
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        **_resolved(experiment, mesh), "grad_accum": experiment.train.grad_accum,
        "batch_size": experiment.data.batch_size, "seq_len": experiment.data.seq_len,
        "params": flops.count_params(experiment.model), "hbm_per_device": int(chip.hbm_bytes),
    }


def _model_flops(experiment: Experiment, step: str) -> float:
    """The model's own count for one step: training is forward 2 + backward 4 per matmul parameter and token (see
    jaxlm.flops); evaluation is the forward third."""
    tokens = experiment.data.batch_size * experiment.data.seq_len
    train_flops = flops.flops_per_token(experiment.model, experiment.data.seq_len) * tokens
    return train_flops if step == "train" else train_flops / 3


def analyse(compiled, *, step: str, experiment: Experiment, devices: list, mesh: jax.sharding.Mesh,
            topology: str, compile_s: float) -> dict[str, Any]:
    """The record of one compiled step: what a run on `devices` would meet."""
    chip = chip_of(devices)
    n = len(devices)
    memory, cost, hlo = _memory(compiled), _cost(compiled), compiled.as_text()
    model_flops = _model_flops(experiment, step)
    # The compiler's cost analysis is of one device's program, and counts a loop's body once: scanned layers
    # count as one layer. The compute bound takes the larger of its count and the model's, so it stays a bound.
    compute_s = max(cost["flops"], model_flops / n) / chip.bf16_flops
    memory_s = cost["bytes"] / chip.hbm_bytes_per_s
    bound_s = max(compute_s, memory_s)
    return {
        **_identity(step, experiment, devices, mesh, topology), "attention": attention_kernel(hlo),
        "bytes_per_device": memory, "fits": memory["total"] <= chip.hbm_bytes,
        "flops_per_step": {"compiler": cost["flops"] * n, "model": model_flops,
                           "compiler_counts": "each loop body once (scanned layers as one layer)"},
        "bytes_accessed_per_device": cost["bytes"],
        "collectives": collectives(hlo), "compile_s": round(compile_s, 2),
        "bounds": {
            "step_s_lower_bound": bound_s,
            "mfu_upper_bound": model_flops / (n * chip.bf16_flops * bound_s) if bound_s else None,
            "limited_by": "compute" if compute_s >= memory_s else "HBM bandwidth",
            "basis": "roofline: the larger of the compiler's and the model's FLOPs per device over the chip's "
                     "published bf16 peak, or the compiler's bytes accessed per device over its HBM bandwidth; "
                     "collectives and latency ignored: bounds, not measurements",
        },
    }


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(error: Exception, *, step: str, experiment: Experiment, devices: list,
                  mesh: jax.sharding.Mesh, topology: str, compile_s: float) -> dict[str, Any]:
    """The record of a step the TPU compiler refused for want of HBM: the memory it said it needs."""
    text = (str(error).strip().splitlines() or [""])[0]
    sizes = [float(v) * _UNITS[u] for v, u in re.findall(r"\(([\d.]+)([KMGT])i?B?\)", text)]
    state = state_bytes_per_device(experiment, devices)
    temp = int(sizes[0]) if sizes else 0
    return {
        **_identity(step, experiment, devices, mesh, topology), "attention": None,
        "bytes_per_device": {"arguments": state, "temp": temp, "total": state + temp},
        "fits": False, "error": text[:300], "compile_s": round(compile_s, 2),
        "flops_per_step": {"compiler": None, "model": _model_flops(experiment, step)},
    }


def compile_steps(experiment: Experiment, topology: str, *, steps: tuple[str, ...] = ("train", "eval"),
                  devices: list | None = None) -> list[dict[str, Any]]:
    """Compile the experiment's pretraining steps for a TPU topology and return one record per step."""
    devices = devices if devices is not None else topology_devices(topology)
    experiment = for_target(experiment)
    mesh = sharding.make_mesh(experiment.mesh, devices)
    sharding.check_fits(experiment, mesh)
    task = train.Pretraining(experiment)
    state, frozen = train.abstract_state(task, mesh)
    batch = train.abstract_batch(experiment, mesh)
    records = []
    for step in steps:
        if step == "train":
            lowered = train.jit_step(task, mesh).lower(state, frozen, batch)
        else:
            lowered = train.jit_eval(task, mesh).lower(state["params"], frozen, batch)
        started = time.perf_counter()
        where = dict(step=step, experiment=experiment, devices=devices, mesh=mesh, topology=topology)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            records.append(out_of_memory(e, **where, compile_s=time.perf_counter() - started))
            continue
        records.append(analyse(compiled, **where, compile_s=time.perf_counter() - started))
    return records


# ------------------------------------------------------------------------------------------------ --fit

REMAT_ORDER = ("none", "dots", "attn_mlp", "full")  # least recomputation first


@dataclasses.dataclass(frozen=True)
class Change:
    """A candidate setting: the FSDP width (data-parallel devices that shard the state), the remat policy and
    the microbatches per step."""

    fsdp: int
    remat: str
    grad_accum: int

    def apply(self, experiment: Experiment, n_devices: int) -> Experiment:
        mesh = experiment.mesh
        tensor = sharding.mesh_shape(mesh, n_devices)[2]
        new_mesh = dataclasses.replace(mesh, data=n_devices // (tensor * self.fsdp), fsdp=self.fsdp, tensor=tensor)
        return dataclasses.replace(
            experiment, mesh=new_mesh, model=experiment.model.replace(remat=self.remat),
            train=dataclasses.replace(experiment.train, grad_accum=self.grad_accum),
        )

    def overrides(self, base: Change, experiment: Experiment, n_devices: int) -> list[str]:
        """The command-line flags that turn the base settings into these."""
        flags = []
        if self.fsdp != base.fsdp:
            mesh = self.apply(experiment, n_devices).mesh
            flags += ["--mesh.data", str(mesh.data), "--mesh.fsdp", str(mesh.fsdp)]
        if self.remat != base.remat:
            flags += ["--model.remat", self.remat]
        if self.grad_accum != base.grad_accum:
            flags += ["--train.grad-accum", str(self.grad_accum)]
        return flags


def _candidates(experiment: Experiment, devices: list) -> tuple[Change, list[Change]]:
    """The experiment's own setting and every candidate, the smallest changes first: fewer knobs moved, then
    fewer doublings of FSDP width and accumulation and milder remat."""
    n_devices = len(devices)
    data, fsdp, tensor = sharding.mesh_shape(experiment.mesh, n_devices)
    remat = model.choose_remat(experiment.model.remat, devices[0])
    base = Change(fsdp, remat, experiment.train.grad_accum)
    widths = [fsdp * 2**i for i in range(int(math.log2(data)) + 1) if data % 2**i == 0] if data & (data - 1) == 0 \
        else [fsdp, fsdp * data]
    policies = list(REMAT_ORDER[REMAT_ORDER.index(remat):])
    rows = experiment.data.batch_size
    accums = [a for a in (base.grad_accum * 2**i for i in range(8)) if rows % a == 0]

    def cost(c: Change) -> tuple:
        moved = (c.fsdp != base.fsdp) + (c.remat != base.remat) + (c.grad_accum != base.grad_accum)
        steps = math.log2(c.fsdp / base.fsdp) + policies.index(c.remat) + math.log2(c.grad_accum / base.grad_accum)
        return moved, steps, policies.index(c.remat), c.grad_accum

    everything = [Change(w, p, a) for w in widths for p in policies for a in accums]
    valid = []
    for c in everything:
        dp = c.fsdp * (n_devices // (tensor * c.fsdp))
        if experiment.data.batch_size % (dp * c.grad_accum) == 0 and experiment.model.d_model % c.fsdp == 0:
            valid.append(c)
    return base, sorted(valid, key=cost)


def state_bytes_per_device(experiment: Experiment, devices: list) -> int:
    """Bytes of the train state's shards on one device (parameters, optimizer state), from shapes alone."""
    mesh = sharding.make_mesh(experiment.mesh, devices)
    state, _ = train.abstract_state(train.Pretraining(experiment), mesh)
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)
    )


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _saves_at_least(a: Change, b: Change) -> bool:
    """Whether `a` saves memory in every knob at least as much as `b`."""
    return a.fsdp >= b.fsdp and REMAT_ORDER.index(a.remat) >= REMAT_ORDER.index(b.remat) \
        and a.grad_accum >= b.grad_accum


def fit_search(experiment: Experiment, topology: str, devices: list | None = None,
               log=print) -> tuple[dict[str, Any] | None, list[str], list[dict[str, Any]]]:
    """The smallest change under which the train step fits the chip's HBM: (its record or None, its flags,
    every record compiled on the way). A candidate is skipped when one saving at least as much in every knob
    did not fit."""
    devices = devices if devices is not None else topology_devices(topology)
    base, candidates = _candidates(experiment, devices)
    tried: list[dict[str, Any]] = []
    failed: list[Change] = []
    for change in candidates:
        if any(_saves_at_least(f, change) for f in failed):
            continue
        flags = change.overrides(base, experiment, len(devices))
        candidate = change.apply(experiment, len(devices))
        state_bytes = state_bytes_per_device(for_target(candidate), devices)
        if state_bytes > chip_of(devices).hbm_bytes:  # parameters and optimizer state alone: no need to compile
            log(f"  {' '.join(flags) or '(as configured)'}: the state alone takes {_size(state_bytes)} per device: "
                "does not fit")
            failed.append(change)
            continue
        record = compile_steps(candidate, topology, steps=("train",), devices=devices)[0]
        record["overrides"] = " ".join(flags)
        tried.append(record)
        total = record["bytes_per_device"]["total"]
        log(f"  {' '.join(flags) or '(as configured)'}: {_size(total)} per device of "
            f"{_size(record['hbm_per_device'])}: {'fits' if record['fits'] else 'does not fit'}")
        if record["fits"]:
            return record, flags, tried
        failed.append(change)
    return None, [], tried

