"""The command line of every experiment module: `python -m experiments.<name> [--section.field value ...]`.

An experiment module declares `EXPERIMENT` (one run) or `SWEEP` (a tuple of runs) and calls `run(...)` from its
`main`. Overrides are parsed by tyro against the experiment's own values, so `--help` shows every field with the
experiment's defaults. For a sweep, an override applies to every selected member, `--train.out-dir D` puts each
member in D/<member name>, and `--sweep.members 3:6` runs a slice (so several hosts can share one sweep). A member
that fails is recorded in the sweep's status file and the sweep goes on (`run_sweep`: `--sweep.retries`,
`--sweep.status`, `--sweep.restart`); `--sweep.ray` runs the members side by side on Ray, each in a process of
its own started as `python -m jaxlm.cli '<member as JSON>'` (`run_member`). Errors a user can fix print one line
on stderr and exit with status 2.
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
from jaxlm.errors import JaxlmError, StorageUnavailableError

USAGE_ERROR = 2


@dataclass(frozen=True)
class SweepArgs:
    """Which members of a sweep to run, and how to treat those that failed."""

    members: str = ":"  # a Python slice of the member list (e.g. 3:6, or : for all)
    retries: int = 1  # a rerun runs a failed member again until it has failed 1 + retries times
    status: bool = False  # print every member's state (from the sweep's status file) and run nothing
    restart: bool = False  # delete the selected members' run directories first: rerun them afresh, new flags allowed
    ray: bool = False  # run members side by side, each in its own process, on a Ray cluster (local unless ray_address)
    ray_address: str = ""  # a Ray cluster to join (auto, or the head's host:6379); implies --sweep.ray
    devices_per_member: int = 1  # on Ray: CPU devices, GPUs or TPU chips (of each host) per member
    device: str = "auto"  # on Ray: cpu, gpu or tpu; auto: TPUs, else GPUs, else CPUs, as the cluster has them
    parallel: int = 0  # on Ray: at most this many members at once (0: as many as the devices allow)
    tpu_slice: str = ""  # on Ray: each member takes a whole TPU slice of this type (e.g. v4-16), one process a host
    table_every: float = 30.0  # on Ray: seconds between two prints of the members' table (also printed as they end)


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
        experiment = tyro.cli(Experiment, default=_open(default), args=argv, description=_doc(), prog=prog)
        _check_named_warmup(argv, [experiment])
        return [experiment]
    return parse_sweep(default, argv, prog)[1]


def _check_named_warmup(argv: Sequence[str], experiments: Sequence[Experiment]) -> None:
    """A warmup the command line sets beyond the run's length is a ConfigError; an experiment's own warmup that a
    shortened run (--train.steps) cuts is said, in one line."""
    if experiments and ("optim", "warmup_steps") in _named(argv, experiments[0]):
        for experiment in experiments:
            experiment.check_warmup()
        return
    cut = [e for e in experiments if e.optim.warmup_steps > e.train.steps]
    if cut:
        e = cut[0]
        print(
            f"note: {e.name}'s warmup of {e.optim.warmup_steps} steps is cut to the run's {e.train.steps}"
            f"{f' (and in {len(cut) - 1} other runs)' if len(cut) > 1 else ''}: the learning rate peaks at the last"
            " step; set --optim.warmup-steps to choose",
            file=sys.stderr,
        )


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
    if command.sweep.ray_address:
        command = dataclasses.replace(command, sweep=dataclasses.replace(command.sweep, ray=True))
    if command.sweep.ray:
        from jaxlm.scaling.cluster import Placement

        device = command.sweep.device if command.sweep.device != "auto" else "tpu" if command.sweep.tpu_slice else "cpu"
        Placement(device, command.sweep.devices_per_member, command.sweep.parallel, command.sweep.tpu_slice)
    changes = _sweep_changes(argv, command.experiment)
    out_dir = changes.get("train", {}).pop("out_dir", None)
    chosen = _members(command.sweep.members, len(members))
    everyone = [_apply(m, changes) if i in chosen else m for i, m in enumerate(members)]
    if out_dir is not None:  # the sweep's directory: each member keeps a directory of its own inside it
        everyone = [dataclasses.replace(m, train=dataclasses.replace(m.train, out_dir=storage.join(out_dir, m.name)))
                    for m in everyone]
    _check_named_warmup(argv, [everyone[i] for i in chosen])
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
    """The experiment with another model: the sequence length is capped at the model's context, and a tokenizer
    the run trains itself gets the model's vocabulary."""
    data = dataclasses.replace(experiment.data, seq_len=min(experiment.data.seq_len, model.max_seq_len))
    if data.tokenizer.startswith("sentencepiece-"):
        data = dataclasses.replace(data, vocab_size=model.vocab_size)
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
    """Train the selected members one after another, or side by side on Ray (`args.ray`, see `run_on_ray`);
    returns their summaries and the names of those that failed.

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
    summaries: dict[str, dict[str, Any]] = {}
    failed, to_run = [], []
    for member in selected:
        if args.restart:
            if primary:
                storage.rmtree(member.run_dir, missing_ok=True)
            status.pop(member.name, None)
        entry = status.get(member.name, {})
        if sweep_status.is_finished(member):
            print(f"{member.name} is finished: skipped")
            summaries[member.name] = json.loads(storage.read_text(storage.join(member.run_dir, "summary.json")))
        elif entry.get("state") == sweep_status.FAILED and entry["failures"] > args.retries:
            print(f"{member.name}: skipped, it failed {entry['failures']} times ({entry['error']}); rerun it with "
                  f"--sweep.retries {entry['failures']}, or afresh with --sweep.restart", file=sys.stderr)
            failed.append(member.name)
        else:
            to_run.append(member)
    if args.ray and to_run:
        failed += run_on_ray(args, to_run, everyone, status, directory)
        summaries.update({m.name: json.loads(storage.read_text(storage.join(m.run_dir, "summary.json")))
                          for m in to_run if sweep_status.is_finished(m)})
        to_run = []
    for member in to_run:
        entry = status.get(member.name, {})
        try:
            summaries[member.name] = train(member)
            status[member.name] = sweep_status.finished_entry(entry)
        except (Preempted, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001  (any failure of one member: recorded, and the sweep goes on)
            if not isinstance(e, JaxlmError):
                traceback.print_exc()
            text = str(e).strip()
            error = text.splitlines()[0][:300] if text else ""
            error = error if isinstance(e, JaxlmError) else f"{type(e).__name__}: {error}"
            status[member.name] = sweep_status.failed_entry(entry, error)
            failed.append(member.name)
            print(f"{member.name} failed: {error}; going on with the sweep", file=sys.stderr)
        if primary:
            sweep_status.write_status(directory, status)
    if failed:
        print(f"{len(failed)} member(s) failed: {', '.join(failed)}; rerun the same command to retry them "
              "(--sweep.status shows every member)", file=sys.stderr)
    return [summaries[m.name] for m in selected if m.name in summaries], failed


def _check_reachable(address: str) -> None:
    """Refuse a Ray head given as host:port where nothing answers (Ray itself would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # auto, or an address for Ray to resolve
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise JaxlmError(
            f"--sweep.ray-address {address}: nothing answers there ({e}); start the cluster's head (`ray start "
            "--head` or `ray up`) or give its address (auto on a node of the cluster)"
        ) from None


def run_on_ray(
    args: SweepArgs, members: Sequence[Experiment], everyone: Sequence[Experiment], status: dict[str, Any],
    directory: str,
) -> list[str]:
    """Train `members` side by side on Ray, each in a process of its own (`jaxlm.scaling.cluster`): on the
    cluster at `args.ray_address`, or on a Ray started here for this machine (and stopped at the end). A failed
    member is retried at once until it has failed 1 + `args.retries` times. Returns the names of the failed."""
    from jaxlm.scaling import cluster

    ray = cluster.import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        import time

        _check_reachable(args.ray_address)
        clock = time.perf_counter()
        try:
            ray.init(address=args.ray_address or None, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"join the Ray cluster at {args.ray_address}" if args.ray_address else "start a local Ray"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise JaxlmError(f"could not {where} ({first}): check the address (auto, or the head's host:6379) "
                             "and that `ray status` answers there") from None
        where = f"the Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray"
        print(f"connected to {where} in {time.perf_counter() - clock:.1f}s: {ray.cluster_resources()}")
    try:
        device = args.device
        if device == "auto":
            resources = ray.cluster_resources()
            device = "tpu" if resources.get("TPU") else "gpu" if resources.get("GPU") else "cpu"
        placement = cluster.Placement(device, args.devices_per_member, args.parallel, args.tpu_slice)
        return cluster.run_members(members, everyone, status, directory, placement, args.retries, args.table_every)
    finally:
        if started_here:
            ray.shutdown()


def guarded(command: Callable[[], Any]) -> Any:
    """Run an entry point's work: errors a user can fix end in one line on stderr and exit status 2; storage that
    cannot be reached, and a run preempted by SIGTERM (its checkpoint saved), exit with status 75 (a rerun may
    succeed); Ctrl-C says how to resume."""
    from jaxlm.train import PREEMPTED_EXIT_CODE, Preempted

    quiet_library_logs()
    try:
        return command()
    except StorageUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)  # EX_TEMPFAIL: a rerun may succeed
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
    before_training: Callable[[Sequence[Experiment]], None] | None = None,
) -> None:
    """Train the members a command line selects, then fit and plot once every member of `sweep` is finished.

    An experiment module's `main`: `argv` (default: the process's) holds jaxlm.cli overrides and
    `--sweep.*` flags; overrides that change a member's compute (see `check_budgets`) exit with status 2.
    `before_training(selected members)`, once the command line is accepted and unless it asks only for the status,
    may check what the members need (a jaxlm error is one line and status 2). Once
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
    if before_training is not None and members and not sweep_args.status:
        guarded(lambda: before_training(members))
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


def run_search(sweep: Sequence[Experiment], fields: Sequence[str], argv: Sequence[str] | None = None) -> None:
    """A hyperparameter search's `main`: train the members a command line selects (as `run` does a sweep), then,
    once no member is unfinished, report the finished ones: a table sorted by final validation loss (printed,
    and written as search.csv in the sweep's directory) and search.png, validation loss against each of `fields`.
    Exits with status 1 when a member failed in this run."""
    from jaxlm.logging import print_grid
    from jaxlm.scaling import search
    from jaxlm.scaling import status as sweep_status

    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args, members, everyone = guarded(lambda: parse_sweep(sweep, argv, program_name()))
    _, failed = guarded(lambda: run_sweep(sweep_args, members, everyone))
    if sweep_args.status:
        return
    directory = sweep_status.sweep_dir(everyone)
    status = sweep_status.read_status(directory)
    unfinished = [m.name for m in everyone if sweep_status.state_of(m, status) == sweep_status.UNFINISHED]
    if unfinished:
        print(f"{len(unfinished)} member(s) unfinished ({', '.join(unfinished)}): the report waits for them")
    else:
        rows = search.search_rows(everyone, fields)
        storage.write_text(storage.join(directory, "search.csv"), search.rows_csv(rows))
        if rows:
            search.plot_search(rows, fields, storage.join(directory, "search.png"), title=storage.basename(directory))
        print(f"{len(rows)} finished member(s) by final validation loss -> {storage.join(directory, 'search.csv')}, "
              f"{storage.join(directory, 'search.png')}")
        print_grid(list(rows[0]) if rows else ["name"], [
            [f"{v:.4g}" if isinstance(v, float) else v for v in row.values()] for row in rows])
    if failed:
        sys.exit(SWEEP_FAILED)


def run_member(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """`python -m jaxlm.cli '<experiment as JSON>' [--section.field value ...]`: train one experiment given whole,
    as a sweep on Ray starts each member's process (a TPU host's adds its jax.distributed settings as flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def experiment() -> Experiment:
        usage = "give an experiment as JSON, then any overrides (--section.field value), as jaxlm's sweeps do"
        if not argv:
            raise JaxlmError(usage)
        try:
            return Experiment.from_dict(json.loads(argv[0]))
        except (ValueError, TypeError, AttributeError) as e:
            raise JaxlmError(f"{usage}: {e}") from None

    return run(guarded(experiment), argv[1:])


if __name__ == "__main__":
    run_member()
