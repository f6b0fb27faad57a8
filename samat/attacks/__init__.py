"""Named attack specs mapped onto torchattacks, and a model's robust accuracy under each of them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchattacks
from torch import nn

from samat.config import AttackSpec, ConfigError, format_budget

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The columns of the paper's tables (PAPER.md, "Robustness evaluation"); torchattacks lacks StAdv.
PRESETS: dict[str, AttackSpec] = {
    "fgsm_linf_1": AttackSpec(attack="fgsm", norm="linf", eps=1 / 255),
    "pgd10_linf_1": AttackSpec(attack="pgd", norm="linf", eps=1 / 255, steps=10),
    "pgd10_l2_32": AttackSpec(attack="pgd", norm="l2", eps=32 / 255, steps=10),
    "aa_l2_32": AttackSpec(attack="autoattack", norm="l2", eps=32 / 255),
    "aa_linf_1": AttackSpec(attack="autoattack", norm="linf", eps=1 / 255),
    "fab_l2_32": AttackSpec(attack="fab", norm="l2", eps=32 / 255, steps=10),
    "pixle": AttackSpec(attack="pixle", steps=5),
}

# Named lists of presets; `resolve` expands them in place.
GROUPS: dict[str, list[str]] = {
    "paper": ["fgsm_linf_1", "pgd10_linf_1", "pgd10_l2_32", "aa_l2_32", "fab_l2_32", "pixle"],
}

_DISPLAY = {
    "fgsm": "FGSM",
    "pgd": "PGD",
    "autoattack": "AA",
    "fab": "FAB",
    "pixle": "Pixle",
    "square": "Square",
}
# `steps` means iterations (PGD, FAB, AutoAttack's gradient attacks), queries (Square) or
# iterations per restart (Pixle); these are the values when a spec leaves it unset.
_DEFAULT_STEPS = {"pgd": 10, "fab": 10, "pixle": 5, "square": 5000, "autoattack": 100}
_TORCH_NORM = {"linf": "Linf", "l2": "L2"}
_UNBOUNDED = {"pixle"}  # moves pixels around (an L0 attack): eps and norm do not apply
_AUTOATTACK_OPTIONS = {"n_queries"}


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
        _check(spec)
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
    name = _DISPLAY[spec.attack]
    if spec.attack in ("pgd", "fab", "pixle", "square"):
        name += f"-{_steps(spec)}"
    elif spec.attack == "autoattack" and spec.steps is not None:
        name += f"-{spec.steps}"
    if spec.attack in _UNBOUNDED:
        return name
    return f"{name} {spec.norm} {format_budget(spec.eps)}"


def build(spec: AttackSpec, model: nn.Module, *, num_classes: int, seed: int) -> Attack:
    """The torchattacks attack for a spec: `attack(images, labels) -> adversarial images`."""
    _check(spec)
    if spec.attack == "autoattack":
        return standard_autoattack(
            model,
            norm=spec.norm,
            eps=spec.eps,
            num_classes=num_classes,
            seed=seed,
            steps=_steps(spec),
            **spec.options,
        )
    cls = _attack_class(spec)
    arguments = {**spec.options, **_fixed_arguments(spec, num_classes, seed)}
    try:
        return cls(model, **arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"attack {label(spec)!r}: torchattacks.{cls.__name__} rejects options "
            f"{spec.options} ({error}); fix the options"
        ) from None


def standard_autoattack(
    model: nn.Module,
    *,
    norm: str,
    eps: float,
    num_classes: int,
    seed: int,
    steps: int = 100,
    n_queries: int = 5000,
) -> torchattacks.MultiAttack:
    """AutoAttack 'standard' as the official code (fra31/auto-attack) runs it, from torchattacks.

    APGD-CE, then APGD-T (targeted DLR), FAB-T and Square, each on the examples still classified
    correctly; 100 iterations, one restart, the top 9 other classes as targets, 5000 queries.
    torchattacks' own AutoAttack differs: 10 iterations, n_classes - 1 targets, FAB with 10 steps,
    Square with a rescaled schedule, and a clock seed when seed is None. What remains different
    from the official parts, only under l_2: torchattacks' APGD-T gives the whole batch the first
    example's step size, and its Square measures window norms over all channels together.
    """
    if num_classes < 4:
        raise ConfigError(
            f"autoattack needs at least 4 classes for its targeted DLR loss, not {num_classes}; "
            "use pgd instead"
        )
    torch_norm = _TORCH_NORM[norm]
    # torchattacks targets n_classes - 1 classes; the official standard version the top 9 others.
    targets = min(9, num_classes - 1)
    attacks = [
        torchattacks.APGD(
            model,
            norm=torch_norm,
            eps=eps,
            steps=steps,
            n_restarts=1,
            seed=seed,
            loss="ce",
            eot_iter=1,
            rho=0.75,
        ),
        torchattacks.APGDT(
            model,
            norm=torch_norm,
            eps=eps,
            steps=steps,
            n_restarts=1,
            seed=seed,
            eot_iter=1,
            rho=0.75,
            n_classes=targets + 1,
        ),
        torchattacks.FAB(
            model,
            norm=torch_norm,
            eps=eps,
            steps=steps,
            n_restarts=1,
            seed=seed,
            multi_targeted=True,
            n_classes=targets + 1,
        ),
        # The official code turns the schedule rescaling off for its 5000 queries.
        torchattacks.Square(
            model,
            norm=torch_norm,
            eps=eps,
            n_queries=n_queries,
            n_restarts=1,
            p_init=0.8,
            loss="margin",
            resc_schedule=False,
            seed=seed,
        ),
    ]
    return torchattacks.MultiAttack(attacks)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    specs: Sequence[AttackSpec | str],
    *,
    batch_size: int,
    num_classes: int,
    seed: int,
    on_batch: Callable[[str, int, int], None] | None = None,
) -> dict[str, float]:
    """Robust accuracy (a fraction) under each attack, keyed by label.

    `images` are in [0, 1] (the model normalizes inside); they go to the model's device in batches
    of `batch_size`. The model runs in eval mode and gets its mode back; the global torch and numpy
    random states are restored, and each attack starts from `seed`, so results are reproducible.
    `on_batch(label, done, total)` reports progress after each batch.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0), got {len(images)}, {len(labels)}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("images must lie in [0, 1]; the model normalizes them itself")
    resolved = resolve(specs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return {
                label(spec): _robust_accuracy(
                    build(spec, model, num_classes=num_classes, seed=seed),
                    spec,
                    model,
                    images,
                    labels,
                    batch_size=batch_size,
                    seed=seed,
                    on_batch=on_batch,
                )
                for spec in resolved
            }
    finally:
        np.random.set_state(numpy_state)
        model.train(was_training)


def _robust_accuracy(
    attack: Attack,
    spec: AttackSpec,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    on_batch: Callable[[str, int, int], None] | None,
) -> float:
    device = next(model.parameters()).device
    # PGD's random start and Pixle draw from the global generators (torch and numpy).
    torch.manual_seed(seed)
    np.random.seed(seed)
    correct, total = 0, len(images)
    for start in range(0, total, batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        adversarial = attack(x, y)
        _check_budget(spec, x, adversarial)
        with torch.no_grad():
            correct += (model(adversarial).argmax(1) == y).sum().item()
        if on_batch is not None:
            on_batch(label(spec), min(start + batch_size, total), total)
    return correct / total


def _check_budget(spec: AttackSpec, x: torch.Tensor, adversarial: torch.Tensor) -> None:
    # A bug in an attack must not pass as robustness numbers, so this raises instead of clamping.
    if adversarial.min() < 0 or adversarial.max() > 1:
        raise RuntimeError(f"attack {label(spec)!r} left the image range [0, 1]")
    if spec.attack in _UNBOUNDED:
        return
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(1) if spec.norm == "linf" else delta.norm(dim=1)
    if size.max().item() > spec.eps * (1 + 1e-4) + 1e-6:
        raise RuntimeError(
            f"attack {label(spec)!r} went beyond its budget: {spec.norm} perturbation "
            f"{size.max().item():.6g} > eps {spec.eps:.6g}"
        )


def _steps(spec: AttackSpec) -> int:
    return spec.steps if spec.steps is not None else _DEFAULT_STEPS[spec.attack]


def _attack_class(spec: AttackSpec) -> type:
    if spec.attack == "pgd":
        return torchattacks.PGD if spec.norm == "linf" else torchattacks.PGDL2
    return {
        "fgsm": torchattacks.FGSM,
        "fab": torchattacks.FAB,
        "pixle": torchattacks.Pixle,
        "square": torchattacks.Square,
    }[spec.attack]


def _fixed_arguments(spec: AttackSpec, num_classes: int | None, seed: int | None) -> dict:
    """The class arguments that come from the spec's own fields, so options may not set them."""
    if spec.attack == "fgsm":
        return {"eps": spec.eps}
    if spec.attack == "pgd":
        default = spec.eps / (4 if spec.norm == "linf" else 8)
        alpha = spec.alpha if spec.alpha is not None else default
        return {"eps": spec.eps, "alpha": alpha, "steps": _steps(spec)}
    if spec.attack == "fab":
        return {
            "norm": _TORCH_NORM[spec.norm],
            "eps": spec.eps,
            "steps": _steps(spec),
            "n_classes": num_classes,
            "seed": seed,
        }
    if spec.attack == "square":
        return {
            "norm": _TORCH_NORM[spec.norm],
            "eps": spec.eps,
            "n_queries": _steps(spec),
            "seed": seed,
        }
    return {"max_iterations": _steps(spec)}  # pixle


def _check(spec: AttackSpec) -> None:
    """Errors that need no model: fields an attack does not use, unknown or reserved options."""
    name = label(spec)
    if spec.attack == "fgsm" and spec.norm != "linf":
        raise ConfigError(f"attack {name!r}: fgsm is l_inf only; use pgd with steps: 1 for l2")
    if spec.attack == "fgsm" and spec.steps is not None:
        raise ConfigError(f"attack {name!r}: fgsm takes one step; remove `steps` or use pgd")
    if spec.alpha is not None and spec.attack != "pgd":
        raise ConfigError(f"attack {name!r}: `alpha` applies to pgd only; remove it")
    if spec.attack in _UNBOUNDED and spec.model_fields_set & {"eps", "norm"}:
        raise ConfigError(f"attack {name!r}: {spec.attack} has no eps or norm; remove them")
    if spec.attack == "autoattack":
        allowed = _AUTOATTACK_OPTIONS
        owner = "autoattack"
    else:
        cls = _attack_class(spec)
        allowed = set(inspect.signature(cls).parameters) - {"model"}
        owner = f"torchattacks.{cls.__name__}"
        reserved = sorted(set(spec.options) & set(_fixed_arguments(spec, None, None)))
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
