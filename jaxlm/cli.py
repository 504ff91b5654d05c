"""The command line of every experiment module: `python -m experiments.<name> [--section.field value ...]`.

An experiment module declares `EXPERIMENT` (one run) or `SWEEP` (a tuple of runs) and calls `run(...)` from its
`main`. Overrides are parsed by tyro against the experiment's own values, so `--help` shows every field with the
experiment's defaults. For a sweep, an override applies to every member, `--train.out-dir D` puts each member in
D/<member name>, and `--sweep.members 3:6` runs a slice (so several hosts can share one sweep). Errors a user can
fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping, Sequence

import tyro

from jaxlm import storage
from jaxlm.config import Experiment, ModelConfig
from jaxlm.errors import JaxlmError

USAGE_ERROR = 2


@dataclass(frozen=True)
class SweepArgs:
    """Which members of a sweep to run, as a Python slice of the member list (e.g. 3:6, or : for all)."""

    members: str = ":"


@dataclass(frozen=True)
class _SweepCommand:
    sweep: SweepArgs
    experiment: Annotated[Experiment, tyro.conf.arg(name="")]


def _open(experiment: Experiment) -> Experiment:
    """The experiment as the parser's default: model fields derived by rule left open (None), so that
    `--model.d-model 256` also changes d_ff, as it would in a config written with that width."""
    opened = copy.copy(experiment)
    object.__setattr__(opened, "model", experiment.model.open_derived())
    return opened


def _named(argv: Sequence[str], experiment: Experiment) -> list[tuple[str, ...]]:
    """The fields an argument list sets, as paths: ("optim", "lr") for `--optim.lr`, ("name",) for `--name`."""
    named = []
    for token in argv:
        if not token.startswith("--"):
            continue
        *sections, field = token[2:].split("=", 1)[0].replace("-", "_").split(".")
        owner: Any = experiment
        for section in sections:
            owner = getattr(owner, section, None)
        if not dataclasses.is_dataclass(owner):
            continue  # --sweep.members, --help
        fields = {f.name for f in dataclasses.fields(owner)}
        if field not in fields and field.startswith("no_") and field[3:] in fields:
            field = field[3:]  # --model.no-scan-layers
        if field in fields:
            named.append((*sections, field))
    return named


def _sweep_changes(argv: Sequence[str], parsed: Experiment) -> dict[str, Any]:
    """The values the command line sets, nested by section: every field it names, even where the value equals
    the first member's (against which the sweep's command line is parsed)."""
    changes: dict[str, Any] = {}
    for path in _named(argv, parsed):
        if path == ("name",):
            raise JaxlmError("a sweep's members keep their own names (their run directories hang on them): drop --name")
        value: Any = parsed
        for part in path:
            value = getattr(value, part)
        nested = changes
        for part in path[:-1]:
            nested = nested.setdefault(part, {})
        nested[path[-1]] = value
    return changes


def _apply(experiment: Experiment, changes: dict[str, Any]) -> Experiment:
    """The experiment with the changes; model fields derived from others (d_ff, ...) follow them."""
    sections = {
        name: value_of.replace(**value) if isinstance(value_of, ModelConfig) else dataclasses.replace(value_of, **value)
        for name, value in changes.items() if isinstance(value, dict)
        for value_of in [getattr(experiment, name)]
    }
    plain = {name: value for name, value in changes.items() if not isinstance(value, dict)}
    return dataclasses.replace(experiment, **sections, **plain)


def _members(spec: str, n: int) -> range:
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) == 1:
            parts = [parts[0], parts[0] + 1 if parts[0] is not None else None]
        selected = range(n)[slice(*parts)]
    except (ValueError, TypeError):
        raise JaxlmError(f"--sweep.members {spec!r} is not a slice like 3:6 or 2 or :") from None
    if not selected:
        raise JaxlmError(f"--sweep.members {spec!r} selects none of the {n} members")
    return selected


def parse(
    default: Experiment | Sequence[Experiment], argv: Sequence[str] | None = None, prog: str | None = None
) -> list[Experiment]:
    """The experiments a command line asks for, with its overrides applied. `prog` names the command whose
    `--help` lists the overrides (default: the running program)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name()
    if isinstance(default, Experiment):
        return [tyro.cli(Experiment, default=_open(default), args=argv, description=_doc(), prog=prog)]
    members = list(default)
    if not members:
        raise JaxlmError("the sweep has no members")
    command = tyro.cli(
        _SweepCommand, default=_SweepCommand(SweepArgs(), _open(members[0])), args=argv, prog=prog,
        description=_doc() + f"\n\nA sweep of {len(members)} runs; overrides apply to every member (the defaults "
        "shown are the first member's).",
    )
    changes = _sweep_changes(argv, command.experiment)
    out_dir = changes.get("train", {}).pop("out_dir", None)
    selected = [_apply(members[i], changes) for i in _members(command.sweep.members, len(members))]
    if out_dir is not None:  # the sweep's directory: each member keeps a directory of its own inside it
        selected = [dataclasses.replace(m, train=dataclasses.replace(m.train, out_dir=storage.join(out_dir, m.name)))
                    for m in selected]
    return selected


def common_dir(paths: Sequence[str]) -> str:
    """The longest directory that holds every path (local paths or URIs such as gs://bucket/sweep/member)."""
    if not any(storage.is_uri(p) for p in paths):
        return os.path.commonpath(paths)
    common: list[str] = []
    for parts in zip(*(p.rstrip("/").split("/") for p in paths)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return "/".join(common)


def _relative(path: str, start: str) -> str:
    prefix = start.rstrip("/") + "/"
    if path.startswith(prefix):
        return path[len(prefix):]
    return storage.basename(path) if storage.is_uri(path) or storage.is_uri(start) else os.path.relpath(path, start)


def program_name() -> str | None:
    """How the running program was started (`python -m experiments.quickstart`), for usage lines and hints."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else None


def _doc() -> str:
    main = sys.modules.get("__main__")
    return (getattr(main, "__doc__", None) or "").strip().split("\n\n")[0]


def quiet_library_logs() -> None:
    """orbax and tfds log routine progress as absl warnings; a run's own output says what matters."""
    import logging

    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def run(default: Experiment | Sequence[Experiment], argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse overrides, then train each experiment (a sweep skips finished members and resumes the others)."""
    from jaxlm.train import train

    return guarded(lambda: [train(experiment) for experiment in parse(default, argv)])


def guarded(command: Callable[[], Any]) -> Any:
    """Run an entry point's work: errors a user can fix end in one line on stderr and exit status 2; a run
    preempted by SIGTERM (its checkpoint saved) exits with status 75; Ctrl-C says how to resume."""
    from jaxlm.train import PREEMPTED_EXIT_CODE, Preempted

    quiet_library_logs()
    try:
        return command()
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def run_isoflop_sweep(
    sweep: Sequence[Experiment],
    budget_of: Mapping[str, float],
    fits_dir: str,
    *,
    bootstrap: int = 100,
    unfittable: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Train the members a command line selects, then fit and plot once every member of `sweep` is finished.

    An experiment module's `main`: `argv` (default: the process's) holds jaxlm.cli overrides and
    `--sweep.members`; overrides that change a member's compute (see `check_budgets`) exit with status 2. Process 0
    then fits the whole sweep with `fit_and_plot` into `fits_dir` (`bootstrap` resamples; `unfittable` "skip"
    leaves out a budget whose optimum the sizes do not bracket, instead of failing), printing the equivalent
    `python -m tools.fit_scaling` command; while members are unfinished it only prints that command.
    """
    from jaxlm import scaling

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        members = parse(sweep, argv)
        scaling.check_budgets(members, budget_of)
        everyone = parse(sweep, [*argv, "--sweep.members", ":"])  # as overridden (--train.out-dir moves them all)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    run(tuple(members), argv=[])

    import jax

    declared_dir = common_dir([m.run_dir for m in sweep])
    sweep_dir = common_dir([m.run_dir for m in everyone])
    if sweep_dir != declared_dir:
        fits_dir = storage.join(sweep_dir, _relative(fits_dir, declared_dir))
    sweep = everyone
    options: dict = {"bootstrap": bootstrap, **({"unfittable": unfittable} if unfittable else {})}
    fit_command = f"python -m tools.fit_scaling {sweep_dir} --out {fits_dir} --bootstrap {bootstrap}"
    if unfittable:
        fit_command += f" --unfittable {unfittable}"
    if jax.process_index() != 0:
        return
    if not scaling.all_finished(sweep):
        print(f"some members of the sweep are unfinished; once all are, fit with: {fit_command}")
        return
    print(f"all {len(sweep)} members finished; fitting: {fit_command}")
    try:
        scaling.fit_and_plot(sweep_dir, fits_dir, **options)
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
