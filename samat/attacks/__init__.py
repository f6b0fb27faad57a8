"""Attack specs: presets, labels and checks (torch-free), over one record per attack kind.

Building and running attacks (torchattacks, StAdv, corruptions) lives in `samat.attacks.runner`,
imported on first use: `samat.attacks.runner`, `.evaluate`, `.standard_autoattack`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from samat.attacks.kinds import KINDS, AttackKind, default_alpha
from samat.config import AttackSpec, ConfigError, format_budget

__all__ = [
    "GROUPS",
    "KINDS",
    "PRESETS",
    "AttackKind",
    "canonical",
    "default_alpha",
    "kind",
    "label",
    "resolve",
    "steps",
]

# The columns of the papers' tables (PAPER.md, "Robustness evaluation").
PRESETS: dict[str, AttackSpec] = {
    "fgsm_linf_1": AttackSpec(attack="fgsm", norm="linf", eps=1 / 255),
    "pgd10_linf_1": AttackSpec(attack="pgd", norm="linf", eps=1 / 255, steps=10),
    "pgd10_l2_32": AttackSpec(attack="pgd", norm="l2", eps=32 / 255, steps=10),
    "aa_l2_32": AttackSpec(attack="autoattack", norm="l2", eps=32 / 255),
    "aa_linf_1": AttackSpec(attack="autoattack", norm="linf", eps=1 / 255),
    "stadv": AttackSpec(attack="stadv"),
    "fab_l2_32": AttackSpec(attack="fab", norm="l2", eps=32 / 255, steps=10),
    "pixle": AttackSpec(attack="pixle", steps=5),
    "corruptions": AttackSpec(attack="corruptions"),
}

# Named lists of presets; `resolve` expands them in place.
GROUPS: dict[str, list[str]] = {
    "paper": [
        "fgsm_linf_1",
        "pgd10_linf_1",
        "pgd10_l2_32",
        "aa_l2_32",
        "stadv",
        "fab_l2_32",
        "pixle",
    ],
}

_BUILD_NAMES = {
    "build",
    "evaluate",
    "standard_autoattack",
    "run_batch",
    "check_budget",
    "attack_mode",
}


def __getattr__(name: str) -> Any:
    # the torch side, imported on first use so that validating a grid needs no torch
    if name in _BUILD_NAMES:
        return getattr(importlib.import_module("samat.attacks.runner"), name)
    raise AttributeError(f"module 'samat.attacks' has no attribute {name!r}")


def kind(spec: AttackSpec) -> AttackKind:
    return KINDS[spec.attack]


def steps(spec: AttackSpec) -> int | None:
    """The spec's steps, or its kind's default."""
    return spec.steps if spec.steps is not None else kind(spec).default_steps


def resolve(entries: Sequence[AttackSpec | str]) -> list[AttackSpec]:
    """Expand preset and group names into specs, checked, with one distinct label each."""
    specs: list[AttackSpec] = []
    for entry in entries:
        if isinstance(entry, AttackSpec):
            specs.append(entry)
        elif entry in GROUPS:
            specs.extend(PRESETS[name].model_copy() for name in GROUPS[entry])
        elif entry in PRESETS:
            specs.append(PRESETS[entry].model_copy())
        else:
            raise ConfigError(
                f"unknown attack preset {entry!r} in eval.attacks; known presets: "
                f"{', '.join([*PRESETS, *GROUPS])} (or write an attack spec)"
            )
    seen: set[str] = set()
    for spec in specs:
        check(spec)
        name = label(spec)
        if name in seen:
            raise ConfigError(
                f"two entries of eval.attacks have the label {name!r}; give one its own `label`"
            )
        seen.add(name)
    return specs


def label(spec: AttackSpec) -> str:
    """The spec's label, or one made from attack, steps, norm and budget ('PGD-10 linf 1/255')."""
    if spec.label:
        return spec.label
    record = kind(spec)
    name = record.display
    show = record.steps_in_label
    if show == "always" or (show == "if_set" and spec.steps is not None):
        name += f"-{steps(spec)}"
    if not record.bounded:
        return name
    return f"{name} {spec.norm} {format_budget(spec.eps)}"


def canonical(spec: AttackSpec) -> dict[str, Any]:
    """What determines an attack's result: its fields with defaults filled in, without the label
    (a relabelled column reuses the stored record). Equal attacks give equal dicts."""
    record = kind(spec)
    data: dict[str, Any] = {"attack": spec.attack, "steps": steps(spec)}
    if record.bounded:
        data.update(norm=spec.norm, eps=round(spec.eps, 12))
    if record.takes_alpha:
        alpha = spec.alpha if spec.alpha is not None else default_alpha(spec.norm, spec.eps)
        data["alpha"] = round(alpha, 12)
    data["options"] = dict(sorted(spec.options.items()))
    return data


def check(spec: AttackSpec) -> None:
    """Errors that need no model: fields an attack does not use, unknown or reserved options."""
    name = label(spec)
    record = kind(spec)
    if record.bounded and spec.norm not in record.norms:
        raise ConfigError(
            f"attack {name!r}: {spec.attack} supports norm {', '.join(record.norms)} only"
            + ("; use pgd with steps: 1 for l2" if spec.attack == "fgsm" else "")
        )
    if record.default_steps is None and spec.steps is not None:
        raise ConfigError(f"attack {name!r}: {spec.attack} takes no steps; remove `steps`")
    if spec.alpha is not None and not record.takes_alpha:
        raise ConfigError(f"attack {name!r}: `alpha` applies to pgd only; remove it")
    # by value, not by which keys were written: a request read back from eval.json has them all
    defaults = AttackSpec.model_fields
    if not record.bounded and (
        spec.eps != defaults["eps"].default or spec.norm != defaults["norm"].default
    ):
        raise ConfigError(f"attack {name!r}: {spec.attack} has no eps or norm; remove them")
    if not spec.options:
        return
    if record.options is not None:
        allowed, owner = set(record.options), spec.attack
    else:
        import torchattacks  # only for option names: most specs have none

        cls = getattr(torchattacks, record.torchattacks[spec.norm])
        allowed = set(inspect.signature(cls).parameters) - {"model"}
        owner = f"torchattacks.{cls.__name__}"
        reserved = sorted(set(spec.options) & reserved_options(spec))
        if reserved:
            raise ConfigError(
                f"attack {name!r}: options {reserved} come from the spec's own fields "
                "(eps, norm, steps, alpha) or from the run; remove them from options"
            )
    unknown = sorted(set(spec.options) - allowed)
    if unknown:
        raise ConfigError(
            f"attack {name!r}: unknown options {unknown} for {owner}; known: {sorted(allowed)}"
        )


def reserved_options(spec: AttackSpec) -> set[str]:
    """torchattacks arguments that the spec's own fields (or the run) set."""
    return {
        "fgsm": {"eps"},
        "pgd": {"eps", "alpha", "steps"},
        "fab": {"norm", "eps", "steps", "n_classes", "seed"},
        "square": {"norm", "eps", "n_queries", "seed"},
        "pixle": {"max_iterations"},
    }.get(spec.attack, set())
