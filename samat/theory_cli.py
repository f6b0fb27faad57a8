"""`samat theory`: the papers' toy-model theorems next to samat's exact optima."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from samat.theory import (
    ToyModel,
    compare_with_theorems,
    optimal_w1_adversarial,
    optimal_w1_sam,
    optimal_w1_standard,
    robust_weight,
)

Record = dict[str, float | bool | None]

# Points per curve in --plot: enough for a smooth AT pole at eps -> eta, still well under a second.
_PLOT_POINTS = 200


def _check_p(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.5 < value < 1:
        raise click.BadParameter(f"must lie strictly between 0.5 and 1, got {value}")
    return value


def _check_eta(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def _parse_eps_list(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = []
    for item in value.split(","):
        try:
            eps = float(item)
        except ValueError:
            message = f"{item.strip()!r} is not a number; give e.g. 0.01,0.05"
            raise click.BadParameter(message) from None
        if not (math.isfinite(eps) and eps >= 0):
            raise click.BadParameter(f"every eps must be a finite number >= 0, got {item.strip()}")
        values.append(eps)
    return tuple(values)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.10g}"


def _fmt_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _fmt_error(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2e}"


def _thm43_verdict(record: Record) -> str:
    if record["sam_exceeds_st"]:
        return "holds"
    if record["eps"] == 0:
        return "n/a at eps 0"
    # The optima are resolved to ~1e-14 relative; a smaller SAM shift is invisible in doubles.
    if abs(record["sam_excess"]) < 1e-13:
        return "unresolved"
    return "FAILS"


def _table(record: Record) -> Table:
    """One rich table comparing the exact optima with Thm 4.1 - 4.5 at one eps."""
    accuracies = ", ".join(
        f"{method.upper()} {_fmt_accuracy(record[f'clean_acc_{method}'])}"
        f" / {_fmt_accuracy(record[f'robust_acc_{method}'])}"
        for method in ("st", "at", "sam")
    )
    table = Table(
        title=(
            f"p={record['p']} eta={record['eta']} n={record['n']}: "
            f"SAM radius {record['eps']}, AT l_inf budget {record['eps_at']}"
        ),
        caption=f"accuracy clean / robust at l_inf {record['eps_at']}: {accuracies}",
    )
    table.add_column("Thm")
    table.add_column("Quantity")
    for column in ("Exact", "Closed form", "Rel. err"):
        table.add_column(column, justify="right")
    rows = [
        ("4.1", "w1* (ST)", "w_st", "w_st_closed", "w_st_rel_error"),
        ("4.2", "w1^AT", "w_at", "w_at_closed", "w_at_rel_error"),
        ("4.4", "w1^SAM", "w_sam", "w_sam_thm44", "w_sam_thm44_rel_error"),
        ("4.4", "W_R^SAM/W_R* - 1", "sam_excess", "sam_excess_thm44", "sam_excess_rel_error"),
        ("4.5", "eps_SAM ~ eps_AT", "eps_sam_matching", "eps_sam_formula", "eps_sam_rel_error"),
    ]
    for theorem, quantity, exact, closed, error in rows:
        table.add_row(
            theorem, quantity, _fmt(record[exact]), _fmt(record[closed]), _fmt_error(record[error])
        )
        if theorem == "4.2":
            table.add_row("4.3", "w1^SAM > w1*", _fmt(record["w_sam"]), _thm43_verdict(record), "")
    return table


def _csv(records: list[Record]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: "" if value is None else value for key, value in record.items()})
    return buffer.getvalue()


def _plot(model: ToyModel, max_eps: float, marks: tuple[float, ...], path: Path) -> None:
    """PNG of W_R against eps for AT (budget) and SAM (radius), ST as a flat line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [max_eps * i / (_PLOT_POINTS - 1) for i in range(_PLOT_POINTS)]
    at_points = [(eps, optimal_w1_adversarial(model, eps)) for eps in grid if eps < model.eta]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.axhline(robust_weight(model, optimal_w1_standard(model)), color="gray", label="ST")
    axes.plot(
        [eps for eps, _ in at_points],
        [robust_weight(model, w) for _, w in at_points],
        label="AT (l_inf input budget eps)",
    )
    (sam_line,) = axes.plot(
        grid,
        [robust_weight(model, optimal_w1_sam(model, eps)) for eps in grid],
        label="SAM (weight radius eps on w_1)",
    )
    axes.scatter(
        marks,
        [robust_weight(model, optimal_w1_sam(model, eps)) for eps in marks],
        color=sam_line.get_color(),
    )
    # AT's W_R has a pole at eps = eta; a log axis keeps ST and SAM readable beside it.
    axes.set_yscale("log")
    axes.set_xlabel("eps")
    axes.set_ylabel("W_R = w_1 / n")
    axes.set_title(f"p={model.p}, eta={model.eta}, n={model.n}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@click.command()
@click.option(
    "--p",
    type=float,
    default=0.9,
    show_default=True,
    callback=_check_p,
    help="Probability that the robust feature x_1 agrees with y, in (0.5, 1).",
)
@click.option(
    "--eta",
    type=float,
    default=0.1,
    show_default=True,
    callback=_check_eta,
    help="Mean of the non-robust features, > 0.",
)
@click.option(
    "--n",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Number of non-robust features.",
)
@click.option(
    "--eps",
    "eps_list",
    default="0.01,0.05,0.1",
    show_default=True,
    callback=_parse_eps_list,
    help="Comma-separated eps: the SAM weight radius, and the AT budget unless --eps-at.",
)
@click.option(
    "--eps-at",
    "eps_at_list",
    default=None,
    callback=_parse_eps_list,
    help="Comma-separated l_inf AT budgets paired with --eps (one value: used for all).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG of W_R against eps for ST, AT and SAM.",
)
def theory(
    p: float,
    eta: float,
    n: int,
    eps_list: tuple[float, ...],
    eps_at_list: tuple[float, ...] | None,
    output_format: str,
    plot: Path | None,
) -> None:
    """Check the papers' toy-model theorems (4.1 - 4.5) against exact optima."""
    if eps_at_list is None:
        eps_at_list = eps_list
    elif len(eps_at_list) == 1:
        eps_at_list = eps_at_list * len(eps_list)
    elif len(eps_at_list) != len(eps_list):
        raise click.BadParameter(
            f"give one value or as many as --eps ({len(eps_list)}), got {len(eps_at_list)}",
            param_hint="'--eps-at'",
        )
    model = ToyModel(p=p, eta=eta, n=n)
    pairs = zip(eps_list, eps_at_list, strict=True)
    records = [compare_with_theorems(model, eps, eps_at) for eps, eps_at in pairs]
    if output_format == "json":
        click.echo(json.dumps(records, indent=2))
    elif output_format == "csv":
        click.echo(_csv(records), nl=False)
    else:
        console = Console()
        for record in records:
            console.print(_table(record))
    if plot is not None:
        _plot(model, max(eps_list), eps_list, plot)
