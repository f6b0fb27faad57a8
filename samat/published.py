"""The papers' published accuracies (samat/published.yaml) and how runs match their rows."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any

from samat import safeyaml
from samat.config import ConfigError, parse_budget

DATA_FILE = "published.yaml"
# match keys -> where a run config (RunConfig.model_dump(mode="json")) keeps them
MATCH_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data", "name"),
    "model": ("model", "name"),
    "method": ("method", "name"),
    "optimizer": ("train", "optimizer", "name"),
    "rho": ("method", "rho"),
    "norm": ("method", "norm"),
    "eps": ("method", "eps"),
}
# a row that does not name the optimizer is the papers' default, SGD
DEFAULT_MATCH = {"optimizer": "sgd"}


@dataclass(frozen=True)
class PublishedRow:
    label: str
    match: dict[str, Any]
    values: dict[str, float]

    def matches(self, config: dict[str, Any]) -> bool:
        return all(_matches(config, key, want) for key, want in self.match.items())


@dataclass(frozen=True)
class PublishedTable:
    name: str
    title: str
    columns: list[str]
    rows: list[PublishedRow]
    average_of: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, config: dict[str, Any]) -> PublishedRow | None:
        """The first row that a run config matches, or None."""
        return next((row for row in self.rows if row.matches(config)), None)


def _matches(config: dict[str, Any], key: str, want: Any) -> bool:
    node: Any = config
    for part in MATCH_KEYS[key]:
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return False
    if key in ("rho", "eps"):
        want = float(parse_budget(want))
        return isinstance(node, int | float) and abs(node - want) <= 1e-9 * max(1.0, abs(want))
    return fnmatchcase(str(node), str(want))


def _table(name: str, data: dict[str, Any]) -> PublishedTable:
    columns = list(data["columns"])
    shared = {**DEFAULT_MATCH, **data.get("match", {})}
    rows = []
    for entry in data["rows"]:
        values = entry["values"]
        if len(values) != len(columns):
            raise ValueError(
                f"{DATA_FILE}: {name} row {entry['label']!r} has {len(values)} values for "
                f"{len(columns)} columns"
            )
        match = {**shared, **entry["match"]}
        unknown = set(match) - set(MATCH_KEYS)
        if unknown:
            raise ValueError(f"{DATA_FILE}: {name} row {entry['label']!r}: unknown keys {unknown}")
        rows.append(
            PublishedRow(
                entry["label"],
                match,
                {c: float(v) for c, v in zip(columns, values, strict=True)},
            )
        )
    average_of = list(data.get("average_of", []))
    if not set(average_of) <= set(columns):
        raise ValueError(f"{DATA_FILE}: {name}: average_of names columns it does not have")
    return PublishedTable(name, data["title"], columns, rows, average_of, data.get("notes", []))


@functools.cache
def tables() -> dict[str, PublishedTable]:
    """Every published table, by name (table1 .. table7)."""
    source = resources.files("samat").joinpath(DATA_FILE)
    if not source.is_file():
        raise ConfigError(
            f"samat/{DATA_FILE} is missing from this installation of samat; reinstall it with "
            "its package data (pip install .)"
        )
    text = source.read_text(encoding="utf-8")
    return {name: _table(name, data) for name, data in safeyaml.load(text).items()}


def table(name: str) -> PublishedTable:
    """One published table; a ConfigError naming the known tables for any other name."""
    known = tables()
    if name not in known:
        raise ConfigError(
            f"unknown reference table {name!r}; choose one of {', '.join(sorted(known))}"
        )
    return known[name]
