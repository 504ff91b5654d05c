"""The command line: `run_finetune` parses `--section.field` and `--finetune.field` overrides and runs the
task (`train_finetune`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import tyro

from jaxlm.cli import guarded, program_name
from jaxlm.config import Experiment
from jaxlm.finetune.classify import train_classifier
from jaxlm.finetune.config import FinetuneConfig
from jaxlm.finetune.instruct import train_instruct
from jaxlm.finetune.preference import train_dpo


# ----------------------------------------------------------------------------------------------- command line


def train_finetune(experiment: Experiment, ft: FinetuneConfig) -> dict[str, Any]:
    if ft.task == "classify":
        return train_classifier(experiment, ft)
    if ft.task == "dpo":
        return train_dpo(experiment, ft)
    return train_instruct(experiment, ft)


@dataclass(frozen=True)
class _Command:
    experiment: Annotated[Experiment, tyro.conf.arg(name="")]
    finetune: FinetuneConfig


def parse(
    experiment: Experiment, ft: FinetuneConfig, argv: Sequence[str] | None = None
) -> tuple[Experiment, FinetuneConfig]:
    """The configs a command line asks for: `--section.field` for the experiment, `--finetune.field` for ft."""
    main = sys.modules.get("__main__")
    doc = (getattr(main, "__doc__", None) or "").strip().split("\n\n")[0]
    argv = list(sys.argv[1:] if argv is None else argv)
    command = tyro.cli(_Command, default=_Command(experiment, ft), args=argv, description=doc, prog=program_name())
    return command.experiment, command.finetune


def run_finetune(
    experiment: Experiment,
    ft: FinetuneConfig,
    argv: Sequence[str] | None = None,
    prepare: Callable[[Experiment, FinetuneConfig], None] | None = None,
) -> dict[str, Any]:
    """Parse overrides, call `prepare` (an experiment's own set-up, e.g. building its data files) with the
    parsed configs, and run (or resume) the task. Errors a user can fix print one line on stderr and exit 2."""

    def command() -> dict[str, Any]:
        parsed, parsed_ft = parse(experiment, ft, argv)
        if prepare is not None:
            prepare(parsed, parsed_ft)
        return train_finetune(parsed, parsed_ft)

    return guarded(command)
