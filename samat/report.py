"""Gather run directories into tables: mean ± std over seeds, like the papers' tables."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from samat.config import ConfigError
from samat.grid import group_id, method_label
from samat.store import RunDir, find_runs

NATURAL, AVERAGE = "Natural", "Average"
# clean accuracy on the attacked images (the first n, or n drawn), shown when it differs from the
# whole test set's, so that a row's robust columns sit beside the clean accuracy of their images
SUBSET = "Natural (attacked)"


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

    def values(self, column: str) -> list[float]:
        out = []
        for record in self.runs:
            value = _column_value(record.result, column) if record.result else None
            if value is not None:
                out.append(value)
        return out


def _column_value(result: dict[str, Any], column: str) -> float | None:
    if column == NATURAL:
        return result["natural"]
    if column == AVERAGE:
        return result["average_robust"]
    if column == SUBSET:
        return result.get("natural_subset")
    return result["robust"].get(column)


def load_records(root: Path) -> list[RunRecord]:
    """Every run under an output directory, with its state and (if complete) its result."""
    runs = find_runs(root)
    if not runs:
        raise ConfigError(
            f"{root}: no runs found; pass the grid's output directory (see `samat plan`)"
        )
    records = []
    for run in runs:
        config = run.config()
        result = run.result()
        state = run.state()
        status = "done" if result else state["state"]
        label = state.get("label") or method_label(config)
        records.append(
            RunRecord(
                run,
                label,
                group_id(config),
                status,
                config.seed,
                config.model_dump(mode="json"),
                result,
            )
        )
    return records


# Rows in the papers' order: standard training, SAM variants, then adversarial training.
METHOD_ORDER = {"standard": 0, "sam": 1, "asam": 2, "fgsm_at": 3, "pgd_at": 4}


def group_rows(records: list[RunRecord]) -> list[Row]:
    """One row per config without its seed, ordered by method, then label."""
    rows: dict[str, Row] = {}
    for record in records:
        rows.setdefault(record.group, Row(record.label)).runs.append(record)
    return sorted(
        rows.values(),
        key=lambda row: (METHOD_ORDER.get(row.runs[0].config["method"]["name"], 9), row.label),
    )


def columns(records: list[RunRecord]) -> list[str]:
    """Natural, then every attack label in first-seen order, then Average."""
    seen: dict[str, None] = {}
    subset = False
    for record in records:
        result = record.result or {}
        for label in result.get("robust", {}):
            seen.setdefault(label, None)
        if result.get("robust") and result.get("natural_subset") not in (None, result["natural"]):
            subset = True
    return [NATURAL, *([SUBSET] if subset else []), *seen, AVERAGE]


def summarize(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value), in percent."""
    if not values:
        return None
    mean = statistics.fmean(values) * 100
    std = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return mean, std


def _cell(row: Row, column: str) -> str:
    values = row.values(column)
    stats = summarize(values)
    if stats is None:
        return "-"
    mean, std = stats
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _status(row: Row) -> str:
    counts = row.states()
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def rich_table(rows: list[Row], cols: list[str], title: str) -> Table:
    table = Table(title=title)
    table.add_column("Method", style="bold")
    for column in cols:
        table.add_column(column, justify="right")
    table.add_column("Runs")
    for row in rows:
        table.add_row(row.label, *(_cell(row, c) for c in cols), _status(row))
    return table


def flat_rows(rows: list[Row], cols: list[str]) -> list[dict[str, Any]]:
    """One mapping per table row with mean/std per column (percent) for CSV, Markdown, JSON."""
    out = []
    for row in rows:
        entry: dict[str, Any] = {
            "method": row.label,
            "runs": len(row.runs),
            "done": len(row.values(NATURAL)),
            "states": row.states(),
        }
        for column in cols:
            stats = summarize(row.values(column))
            entry[column] = None if stats is None else {"mean": stats[0], "std": stats[1]}
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


def to_csv(rows: list[Row], cols: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", *(f"{c} {k}" for c in cols for k in ("mean", "std")), "seeds"])
    for entry in flat_rows(rows, cols):
        cells = []
        for c in cols:
            stats = entry[c]
            cells += ["", ""] if stats is None else [f"{stats['mean']:.2f}", f"{stats['std']:.2f}"]
        writer.writerow([entry["method"], *cells, entry["done"]])
    return buffer.getvalue()


def _text_table(rows: list[Row], cols: list[str], *, latex: bool) -> str:
    header = ["Method", *cols]
    body = [[row.label, *(_cell(row, c) for c in cols)] for row in rows]
    if latex:
        lines = [
            r"\begin{tabular}{l" + "r" * len(cols) + "}",
            r"\toprule",
            " & ".join(header) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(cells).replace("±", r"$\pm$") + r" \\" for cells in body]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def render(root: Path, fmt: str, *, per_run_json: bool = False) -> str | Table:
    """The report in one format: a rich Table for 'table', text for the others."""
    records = load_records(root)
    rows, cols = group_rows(records), columns(records)
    if fmt == "json":
        data = per_run(records) if per_run_json else flat_rows(rows, cols)
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        return to_csv(rows, cols)
    if fmt in ("markdown", "latex"):
        return _text_table(rows, cols, latex=fmt == "latex")
    done = sum(r.state == "done" for r in records)
    return rich_table(rows, cols, f"{root} — {done}/{len(records)} runs done (accuracy %)")


def plot(root: Path, out: Path, attack: str | None = None) -> Path:
    """Clean vs robust accuracy scatter (one point per run, one colour per method row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(root)
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
