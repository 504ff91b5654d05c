"""The command line of every experiment module: `python -m experiments.<name> [--section.field value ...]`.

An experiment module declares `EXPERIMENT` (one run) or `SWEEP` (a tuple of runs) and calls `run(...)` from its
`main`. Overrides are parsed by tyro against the experiment's own values, so `--help` shows every field with the
experiment's defaults. For a sweep, an override applies to every selected member, `--train.out-dir D` puts each
member in D/<member name>, and `--sweep.members 3:6` runs a slice (so several hosts can share one sweep). A member
that fails is recorded in the sweep's status file and the sweep goes on (`run_sweep`: `--sweep.retries`,
`--sweep.status`, `--sweep.restart`). Errors a user can fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
    """Which members of a sweep to run, and how to treat those that failed."""

    members: str = ":"  # a Python slice of the member list (e.g. 3:6, or : for all)
    retries: int = 1  # a rerun runs a failed member again until it has failed 1 + retries times
    status: bool = False  # print every member's state (from the sweep's status file) and run nothing
    restart: bool = False  # delete the selected members' run directories first: rerun them afresh, new flags allowed


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
    return parse_sweep(default, argv, prog)[1]


def parse_sweep(
    default: Sequence[Experiment], argv: Sequence[str], prog: str | None = None
) -> tuple[SweepArgs, list[Experiment], list[Experiment]]:
    """A sweep's command line: its --sweep flags, the members it selects, and every member (the overrides
    apply to the selected ones; --train.out-dir moves them all)."""
    members = list(default)
    if not members:
        raise JaxlmError("the sweep has no members")
    command = tyro.cli(
        _SweepCommand, default=_SweepCommand(SweepArgs(), _open(members[0])), args=argv, prog=prog,
        description=_doc() + f"\n\nA sweep of {len(members)} runs; overrides apply to every member (the defaults "
        "shown are the first member's).",
    )
    if command.sweep.retries < 0:
        raise JaxlmError(f"--sweep.retries {command.sweep.retries}: use 0 or more")
    changes = _sweep_changes(argv, command.experiment)
    out_dir = changes.get("train", {}).pop("out_dir", None)
    chosen = _members(command.sweep.members, len(members))
    everyone = [_apply(m, changes) if i in chosen else m for i, m in enumerate(members)]
    if out_dir is not None:  # the sweep's directory: each member keeps a directory of its own inside it
        everyone = [dataclasses.replace(m, train=dataclasses.replace(m.train, out_dir=storage.join(out_dir, m.name)))
                    for m in everyone]
    return command.sweep, [everyone[i] for i in chosen], everyone


def experiment_names() -> list[str]:
    """The experiments of this checkout: the modules in experiments/."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("experiments")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.name.startswith("_"))


def load_experiments(
    name: str, overrides: Sequence[str], *, preset: str | None = None, prog: str | None = None
) -> list[Experiment]:
    """`experiments.<name>`'s EXPERIMENT (one) or its SWEEP's selected members, with a published model shape
    (`preset`, a key of jaxlm.config.PRESETS) swapped in and the command line's overrides applied."""
    import importlib

    from jaxlm.config import PRESETS

    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"experiments.{name}", "experiments"):
            raise
        raise JaxlmError(f"no experiment named {name!r}: use one of {', '.join(experiment_names())}") from None
    default = getattr(module, "EXPERIMENT", None) or getattr(module, "SWEEP", None)
    if default is None:
        raise JaxlmError(f"experiments/{name}.py declares neither EXPERIMENT nor SWEEP")
    if preset is not None:
        if preset not in PRESETS:
            raise JaxlmError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        swap = lambda e: with_model(e, PRESETS[preset])  # noqa: E731
        default = swap(default) if isinstance(default, Experiment) else [swap(e) for e in default]
    return parse(default, list(overrides), prog=prog or f"python -m experiments.{name}")


def with_model(experiment: Experiment, model: ModelConfig) -> Experiment:
    """The experiment with another model; the sequence length is capped at the model's context."""
    data = experiment.data
    if data.seq_len > model.max_seq_len:
        data = dataclasses.replace(data, seq_len=model.max_seq_len)
    return dataclasses.replace(experiment, model=model, data=data)


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
    """Parse overrides, then train the experiment, or the sweep's selected members (see `run_sweep`); a sweep
    with failed members exits with status 1 once the others are done."""
    from jaxlm.train import train

    if isinstance(default, Experiment):
        return guarded(lambda: [train(experiment) for experiment in parse(default, argv)])
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args, selected, everyone = guarded(lambda: parse_sweep(default, argv, program_name()))
    summaries, failed = guarded(lambda: run_sweep(sweep_args, selected, everyone))
    if failed:
        sys.exit(SWEEP_FAILED)
    return summaries


SWEEP_FAILED = 1


def run_sweep(
    args: SweepArgs, selected: Sequence[Experiment], everyone: Sequence[Experiment]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train the selected members one after another; returns their summaries and the names of those that failed.

    A member that raises (a non-finite loss, running out of memory, any error) is recorded as failed in the sweep
    directory's status file, with its error's first line, and the sweep goes on; finished members are skipped;
    a failed member runs again on a rerun until it has failed 1 + `args.retries` times. `args.restart` deletes
    the selected members' run directories first (so they may run with other settings); `args.status` prints the
    table of every member and runs nothing. A preemption (SIGTERM) or Ctrl-C ends the whole sweep.
    """
    import traceback

    import jax

    from jaxlm import storage
    from jaxlm.logging import print_grid
    from jaxlm.scaling import status as sweep_status
    from jaxlm.train import Preempted, train

    directory = sweep_status.sweep_dir(everyone)
    status = sweep_status.read_status(directory)
    if args.status:
        print(f"sweep {directory} ({sweep_status.STATUS_FILE}):")
        print_grid(sweep_status.STATUS_HEADER, sweep_status.status_rows(everyone, status))
        return [], []
    primary = jax.process_index() == 0
    summaries, failed = [], []
    for member in selected:
        if args.restart:
            if primary:
                storage.rmtree(member.run_dir, missing_ok=True)
            status.pop(member.name, None)
        entry = status.get(member.name, {})
        if sweep_status.is_finished(member):
            print(f"{member.name} is finished: skipped")
            summaries.append(json.loads(storage.read_text(storage.join(member.run_dir, "summary.json"))))
            continue
        if entry.get("state") == sweep_status.FAILED:
            if entry["failures"] > args.retries:
                print(f"{member.name}: skipped, it failed {entry['failures']} times ({entry['error']}); rerun it with "
                      f"--sweep.retries {entry['failures']}, or afresh with --sweep.restart", file=sys.stderr)
                failed.append(member.name)
                continue
        try:
            summaries.append(train(member))
            status[member.name] = {"state": sweep_status.FINISHED}
        except (Preempted, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001  (any failure of one member: recorded, and the sweep goes on)
            if not isinstance(e, JaxlmError):
                traceback.print_exc()
            text = str(e).strip()
            error = text.splitlines()[0][:300] if text else ""
            error = error if isinstance(e, JaxlmError) else f"{type(e).__name__}: {error}"
            status[member.name] = {"state": sweep_status.FAILED, "failures": entry.get("failures", 0) + 1,
                                   "error": error}
            failed.append(member.name)
            print(f"{member.name} failed: {error}; going on with the sweep", file=sys.stderr)
        if primary:
            sweep_status.write_status(directory, status)
    if failed:
        print(f"{len(failed)} member(s) failed: {', '.join(failed)}; rerun the same command to retry them "
              "(--sweep.status shows every member)", file=sys.stderr)
    return summaries, failed


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
    `--sweep.*` flags; overrides that change a member's compute (see `check_budgets`) exit with status 2. Once
    every member is finished or failed, process 0 fits the finished ones with `fit_and_plot` into `fits_dir`
    (`bootstrap` resamples; `unfittable` "skip" leaves out a budget whose optimum the sizes do not bracket, instead
    of failing), printing the equivalent `python -m tools.fit_scaling` command and the failed members; while
    members are unfinished it only prints that command. Exits with status 1 when a member failed in this run.
    """
    from jaxlm import scaling

    from jaxlm.scaling import status as sweep_status

    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args, members, everyone = guarded(lambda: parse_sweep(sweep, argv, program_name()))
    guarded(lambda: scaling.check_budgets(members, budget_of))
    _, failed = guarded(lambda: run_sweep(sweep_args, members, everyone))
    if sweep_args.status:
        return

    import jax

    declared_dir = sweep_status.sweep_dir(sweep)
    sweep_dir = sweep_status.sweep_dir(everyone)
    if sweep_dir != declared_dir:
        fits_dir = storage.join(sweep_dir, _relative(fits_dir, declared_dir))
    options: dict = {"bootstrap": bootstrap, **({"unfittable": unfittable} if unfittable else {})}
    fit_command = f"python -m tools.fit_scaling {sweep_dir} --out {fits_dir} --bootstrap {bootstrap}"
    if unfittable:
        fit_command += f" --unfittable {unfittable}"
    status = sweep_status.read_status(sweep_dir)
    states = {m.name: sweep_status.state_of(m, status) for m in everyone}
    given_up = [name for name, state in states.items() if state == sweep_status.FAILED]
    if jax.process_index() == 0:
        if sweep_status.UNFINISHED in states.values():
            print(f"some members of the sweep are unfinished; once all are, fit with: {fit_command}")
        else:
            if given_up:
                options["allow_unfinished"] = True
                fit_command += " --allow-unfinished"
                print(f"fitting the {len(everyone) - len(given_up)} finished members (failed: {', '.join(given_up)}): "
                      f"{fit_command}")
            else:
                print(f"all {len(everyone)} members finished; fitting: {fit_command}")
            guarded(lambda: scaling.fit_and_plot(sweep_dir, fits_dir, **options))
    if failed:
        sys.exit(SWEEP_FAILED)
