"""Expand a grid file into runs: sweeps, per-variant sweeps, include/exclude, seeds, run ids."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samat.config import (
    ConfigError,
    GridConfig,
    RunConfig,
    parse_budget,
    validate_run,
)


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    config: RunConfig
    label: str
    run_dir: Path


# Keys added after run ids were first handed out (segmentation and text): left out of the
# identity while at their defaults, so that adding them changed no existing run's id.
LATE_KEYS = (
    "data.size",
    "data.crop_size",
    "data.scale_range",
    "data.max_length",
    "data.generate",
    "model.pretrained",
    "train.iterations",
    "train.schedule.power",
    "train.schedule.warmup_ratio",
    # the fidelity options (docs/fidelity.md)
    "data.crop_padding_mode",
)
# The same for a method's own keys, left out while at the method class's default.
LATE_METHOD_KEYS = ("scaled", "subset", "l2_start")
_DEFAULTS: dict[str, Any] = {}


def canonical_json(config: RunConfig) -> str:
    """The training identity (the resolved config without `eval` and `track`) as JSON with
    sorted keys: configs that train the same weights give equal text."""
    identity = config.model_dump(mode="json", exclude={"eval", "track"})
    if not _DEFAULTS:
        _DEFAULTS.update(RunConfig().model_dump(mode="json"))
    for key in LATE_KEYS:
        *parents, last = key.split(".")
        node, default = identity, _DEFAULTS
        for part in parents:
            node, default = node[part], default[part]
        if node[last] == default[last]:
            del node[last]
    fields = type(config.method).model_fields
    for key in LATE_METHOD_KEYS:
        if key in fields and identity["method"][key] == fields[key].default:
            del identity["method"][key]
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def run_id(config: RunConfig) -> str:
    """Short hash of the training identity: data, model, method, train and seed. The evaluation
    request is not part of it, so adding an attack to a grid maps to the same (trained) runs;
    key order and number spelling do not matter."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


def group_id(config: RunConfig) -> str:
    """Hash of the config without its seed: runs that differ only by seed share it."""
    return run_id(config.model_copy(update={"seed": 0}))


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating levels as needed."""
    *parents, last = key.split(".")
    node = target
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = copy.deepcopy(value)


def get_dotted(source: dict[str, Any], key: str) -> Any:
    """Read `a.b.c` from nested dicts; KeyError if a level is missing."""
    node: Any = source
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _product(axes: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product over dotted keys; a list value lists alternatives, a scalar is fixed."""
    keys = list(axes)
    choices = [v if isinstance(v, list) else [v] for v in axes.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]


def method_label(config: RunConfig) -> str:
    """Row label in the papers' style: 'SGD', 'SAM rho=0.1', 'PGD-AT linf eps=8/255'; the method
    config class says its own part, the optimizer is added unless it is SGD."""
    optimizer = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[config.train.optimizer.name]
    own = config.method.label()
    if not own:
        return optimizer
    return own if optimizer == "SGD" else f"{own} ({optimizer})"


def _label(config: RunConfig, assignment: dict[str, Any]) -> str:
    # method and optimizer are already in method_label; the seed is what rows average over
    extras = [
        f"{key}={value}"
        for key, value in assignment.items()
        if not key.startswith(("method.", "train.optimizer")) and key != "seed"
    ]
    return " ".join([method_label(config), *extras])


def _matches(config: RunConfig, rule: dict[str, Any]) -> bool:
    resolved = config.model_dump(mode="json")
    for key, expected in rule.items():
        try:
            actual = get_dotted(resolved, key)
        except KeyError:
            return False
        options = expected if isinstance(expected, list) else [expected]
        if not any(_same(actual, option) for option in options):
            return False
    return True


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(actual, float) and not isinstance(expected, bool):
        try:
            return abs(actual - float(parse_budget(expected))) <= 1e-12 * max(1.0, abs(actual))
        except (TypeError, ValueError):
            return False
    return actual == expected


def _combinations(axes: dict[str, Any]) -> int:
    return math.prod(len(v) if isinstance(v, list) else 1 for v in axes.values())


def count_runs(grid: GridConfig) -> int:
    """How many runs the grid expands to before duplicates and exclude are dropped, computed
    without building one."""
    swept = _combinations(grid.sweep)
    within = sum(_combinations(variant) for variant in grid.variants) if grid.variants else 1
    extra = sum(_combinations(entry) for entry in grid.include)
    return (swept * within + extra) * len(grid.seeds)


def expand(grid: GridConfig, source: str = "grid") -> list[RunSpec]:
    """All runs of a grid, validated, in a stable order, without duplicates."""
    total = count_runs(grid)
    if total > grid.max_runs:
        raise ConfigError(
            f"{source}: the grid expands to {total:,} runs, more than max_runs "
            f"({grid.max_runs:,}); shorten its sweeps, variants or seeds, or raise max_runs"
        )
    output = Path(grid.output or Path("results") / grid.name)
    assignments: list[dict[str, Any]] = []
    for swept in _product(grid.sweep) if grid.sweep else [{}]:
        for variant in grid.variants or [{}]:
            for within in _product(variant):
                assignments.append({**swept, **within})
    for extra in grid.include:
        assignments.extend(_product(extra))

    specs: dict[str, RunSpec] = {}
    for assignment in assignments:
        for seed in grid.seeds:
            data = copy.deepcopy(grid.base)
            for key, value in assignment.items():
                set_dotted(data, key, value)
            data["seed"] = seed
            config = validate_run(data, source)
            if any(_matches(config, rule) for rule in grid.exclude):
                continue
            rid = run_id(config)
            if rid not in specs:
                specs[rid] = RunSpec(rid, config, _label(config, assignment), output / "runs" / rid)
    if not specs:
        raise ConfigError(
            f"{source}: the grid expands to no runs; check seeds, variants and exclude"
        )
    return list(specs.values())


def preflight(specs: list[RunSpec], source: str = "grid") -> None:
    """Check what pydantic cannot (model names, attack presets, data roots) before anything runs."""
    from samat import attacks, tasks

    for spec in specs:
        config = spec.config
        known = tasks.model_names(config.task)  # torch-free
        if config.model.name not in known:
            raise ConfigError(
                f"{source}: unknown model {config.model.name!r} (model.name) for "
                f"{config.task} data {config.data.name!r}; choose one of {sorted(known)}"
            )
        root = config.data.root
        if root is not None and not root.is_dir() and config.data.generate is None:
            raise ConfigError(
                f"{source}: data.root {root} does not exist; "
                f"put the {config.data.name} data there or fix data.root"
            )
        pretrained = config.model.pretrained
        if pretrained is not None and not pretrained.exists() and config.data.generate is None:
            raise ConfigError(
                f"{source}: model.pretrained {pretrained} does not exist; stage the weights "
                "there or fix model.pretrained"
            )
        attacks.resolve(config.eval.attacks)
