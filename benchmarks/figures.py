"""What the benchmarks report: figures with a target, printed as they come and as a final table."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class Figure:
    """One reported number: `text` is how it prints, `ok` None where there is no target."""

    name: str
    value: float | None
    text: str
    target: str = "-"
    ok: bool | None = None


def at_most(name: str, value: float, limit: float, text: str) -> Figure:
    """A figure whose target is value <= limit."""
    return Figure(name, value, text, f"<= {limit:g}", value <= limit)


def at_least(name: str, value: float, limit: float, text: str) -> Figure:
    """A figure whose target is value >= limit."""
    return Figure(name, value, text, f">= {limit:g}", value >= limit)


class Printer:
    """Lines to stdout and, with a log file, to that file too; flushed at once (long runs)."""

    def __init__(self, log: Path | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        # held open for the whole run and closed by close(): lines reach the file as printed
        self.log = Path(log).open("w") if log else None  # noqa: SIM115

    def line(self, text: str = "") -> None:
        """Print one line (or several joined by newlines)."""
        for handle in (self.stream, self.log):
            if handle is not None:
                handle.write(text + "\n")
                handle.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def table(figures: list[Figure]) -> str:
    """The final compact table: figure, value, target, ok?."""
    header = ("figure", "value", "target", "ok?")
    rows = [(f.name, f.text, f.target, {True: "ok", False: "NO", None: "-"}[f.ok]) for f in figures]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if row is header:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def write_json(path: Path, data: dict[str, Any], figures: list[Figure]) -> None:
    """Every number of the run, and the figures, as one JSON file."""
    payload = {**data, "figures": [asdict(f) for f in figures]}
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
