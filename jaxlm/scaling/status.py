"""A sweep's record of its members: `sweep_status.json` in the sweep's directory.

Each member that ended is recorded as finished, or failed with its error's first line and how many times it
failed (a member run on Ray also records when and on which host its last process started and ended); a member
without a record (and without summary.json) is unfinished. The file is rewritten whole and atomically after each
member, by process 0 only (by the driver, on Ray). `status_rows` adds each member's last logged step and loss, for
`--sweep.status`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.logging import read_metrics

STATUS_FILE = "sweep_status.json"
FINISHED, FAILED, UNFINISHED = "finished", "failed", "unfinished"


def sweep_dir(members: Sequence[Experiment]) -> str:
    """The directory that holds every member's run directory (local, or a URI such as gs://bucket/sweep)."""
    paths = [m.run_dir for m in members]
    if len(paths) == 1:
        return storage.dirname(paths[0].rstrip("/"))
    if not any(storage.is_uri(p) for p in paths):
        return os.path.commonpath(paths)
    common: list[str] = []
    for parts in zip(*(p.rstrip("/").split("/") for p in paths)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return "/".join(common)


def read_status(directory: str) -> dict[str, dict[str, Any]]:
    path = storage.join(directory, STATUS_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def write_status(directory: str, status: dict[str, dict[str, Any]]) -> None:
    storage.makedirs(directory)
    storage.write_text_atomic(storage.join(directory, STATUS_FILE), json.dumps(status, indent=2, sort_keys=True))


def finished_entry(previous: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A member's record once it has finished: the failures it had before, if any, are kept."""
    failures = previous.get("failures", 0)
    return {"state": FINISHED, **({"failures": failures} if failures else {}), **extra}


def failed_entry(previous: dict[str, Any], error: str, **extra: Any) -> dict[str, Any]:
    """A member's record once it has failed (once more): its error's first line and how many times it failed."""
    return {"state": FAILED, "failures": previous.get("failures", 0) + 1, "error": error, **extra}


def is_finished(member: Experiment) -> bool:
    return storage.exists(storage.join(member.run_dir, "summary.json"))


def state_of(member: Experiment, status: dict[str, dict[str, Any]]) -> str:
    if is_finished(member):
        return FINISHED
    return status.get(member.name, {}).get("state", UNFINISHED)


def status_rows(members: Sequence[Experiment], status: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row per member: index, name, state, failures, last logged step / steps, last loss, error."""
    rows = []
    for i, member in enumerate(members):
        train = [r for r in read_metrics(storage.join(member.run_dir, "metrics.jsonl"), drop_torn_tail=True)
                 if "loss" in r]
        entry = status.get(member.name, {})
        state = state_of(member, status)
        last = train[-1] if train else {}
        rows.append([
            i, member.name, state, entry.get("failures", 0), f"{last.get('step', 0)}/{member.train.steps}",
            f"{last['loss']:.4f}" if "loss" in last else "-", entry.get("error", "") if state == FAILED else "",
        ])
    return rows


STATUS_HEADER = ["#", "member", "state", "failures", "step", "loss", "error"]
