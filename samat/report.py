"""Gather run directories into tables: mean ± std over seeds, like the papers' tables; optionally
the published numbers beside ours (`reference`), 95% t-intervals (`ci`) and per-seed paired
differences to a baseline row (`compare`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from samat.config import ConfigError, validate_method
from samat.grid import group_id, method_label
from samat.published import PublishedRow, PublishedTable
from samat.store import RunDir, RunReader, find_runs

NATURAL, AVERAGE = "Natural", "Average"
# clean accuracy on the attacked images (the first n, or n drawn), shown when it differs from the
# whole test set's, so that a row's robust columns sit beside the clean accuracy of their images
SUBSET = "Natural (attacked)"
CONFIDENCE = 0.95


@dataclass
class RunRecord:
    run: RunDir
    label: str
    group: str
    state: str
    seed: int
    config: dict[str, Any]
    result: dict[str, Any] | None


@dataclass
class Row:
    label: str
    runs: list[RunRecord] = field(default_factory=list)

    def states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.runs:
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts

    def by_seed(self, column: str, average_of: Sequence[str] = ()) -> dict[int, float]:
        """The column's value (a fraction) of every run that has one, by seed."""
        out = {}
        for record in self.runs:
            value = _column_value(record.result, column, average_of) if record.result else None
            if value is not None:
                out[record.seed] = value
        return out

    def values(self, column: str, average_of: Sequence[str] = ()) -> list[float]:
        return list(self.by_seed(column, average_of).values())


def _column_value(
    result: dict[str, Any], column: str, average_of: Sequence[str] = ()
) -> float | None:
    if column == NATURAL:
        return result["natural"]
    if column == AVERAGE:
        if not average_of:
            return result["average_robust"]
        # the published Average's columns, so that ours averages the same attacks
        values = [result["robust"].get(c) for c in average_of]
        return None if None in values else statistics.fmean(values)
    if column == SUBSET:
        return result.get("natural_subset")
    return result["robust"].get(column)


def load_records(root: Path, runs: dict[str, str] | None = None) -> list[RunRecord]:
    """Every run under an output directory, with its state and (if complete) its result. With
    `runs` (run id -> row label, from a grid), only those runs, labelled so."""
    found = find_runs(root)
    if runs is not None:
        found = [run for run in found if run.run_id in runs]
    if not found:
        raise ConfigError(
            f"{root}: no runs found; pass the grid's output directory (see `samat plan`)"
        )
    # each run's files read once; what does not depend on the seed computed once per config
    reader = RunReader()
    shared: dict[Hashable, tuple[str, dict[str, Any], str]] = {}
    records = []
    for run in found:
        view = reader.read(run)
        try:
            config, seed, key = reader.shared_config(view)
        except ConfigError as error:
            # a damaged run's file: named, and the other runs still counted
            logging.getLogger("samat").warning("%s; run %s left out", error, run.run_id)
            continue
        if key not in shared:
            shared[key] = (group_id(config), config.model_dump(mode="json"), method_label(config))
        group, dumped, default_label = shared[key]
        if dumped["seed"] != seed:
            dumped = {**dumped, "seed": seed}
        state, result = view.state, view.result
        status = "done" if result else state["state"]
        label = runs[run.run_id] if runs else state.get("label") or default_label
        records.append(RunRecord(run, label, group, status, seed, dumped, result))
    return records


def _config_key(config: dict[str, Any]) -> tuple[Any, ...]:
    # hyper-parameters by value: eps 16/255 before 128/255, linf before l2, SGD before Adam
    method = config["method"]
    return (
        validate_method(method).rank(),
        config["train"]["optimizer"]["name"] != "sgd",
        method.get("norm") == "l2",
        method.get("eps") or 0.0,
        method.get("rho") or 0.0,
    )


def group_rows(records: list[RunRecord], reference: PublishedTable | None = None) -> list[Row]:
    """One row per config without its seed. Ordered by method and hyper-parameters; with a
    reference, its rows first in the paper's order, then the rows it does not have."""
    rows: dict[str, Row] = {}
    for record in records:
        rows.setdefault(record.group, Row(record.label)).runs.append(record)

    def key(row: Row) -> tuple[Any, ...]:
        config = row.runs[0].config
        published = reference.find(config) if reference else None
        index = reference.rows.index(published) if published else -1
        return (published is None, index, *_config_key(config), row.label)

    return sorted(rows.values(), key=key)


def columns(records: list[RunRecord], reference: PublishedTable | None = None) -> list[str]:
    """Natural, then every attack label in first-seen order, then Average. With a reference, the
    reference's columns, in its order, also where no run has them yet (and no Average when the
    reference has none)."""
    seen: dict[str, None] = {}
    subset = False
    for record in records:
        result = record.result or {}
        for label in result.get("robust", {}):
            seen.setdefault(label, None)
        if result.get("robust") and result.get("natural_subset") not in (None, result["natural"]):
            subset = True
    natural = [NATURAL, *([SUBSET] if subset else [])]
    if reference is not None:
        return natural + [c for c in reference.columns if c != NATURAL]
    # attack success rates (text) have no meaningful average
    average = [] if any(r.result and r.result.get("task") == "text" for r in records) else [AVERAGE]
    return [*natural, *seen, *average]


def metric_caption(records: list[RunRecord]) -> str:
    """What the numbers are: accuracy %, mIoU % (segmentation) or, for text, accuracy % with the
    attack columns as success rates %."""
    metrics = {r.result.get("metric", "accuracy") for r in records if r.result}
    if any(r.result and r.result.get("task") == "text" for r in records):
        return "accuracy %; attack columns: success rate %, lower is more robust"
    if metrics == {"miou"}:
        return "mIoU %"
    return "accuracy %" if metrics <= {"accuracy"} else "accuracy % and mIoU %, by task"


def hidden_columns(records: list[RunRecord], cols: list[str]) -> list[str]:
    """Our attack columns that a reference's table leaves out."""
    return [c for c in columns(records) if c not in cols and c != AVERAGE]


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and count of percentages; `ci` the 95% interval."""

    mean: float
    std: float
    n: int
    ci: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.mean, "std": self.std, "n": self.n}
        if self.ci is not None:
            out["ci95"] = list(self.ci)
        return out


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (scipy: only for --ci;
    scipy.special loads in half the time of scipy.stats)."""
    from scipy.special import stdtrit

    return float(stdtrit(dof, 0.5 + CONFIDENCE / 2))


def describe(points: list[float], *, ci: bool = False) -> Stat | None:
    """Stat of values already in percent (points); the interval needs two values or more."""
    if not points:
        return None
    mean = statistics.fmean(points)
    n = len(points)
    std = statistics.stdev(points) if n > 1 else 0.0
    interval = None
    if ci and n > 1:
        half = t_quantile(n - 1) * std / math.sqrt(n)
        interval = (mean - half, mean + half)
    return Stat(mean, std, n, interval)


def summarize(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value), in percent."""
    stat = describe([v * 100 for v in values])
    return None if stat is None else (stat.mean, stat.std)


@dataclass
class RowReport:
    """One table row with what sits beside it: the published row and the paired differences."""

    row: Row
    cells: dict[str, Stat | None]
    published: PublishedRow | None = None
    # None: no --compare, or the baseline row itself
    compare: dict[str, Stat | None] | None = None
    pairs: int = 0

    @property
    def done(self) -> int:
        return len(self.row.values(NATURAL))

    def diff(self, column: str) -> float | None:
        """Ours minus published, in points."""
        stat = self.cells.get(column)
        pub = self.published.values.get(column) if self.published else None
        return None if stat is None or pub is None else stat.mean - pub


@dataclass
class Report:
    title: str
    cols: list[str]
    rows: list[RowReport]
    reference: PublishedTable | None = None
    baseline: str | None = None
    ci: bool = False
    hidden: list[str] = field(default_factory=list)

    def caption(self) -> list[str]:
        lines = []
        if self.ci:
            lines.append(
                f"cells: mean [{CONFIDENCE:.0%} CI, Student's t with n-1 dof]; "
                "one seed: the mean alone"
            )
        ref = self.reference
        if ref is not None:
            matched = sum(r.published is not None for r in self.rows)
            lines.append(
                f"published: {ref.name}, {ref.title}; {matched} of {len(self.rows)} rows "
                "matched; Δ published = ours − published, in points"
            )
            if ref.average_of and AVERAGE in ref.columns:
                lines.append(
                    f"Average: mean of the {len(ref.average_of)} published attack columns "
                    "per run, as in the paper"
                )
            lines += [f"note ({ref.name}): {note}" for note in ref.notes]
            if self.hidden:
                lines.append(
                    f"not in {ref.name}, not shown: {', '.join(self.hidden)} "
                    "(collect without --reference shows them)"
                )
        if self.baseline is not None:
            spread = "95% CI" if self.ci else "mean ± std"
            lines.append(
                f"Δ vs {self.baseline}: per-seed paired differences (row − {self.baseline}, "
                f"runs paired by seed), {spread}, in points"
            )
        return lines


def build(
    records: list[RunRecord],
    title: str,
    *,
    reference: PublishedTable | None = None,
    ci: bool = False,
    compare: str | None = None,
) -> Report:
    """The table's content, whatever the output format."""
    rows, cols = group_rows(records, reference), columns(records, reference)
    average_of = reference.average_of if reference else ()
    baseline = _baseline(rows, compare) if compare is not None else None
    reports = []
    for row in rows:
        cells = {c: describe([v * 100 for v in row.values(c, average_of)], ci=ci) for c in cols}
        report = RowReport(row, cells, reference.find(row.runs[0].config) if reference else None)
        if baseline is not None and row is not baseline:
            report.compare = {}
            for column in cols:
                ours, theirs = row.by_seed(column, average_of), baseline.by_seed(column, average_of)
                diffs = [(v - theirs[s]) * 100 for s, v in ours.items() if s in theirs]
                report.compare[column] = describe(diffs, ci=ci)
            report.pairs = len(set(row.by_seed(NATURAL)) & set(baseline.by_seed(NATURAL)))
        reports.append(report)
    hidden = hidden_columns(records, cols) if reference else []
    return Report(title, cols, reports, reference, compare, ci, hidden)


def _baseline(rows: list[Row], label: str) -> Row:
    found = [row for row in rows if row.label == label]
    if not found:
        labels = ", ".join(repr(row.label) for row in rows)
        raise ConfigError(f"--compare {label!r} is not a row of the table; choose one of {labels}")
    if len(found) > 1:
        raise ConfigError(
            f"--compare {label!r} names {len(found)} rows (configs that differ in what the label "
            "does not show); collect the grid file instead of the directory to tell them apart"
        )
    return found[0]


def _fmt(stat: Stat | None, *, signed: bool = False) -> str:
    if stat is None:
        return "-"
    number = "{:+.1f}" if signed else "{:.1f}"
    text = number.format(stat.mean)
    if stat.ci is not None:
        return f"{text} [{number.format(stat.ci[0])}, {number.format(stat.ci[1])}]"
    return f"{text} ± {stat.std:.1f}" if stat.n > 1 else text


def _status(row: Row) -> str:
    counts = row.states()
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


@dataclass(frozen=True)
class Line:
    """One printed line: a row, or one of its sub-rows (published, diff, compare)."""

    label: str
    cells: list[str]
    runs: str
    kind: str
    # seeds done (a row) or seed pairs (a comparison); None for the published lines
    n: int | None = None


def _lines(report: Report) -> list[Line]:
    """Every printed line: each row, then its published numbers, its difference to them and its
    paired difference to the baseline."""
    out = []
    for r in report.rows:
        cells = [_fmt(r.cells[c]) for c in report.cols]
        out.append(Line(r.row.label, cells, _status(r.row), "row", r.done))
        if r.published is not None and report.reference is not None:
            pub = [r.published.values.get(c) for c in report.cols]
            cells = ["-" if v is None else f"{v:.1f}" for v in pub]
            out.append(Line("  published", cells, "", "published"))
            diffs = [r.diff(c) for c in report.cols]
            cells = ["-" if d is None else f"{d:+.1f}" for d in diffs]
            out.append(Line("  Δ published", cells, "", "diff"))
        if r.compare is not None:
            cells = [_fmt(r.compare[c], signed=True) for c in report.cols]
            pairs = f"{r.pairs} pair{'s' if r.pairs != 1 else ''}"
            out.append(Line(f"  Δ vs {report.baseline}", cells, pairs, "compare", r.pairs))
    return out


def rich_table(report: Report) -> Table:
    caption = report.caption()
    # labels and titles are the user's text, shown as written: Text, never rich markup (a
    # label such as '[/]' would otherwise end the table with a MarkupError)
    table = Table(
        title=Text(report.title) if report.title else None,
        caption=Text("\n".join(caption)) if caption else None,
        caption_justify="left",
    )
    # the labels and the runs column stay on one line; the numbers wrap first on a narrow screen
    table.add_column("Method", style="bold", no_wrap=True)
    for column in report.cols:
        table.add_column(Text(column), justify="right")
    table.add_column("Runs", no_wrap=True)
    lines = _lines(report)
    sections = any(line.kind != "row" for line in lines)
    for i, line in enumerate(lines):
        last = i + 1 == len(lines) or lines[i + 1].kind == "row"
        table.add_row(
            Text(line.label),
            *line.cells,
            line.runs,
            style=None if line.kind == "row" else "dim",
            end_section=sections and last,
        )
    return table


def natural_width(table: Table) -> int:
    """The width at which no cell of the table wraps (for a pipe, a log file or --out)."""
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=10_000)
    return Measurement.get(probe, probe.options, table).maximum


def flat_rows(report: Report) -> list[dict[str, Any]]:
    """One mapping per table row with mean/std/n per column (percent) for CSV, Markdown, JSON;
    `published` and `compare` when asked for."""
    out = []
    for r in report.rows:
        entry: dict[str, Any] = {
            "method": r.row.label,
            "runs": len(r.row.runs),
            "done": r.done,
            "states": r.row.states(),
        }
        for column in report.cols:
            stat = r.cells[column]
            entry[column] = None if stat is None else stat.to_json()
        if report.reference is not None:
            entry["published"] = None
            if r.published is not None:
                entry["published"] = {
                    "table": report.reference.name,
                    "row": r.published.label,
                    "values": {c: r.published.values.get(c) for c in report.cols},
                    "diff": {c: r.diff(c) for c in report.cols},
                }
        if report.baseline is not None:
            entry["compare"] = None
            if r.compare is not None:
                entry["compare"] = {
                    "baseline": report.baseline,
                    "pairs": r.pairs,
                    "diff": {c: None if s is None else s.to_json() for c, s in r.compare.items()},
                }
        out.append(entry)
    return out


def per_run(records: list[RunRecord]) -> list[dict[str, Any]]:
    """The `--per-run` JSON: one object per run, accuracies as fractions."""
    out = []
    for r in records:
        res = r.result or {}
        out.append(
            {
                "run_id": r.run.run_id,
                "label": r.label,
                "state": r.state,
                "seed": r.seed,
                "config": r.config,
                "natural": res.get("natural"),
                "natural_subset": res.get("natural_subset"),
                "robust": res.get("robust", {}),
                "average_robust": res.get("average_robust"),
                "train_seconds": res.get("train_seconds"),
                "eval_seconds": res.get("eval_seconds"),
                "robust_examples": res.get("robust_examples"),
                "checkpoint": res.get("checkpoint"),
                "checkpoint_epoch": res.get("checkpoint_epoch"),
                "catastrophic_overfitting_epoch": res.get("catastrophic_overfitting_epoch"),
            }
        )
    return out


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def to_csv(report: Report) -> str:
    """One line per row: per column mean and std, then (when asked for) the interval, the
    published value and ours minus it, the paired difference to the baseline."""
    base = report.baseline
    header = ["method"]
    for c in report.cols:
        header += [f"{c} mean", f"{c} std"]
        header += [f"{c} ci95 low", f"{c} ci95 high"] if report.ci else []
        header += [f"{c} published", f"{c} diff"] if report.reference else []
        header += [f"{c} vs {base} mean", f"{c} vs {base} std"] if base is not None else []
    header += ["seeds"]
    header += ["published row"] if report.reference else []
    header += [f"pairs with {base}"] if base is not None else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for r in report.rows:
        cells = [r.row.label]
        for c in report.cols:
            stat = r.cells[c]
            cells += [_num(stat and stat.mean), _num(stat and stat.std)]
            if report.ci:
                interval = stat.ci if stat and stat.ci else (None, None)
                cells += [_num(interval[0]), _num(interval[1])]
            if report.reference:
                cells += [_num(r.published and r.published.values.get(c)), _num(r.diff(c))]
            if base is not None:
                diff = r.compare.get(c) if r.compare else None
                cells += [_num(diff and diff.mean), _num(diff and diff.std)]
        cells.append(str(r.done))
        if report.reference:
            cells.append(r.published.label if r.published else "")
        if base is not None:
            cells.append(str(r.pairs) if r.compare is not None else "")
        writer.writerow(cells)
    return buffer.getvalue()


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "−": r"$-$",
}


def _latex(text: str) -> str:
    text = "".join(_LATEX.get(ch, ch) for ch in text)
    return r"\quad " + text.lstrip() if text.startswith("  ") else text


def _markdown(text: str) -> str:
    # a sub-row's indent would vanish in Markdown: an arrow shows it instead
    return "↳ " + text.lstrip() if text.startswith("  ") else text.replace("|", "\\|")


def _text_table(report: Report, *, latex: bool) -> str:
    """Markdown or LaTeX: the table's lines with n (seeds done, or seed pairs) last, then the
    caption (LaTeX: as comments)."""
    header = ["Method", *report.cols, "n"]
    body = [
        [line.label, *line.cells, "" if line.n is None else str(line.n)] for line in _lines(report)
    ]
    caption = report.caption()
    if latex:
        lines = [
            r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
            r"\toprule",
            " & ".join(_latex(h) for h in header) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(_latex(c) for c in cells) + r" \\" for cells in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% {line}" for line in caption]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown(c) for c in cells) + " |" for cells in body]
    if caption:
        lines += ["", *caption]
    return "\n".join(lines) + "\n"


def _report(
    root: Path,
    *,
    reference: str | None,
    ci: bool,
    compare: str | None,
    runs: dict[str, str] | None,
) -> tuple[list[RunRecord], Report]:
    from samat import published

    table = published.table(reference) if reference is not None else None
    records = load_records(root, runs)
    done = sum(r.state == "done" for r in records)
    title = f"{root} — {done}/{len(records)} runs done ({metric_caption(records)})"
    return records, build(records, title, reference=table, ci=ci, compare=compare)


def render_table(
    root: Path,
    *,
    reference: str | None = None,
    ci: bool = False,
    compare: str | None = None,
    runs: dict[str, str] | None = None,
) -> Table:
    """The report as a rich Table. `reference` names a published table (table1 .. table7), `ci`
    asks for 95% t-intervals, `compare` names the baseline row for paired differences, `runs`
    keeps only a grid's runs (id -> label)."""
    return rich_table(_report(root, reference=reference, ci=ci, compare=compare, runs=runs)[1])


def render_text(
    root: Path,
    fmt: str,
    *,
    per_run_json: bool = False,
    reference: str | None = None,
    ci: bool = False,
    compare: str | None = None,
    runs: dict[str, str] | None = None,
) -> str:
    """The report as text: 'json' (rows, or one object per run), 'csv', 'markdown', 'latex'."""
    if fmt == "json" and per_run_json:
        return json.dumps(per_run(load_records(root, runs)), indent=2) + "\n"
    _, report = _report(root, reference=reference, ci=ci, compare=compare, runs=runs)
    if fmt == "json":
        return json.dumps(flat_rows(report), indent=2) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt in ("markdown", "latex"):
        return _text_table(report, latex=fmt == "latex")
    raise ValueError(f"unknown text format {fmt!r}")


def plot(
    root: Path, out: Path, attack: str | None = None, runs: dict[str, str] | None = None
) -> Path:
    """Clean vs robust accuracy scatter (one point per run, one colour per method row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(root, runs)
    rows, cols = group_rows(records), columns(records)
    column = attack or AVERAGE
    if column not in cols:
        raise ConfigError(f"no column {column!r} in the results; choose one of {cols[1:]}")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        points = [
            (r.result["natural"] * 100, _column_value(r.result, column))
            for r in row.runs
            if r.result
        ]
        points = [(x, y * 100) for x, y in points if y is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), label=row.label)
    ax.set_xlabel("natural accuracy (%)")
    ax.set_ylabel(f"{column} robust accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
