"""Where a train step's time goes, for `python -m tools.bench train --profile N`.

jaxlm's step: `jax.profiler` traces N steps of the compiled step; each traced operation (an HLO instruction) is
joined to the compiled HLO for its opcode, shape and source path (`op_name` metadata, e.g.
`.../transpose(jvp(Transformer))/.../blocks/mlp/fc/dot_general`), and its time is added to a part of the model
(attention, its projections, MLP, norms, embeddings and logits, the layer loop's bookkeeping, the optimizer) and a
direction (forward; backward, including recomputation). The PyTorch reference's step: `torch.profiler`'s operators.

On CPU the trace's events are the HLO instructions themselves; on GPUs and TPUs the events of the device
timelines (`/device:...` processes of the trace) are read, each named by the HLO instruction it ran (its name or
its `hlo_op` argument), and host-side events are left out. Both report milliseconds per step of operator time,
grouped the same coarse way for the comparison: matmuls outside attention, attention (its products and softmax), and everything else.
Operator times are summed over the threads that ran them, so the figures add up to the step time only on one core
(`taskset -c 1 ... --torch-threads 1`); on more, operators overlap and the sums exceed it.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from typing import Any

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<opcode>[\w\-]+)\((?P<rest>.*)$"
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTAINERS = {"while", "call", "conditional", "tuple", "get-tuple-element", "parameter", "constant", "bitcast"}
_PROJECTIONS = re.compile(r"/attn/(query|key|value|out)/")

PARTS = (
    "attention", "attention projections", "mlp", "norms and residuals", "embeddings and logits", "loss", "layer loop",
    "optimizer", "other",
)


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    shape: str
    path: str  # the op_name metadata: where in the traced program it came from

    @property
    def is_matmul(self) -> bool:
        return self.opcode == "dot"


def hlo_instructions(hlo_text: str) -> dict[str, Instruction]:
    """Instruction name -> opcode, result shape and source path, for every instruction of an HLO module.

    Instructions that XLA made up without a source path (the reduce-windows that split a long reduction) take
    the path of their first operand that has one."""
    found, operands = {}, {}
    for line in hlo_text.splitlines():
        if match := _INSTRUCTION.match(line):
            path = _OP_NAME.search(match["rest"])
            found[match["name"]] = (match["opcode"], match["shape"], path[1] if path else "")
            operands[match["name"]] = re.findall(r"%([\w.\-]+)", match["rest"].split(")", 1)[0])

    def path_of(name: str, depth: int = 4) -> str:
        path = found[name][2] if name in found else ""
        if path or depth == 0:
            return path
        return next((p for op in operands.get(name, ()) if (p := path_of(op, depth - 1))), "")

    return {name: Instruction(opcode, shape, path_of(name)) for name, (opcode, shape, _) in found.items()}


def part_of(path: str) -> str:
    """The model part an operation's source path belongs to (one of PARTS)."""
    if "/attn/" in path and "_norm/" not in path:  # qk_norm's query_norm and key_norm count as norms
        return "attention projections" if _PROJECTIONS.search(path) else "attention"
    if "/mlp/" in path:
        return "mlp"
    if "_norm/" in path or "/blocks/add" in path:
        return "norms and residuals"
    if re.search(r"/(embed|pos_embed|lm_head)[/.]", path):
        return "embeddings and logits"
    if "index_in_dim" in path or re.search(r"Transformer\)+/(while/body/[\w\-]+|broadcast_in_dim)$", path):
        return "layer loop"  # the scan over layers: its stacked buffers and per-layer slices of params and grads
    if "Transformer" in path or path.endswith("closed_call"):
        return "other"
    if "jvp(" in path or "take_along_axis" in path:
        return "loss"
    return "optimizer" if path else "other"


def _direction(path: str) -> str | None:
    if "transpose(" in path:
        return "backward"  # including what remat recomputes for it
    return "forward" if "jvp(" in path else None  # None: outside the model and loss (the optimizer)


def _trace_events(log_dir: str, platform: str) -> list[dict[str, Any]]:
    files = glob.glob(f"{log_dir}/**/*perfetto_trace.json.gz", recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {log_dir}")
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    timed = [e for e in events if e.get("ph") == "X"]
    if platform == "cpu":
        return timed  # the operations run on host threads
    # Accelerators: only the timelines of this platform's devices, whose events are the operations that ran there
    # (a process that also loaded another platform's runtime, libtpu say, traces its empty timelines too).
    devices = {
        e.get("pid") for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
        and str(e.get("args", {}).get("name", "")).upper().startswith(f"/DEVICE:{platform.upper()}")
    }
    return [e for e in timed if e.get("pid") in devices]


def _instruction_name(event: dict[str, Any], table: dict[str, Instruction]) -> str | None:
    """The HLO instruction an event ran: its name on CPU and TPU, its `hlo_op` argument for GPU kernels."""
    if event.get("name") in table:
        return event["name"]
    op = event.get("args", {}).get("hlo_op")
    return op if op in table else None


def profile_jax(run: Callable[[], None], hlo_text: str, steps: int, platform: str) -> dict[str, Any]:
    """Trace `steps` calls of `run` (one compiled step each, on `platform`'s devices: cpu, gpu or tpu) and add up
    its operations by part and direction."""
    import jax

    table = hlo_instructions(hlo_text)
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        events = _trace_events(log_dir, platform)
    per_op: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        name = _instruction_name(e, table)
        if name is not None and table[name].opcode not in _CONTAINERS:
            per_op[name] += e["dur"] / 1e3 / steps
            calls[name] += 1 / steps
    parts = {p: {"forward_ms": 0.0, "backward_ms": 0.0, "matmul_ms": 0.0, "total_ms": 0.0} for p in PARTS}
    for name, ms in per_op.items():
        inst = table[name]
        part = parts[part_of(inst.path)]
        part["total_ms"] += ms
        if direction := _direction(inst.path):
            part[f"{direction}_ms"] += ms
        if inst.is_matmul:
            part["matmul_ms"] += ms
    attention = parts["attention"]["total_ms"]
    matmul = sum(p["matmul_ms"] for name, p in parts.items() if name != "attention")
    total = sum(per_op.values())
    top = [
        {"op": name, "ms": ms, "calls": round(calls[name]), "opcode": table[name].opcode,
         "shape": table[name].shape[:40], "part": part_of(table[name].path)}
        for name, ms in per_op.most_common(12)
    ]
    return {"total_ms": total, "matmul_ms": matmul, "attention_ms": attention,
            "other_ms": total - matmul - attention, "parts": parts, "top": top}


def profile_torch(run: Callable[[], None], steps: int) -> dict[str, Any]:
    """Profile `steps` calls of `run` (one PyTorch step each) by operator, self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    ops = {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}
    matmul = sum(ms for key, (ms, _) in ops.items() if key in ("aten::mm", "aten::addmm", "aten::bmm"))
    attention = sum(ms for key, (ms, _) in ops.items() if "scaled_dot_product" in key or "flash_attention" in key)
    total = sum(ms for ms, _ in ops.values())
    costliest = sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]
    top = [{"op": key, "ms": ms, "calls": round(n)} for key, (ms, n) in costliest]
    return {"total_ms": total, "matmul_ms": matmul, "attention_ms": attention,
            "other_ms": total - matmul - attention, "top": top}


def print_profile(profile: dict[str, Any], step_ms: float, torch_step_ms: float | None = None) -> None:
    from jaxlm.logging import print_grid

    jax_p, torch_p = profile["jax"], profile.get("torch")
    print(f"where the step's time goes (ms per step of operator time, {profile['steps']} traced steps)")
    rows = [[name, f"{p['forward_ms']:.1f}", f"{p['backward_ms']:.1f}", f"{p['matmul_ms']:.1f}", f"{p['total_ms']:.1f}"]
            for name, p in jax_p["parts"].items() if p["total_ms"] >= 0.05]
    rows.append(["all operators", "", "", "", f"{jax_p['total_ms']:.1f}"])
    print_grid(["jaxlm part", "forward", "backward (with remat)", "of which matmul", "total"], rows)
    header = ["", "matmul (not attention)", "attention", "everything else", "all operators", "step time"]
    rows = [["jaxlm", *(f"{jax_p[k]:.1f}" for k in ("matmul_ms", "attention_ms", "other_ms", "total_ms")),
             f"{step_ms:.1f}"]]
    if torch_p:
        rows.append(["torch", *(f"{torch_p[k]:.1f}" for k in ("matmul_ms", "attention_ms", "other_ms", "total_ms")),
                     f"{torch_step_ms:.1f}"])
    print_grid(header, rows)
    print("jaxlm's costliest operations")
    print_grid(["op", "ms", "calls", "opcode", "shape", "part"],
               [[t["op"], f"{t['ms']:.1f}", t["calls"], t["opcode"], t["shape"], t["part"]] for t in jax_p["top"]])
    if torch_p:
        print("torch's costliest operators")
        print_grid(["op", "ms", "calls"], [[t["op"], f"{t['ms']:.1f}", t["calls"]] for t in torch_p["top"]])
