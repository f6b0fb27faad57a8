"""The `samat` command line: thin click commands over the library.

Importing this module (`samat --help`, every `samat` call) loads click and rich's console only:
each command imports what it uses when it runs (pydantic's config models, the grid, the
launcher; torch only where a run trains or evaluates). tests/test_scale.py keeps it so.
"""

from __future__ import annotations

import functools
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from samat import __version__

if TYPE_CHECKING:
    from rich.table import Table

    from samat.grid import RunSpec

console = Console()
EXIT_USER_ERROR = 2


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ConfigError into one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ValueError as error:
            # a ConfigError comes from samat.config, loaded by then: importing it costs nothing
            from samat.config import ConfigError

            if not isinstance(error, ConfigError):
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("samat")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if logger.handlers:
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


class _Commands(click.Group):
    """`theory` loads scipy, `data` the config models (pydantic): import each only when that
    command runs, not on every `samat` call."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            import importlib

            module, attribute, _ = LAZY_COMMANDS[name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # `samat --help` lists the lazy commands from fixed lines instead of importing them
        rows = []
        for name in self.list_commands(ctx):
            if name == "theory":
                rows.append((name, THEORY_HELP))
                continue
            if name in LAZY_COMMANDS:
                # what the command's own get_short_help_str gives: its help, cut to the width
                stand_in = click.Command(name, help=LAZY_COMMANDS[name][2])
                rows.append((name, stand_in.get_short_help_str(formatter.width - 6 - len(name))))
                continue
            command = super().get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


THEORY_HELP = "The papers' binary toy model, computed exactly (ST, AT, SAM optima)."
DATA_HELP = "Check that a data set is where samat reads it, or download it (login nodes only)."
# name: (module, attribute, the command's help: `samat --help` shows it without the import)
LAZY_COMMANDS = {
    "data": ("samat.datacheck", "data", DATA_HELP),
    "theory": ("samat.theory_cli", "theory", THEORY_HELP),
}


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="samat")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """samat: SAM vs adversarial training robustness experiments, locally or on SLURM."""
    _setup_logging(verbose)


def _load_specs(grid_file: Path) -> tuple[Any, list[RunSpec]]:
    from samat.config import load_grid
    from samat.grid import expand, preflight

    grid = load_grid(grid_file)
    specs = expand(grid, str(grid_file))
    preflight(specs, str(grid_file))
    return grid, specs


def plan_table(specs: list[RunSpec], actions: dict[str, Any] | None = None) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(specs)} runs")
    columns = ["run id", "method", "data", "model", "epochs", "seed", "attacks"]
    for column in [*columns, *(["will"] if actions is not None else [])]:
        table.add_column(column)
    for spec in specs:
        c = spec.config
        names = [a if isinstance(a, str) else a.label or a.attack for a in c.eval.attacks]
        length = f"{c.train.iterations} steps" if c.train.iterations else str(c.train.epochs)
        cells = [spec.run_id, spec.label, c.data.name, c.model.name, length]
        cells += [str(c.seed), ", ".join(names)]
        if actions is not None:
            cells.append(actions[spec.run_id].describe())
        table.add_row(*(Text(cell) for cell in cells))  # the user's text, not rich markup
    return table


@cli.command()
@click.argument("grid_file", type=click.Path(path_type=Path))
@user_errors
def plan(grid_file: Path) -> None:
    """Print the runs a grid expands to and what a submit would do with each; submit nothing."""
    from samat.config import ConfigError, load_grid
    from samat.grid import expand, preflight
    from samat.launch.submit import _count_line, check_layout, select_runs

    grid = load_grid(grid_file)
    specs = expand(grid, str(grid_file))
    try:
        preflight(specs, str(grid_file))
    except ConfigError as error:
        if "data.root" not in str(error) and "model.pretrained" not in str(error):
            raise
        # a grid for the cluster is planned on a laptop too: say so, submit refuses
        click.echo(f"warning: {error}", err=True)
    check_layout(Path(grid.output))
    actions = select_runs(specs)
    # a pipe or a log gets rich's 80 columns by default: too narrow for the plan
    wide = console if console.is_terminal else Console(width=max(console.width, 160))
    wide.print(plan_table(specs, actions))
    console.print(
        f"{len(specs)} runs -> {grid.output}: {_count_line(actions)}",
        markup=False,
        soft_wrap=True,
    )


@cli.command()
@click.argument("grid_file", type=click.Path(path_type=Path))
@click.option(
    "--executor",
    type=click.Choice(["auto", "slurm", "local"]),
    default="auto",
    show_default=True,
    help="auto: SLURM when sbatch is on PATH, else local runs.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the sbatch script and the runs; submit nothing."
)
@click.option(
    "--force",
    is_flag=True,
    help="Retrain every run from epoch 0 (its old checkpoint, metrics and evaluations are moved "
    "into replaced-<time>/ inside the run directory).",
)
@click.option(
    "--retry-failed", is_flag=True, help="Also rerun runs that failed for a deterministic cause."
)
@click.option("--wait", is_flag=True, help="Block with a live status table until all runs end.")
@click.option(
    "--ignore-scheduler",
    is_flag=True,
    help="When sacct and squeue do not answer, resubmit runs recorded as queued or running "
    "anyway (by default they are left alone and the exit status is 1).",
)
@user_errors
def submit(
    grid_file: Path,
    executor: str,
    dry_run: bool,
    force: bool,
    retry_failed: bool,
    wait: bool,
    ignore_scheduler: bool,
) -> None:
    """Validate a grid, then run what is missing as one SLURM array (or locally): training for
    untrained runs, evaluation only for trained runs with new attacks."""
    from samat.launch.submit import submit_grid

    grid, _ = _load_specs(grid_file)
    code = submit_grid(
        grid,
        executor=executor,
        dry_run=dry_run,
        force=force,
        retry_failed=retry_failed,
        wait=wait,
        ignore_scheduler=ignore_scheduler,
        console=console,
    )
    sys.exit(code)


@cli.command(name="eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--attack",
    "attack_texts",
    multiple=True,
    required=True,
    help="A preset name (pgd10_linf_1, aa_l2_32, stadv, paper, ...) or an inline spec in YAML "
    "flow style: '{attack: pgd, norm: l2, eps: 32/255, steps: 20}'. Repeatable.",
)
@click.option("--n-examples", type=int, help="Attack this many test images (default: the run's).")
@click.option(
    "--executor",
    type=click.Choice(["auto", "slurm", "local"]),
    default="local",
    show_default=True,
    help="Where the evaluations run (slurm: one array over the runs).",
)
@user_errors
def evaluate(
    target: Path, attack_texts: tuple[str, ...], n_examples: int | None, executor: str
) -> None:
    """Evaluate trained runs with extra attacks, without editing the grid or retraining.

    TARGET is a run directory, a grid's output directory, or a grid file. The attacks are added
    to each run's evaluation request; each result is stored beside the run and shows in collect.
    """
    from samat.launch.submit import evaluate_runs

    specs = parse_attacks(attack_texts)
    sys.exit(
        evaluate_runs(target, specs, n_examples=n_examples, executor=executor, console=console)
    )


def parse_attacks(texts: tuple[str, ...]) -> list[Any]:
    """--attack values: preset or group names, or YAML flow mappings, checked like a grid's."""
    import yaml

    from samat import attacks, safeyaml
    from samat.config import ConfigError, EvalConfig, format_validation_error

    entries: list[Any] = []
    for text in texts:
        try:
            value = safeyaml.load(text)
        except safeyaml.YAMLLimitError as error:
            raise ConfigError(f"--attack {text[:40]!r}: {error}") from None
        except yaml.YAMLError:
            raise ConfigError(f"--attack {text!r} is not a preset name or a YAML mapping") from None
        entries.append(value)
    try:
        request = EvalConfig.model_validate({"attacks": entries})
    except ValueError as error:
        raise ConfigError(format_validation_error(error, "--attack")) from None
    attacks.resolve(request.attacks)
    return list(request.attacks)


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("results/single"),
    show_default=True,
    help="Output root when TARGET is a config file.",
)
@user_errors
def run(target: Path, output: Path) -> None:
    """Run one run in the foreground: a run directory, or a run config YAML file."""
    from samat.config import load_run
    from samat.grid import RunSpec, method_label, preflight, run_id
    from samat.store import prepare
    from samat.train import execute

    if target.is_dir():
        run_dir = target
    else:
        config = load_run(target)
        rid = run_id(config)
        spec = RunSpec(rid, config, method_label(config), output / "runs" / rid)
        preflight([spec], str(target))
        run_dir = prepare(spec).path
    import signal

    from samat.evaluate import Interrupted, StopFlag
    from samat.launch.task import EXIT_INTERRUPTED, time_limit_signal

    # in a container under a launcher task, or a job script: the time-limit signal (forwarded)
    # and SIGTERM stop at the next step boundary with the progress stored
    flag = StopFlag()
    for signum in (time_limit_signal(), signal.SIGTERM):
        signal.signal(signum, flag.set)
    try:
        result = execute(run_dir, stop=flag)
    except Interrupted as stopped:
        click.echo(f"stopped by signal {stopped.signum}; progress stored in {run_dir}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    robust = ", ".join(f"{k} {v:.1%}" for k, v in result["robust"].items())
    console.print(
        f"run {result['run_id']}: natural {result['natural']:.1%}"
        + (f"; {robust}" if robust else "")
        + f" -> {run_dir}"
    )


STATES = ("done", "running", "queued", "failed", "interrupted", "cancelled", "pending")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="A JSON list, one object per run: run_id, label, seed, state, attempts, requeues, "
    "job_id, note.",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(STATES),
    help="Only runs in this state (repeatable).",
)
@user_errors
def status(path: Path, as_json: bool, states: tuple[str, ...]) -> None:
    """Per-run state of a grid's output directory (or grid file), joined with the scheduler's
    view. Exit status 1 when any run failed."""
    from samat.launch.status import show_status
    from samat.store import RunDir

    runs = None
    if path.suffix in (".yaml", ".yml"):
        from samat.config import load_grid
        from samat.grid import expand

        grid = load_grid(path)
        # grids may share an output directory: only this grid's runs
        specs = expand(grid, str(path))
        runs = [RunDir(s.run_dir) for s in specs if (s.run_dir / "config.yaml").is_file()]
        path = Path(grid.output)
    code = show_status(path, console=console, as_json=as_json, states=states, runs=runs)
    sys.exit(code)


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run_ids",
    multiple=True,
    metavar="ID",
    help="Cancel only this run (repeatable); default: every queued or running run.",
)
@user_errors
def cancel(target: Path, run_ids: tuple[str, ...]) -> None:
    """Cancel a grid's SLURM jobs (TARGET: its output directory or grid file) and mark its
    unfinished runs cancelled; `samat submit` resumes them later."""
    from samat.launch.cancel import cancel_runs

    sys.exit(cancel_runs(target, run_ids=run_ids, console=console))


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@user_errors
def logs(run_dir: Path) -> None:
    """Print a run's log (RUN: its directory, <output>/runs/<id>) and where the scheduler's
    stdout and stderr of its job are."""
    from samat.launch.status import show_logs

    sys.exit(show_logs(run_dir, console=console))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "markdown", "latex", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--reference",
    metavar="TABLE",
    help="Put a paper's published numbers (table1 .. table7) and ours minus them beside each "
    "matching row.",
)
@click.option("--ci", is_flag=True, help="95% confidence intervals (Student's t, n-1 dof).")
@click.option(
    "--compare",
    metavar="LABEL",
    help="Per-seed paired differences of every row to the row LABEL (e.g. SGD).",
)
@click.option("--per-run", is_flag=True, help="With --format json: one object per run.")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Write to this file instead of stdout."
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(path_type=Path),
    help="Also write a clean-vs-robust scatter plot (PNG).",
)
@click.option("--plot-attack", help="Attack column for the plot's y axis (default: Average).")
@user_errors
def collect(
    path: Path,
    fmt: str,
    reference: str | None,
    ci: bool,
    compare: str | None,
    per_run: bool,
    out: Path | None,
    plot_file: Path | None,
    plot_attack: str | None,
) -> None:
    """Gather every run's result into a table (mean ± std over seeds, n seeds per row).

    PATH is a grid's output directory, or a grid file: then only that grid's runs (grids may
    share an output directory, and so their trained runs).
    """
    from samat import report

    runs = None
    if path.suffix in (".yaml", ".yml"):
        from samat.config import load_grid
        from samat.grid import expand

        grid = load_grid(path)
        runs = {spec.run_id: spec.label for spec in expand(grid, str(path))}
        path = Path(grid.output)
    from samat.errors import ConfigError
    from samat.store import write_atomic

    for target in (out, plot_file):
        if target is not None and not target.parent.is_dir():
            raise ConfigError(
                f"{target}: the folder {target.parent} does not exist; create it or write "
                "somewhere else"
            )
    options = {"reference": reference, "ci": ci, "compare": compare, "runs": runs}
    if fmt != "table":
        text = report.render_text(path, fmt, per_run_json=per_run, **options)
        if out is None:
            click.echo(text, nl=False)
        else:
            write_atomic(out, text.encode())
            console.print(f"wrote {out}")
    else:
        table = report.render_table(path, **options)
        # a file, a pipe or a SLURM log would get rich's 80 columns: too narrow for the tables
        width = report.natural_width(table)
        if out is not None:
            buffer = io.StringIO()
            Console(file=buffer, width=max(width, 100)).print(table)
            write_atomic(out, buffer.getvalue().encode())
            console.print(f"wrote {out}")
        else:
            wide = console if console.is_terminal else Console(width=max(console.width, width, 100))
            wide.print(table)
    if plot_file is not None:
        console.print(f"wrote {report.plot(path, plot_file, plot_attack, runs)}")
