"""One record per attack kind: what a spec's `attack:` may name, read by config validation,
labels, builders and the budget check. Torch-free, so that validating a grid imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AttackKind:
    name: str
    # column label stem: 'PGD' in 'PGD-10 linf 1/255'
    display: str
    # iterations (PGD, FAB, AutoAttack, StAdv), queries (Square) or iterations per restart
    # (Pixle) when a spec leaves `steps` unset; None = the attack takes no steps
    default_steps: int | None
    # when the label shows the step count: always, only when the spec sets it, never
    steps_in_label: Literal["always", "if_set", "never"]
    # eps and norm apply (a perturbation budget that the budget check enforces)
    bounded: bool
    norms: tuple[str, ...] = ("linf", "l2")
    # the spec's `alpha` applies
    takes_alpha: bool = False
    # option names a spec may set; None = the torchattacks class's own keyword arguments
    options: frozenset[str] | None = None
    # the torchattacks class name(s) by norm, for attacks built from torchattacks directly
    torchattacks: dict[str, str] | None = None
    # attacks one batch at a time, each batch stored as it finishes; False = a whole-subset
    # evaluation with its own record layout (corruptions)
    per_batch: bool = True
    reference: str = ""
    # the tasks whose runs it attacks (see samat.tasks): images, segmentation masks, text
    tasks: tuple[str, ...] = ("image",)


KINDS: dict[str, AttackKind] = {
    kind.name: kind
    for kind in (
        AttackKind(
            "fgsm",
            "FGSM",
            None,
            "never",
            True,
            norms=("linf",),
            torchattacks={"linf": "FGSM"},
            reference="Goodfellow et al. 2015",
        ),
        AttackKind(
            "pgd",
            "PGD",
            10,
            "always",
            True,
            takes_alpha=True,
            torchattacks={"linf": "PGD", "l2": "PGDL2"},
            reference="Madry et al. 2018",
            tasks=("image", "segmentation"),
        ),
        AttackKind(
            "autoattack",
            "AA",
            100,
            "if_set",
            True,
            options=frozenset({"n_queries"}),
            reference="Croce & Hein 2020 (the official 'standard' composition)",
        ),
        AttackKind(
            "fab",
            "FAB",
            10,
            "always",
            True,
            torchattacks={"linf": "FAB", "l2": "FAB"},
            reference="Croce & Hein 2020 (FAB)",
        ),
        AttackKind(
            "square",
            "Square",
            5000,
            "always",
            True,
            torchattacks={"linf": "Square", "l2": "Square"},
            reference="Andriushchenko et al. 2020",
        ),
        AttackKind(
            "pixle",
            "Pixle",
            5,
            "always",
            False,
            torchattacks={"linf": "Pixle"},
            reference="Pomponi et al. 2022",
        ),
        AttackKind(
            "stadv",
            "StAdv",
            100,
            "never",
            False,
            options=frozenset({"bound", "lr", "smoothness", "mode", "tau"}),
            reference="Xiao et al. 2018; bounded form of Laidlaw & Feizi 2021",
        ),
        AttackKind(
            "corruptions",
            "Corruptions",
            None,
            "never",
            False,
            options=frozenset({"root", "dataset", "corruptions", "severities"}),
            per_batch=False,
            reference="Hendrycks & Dietterich 2019 (CIFAR-10-C)",
        ),
        # Word-level attacks on text runs (samat.text): the options name the staged resources
        # and the search settings; see samat.text.task.
        AttackKind(
            "pso",
            "PSO",
            None,
            "never",
            False,
            options=frozenset({"hownet", "pop_size", "max_iters"}),
            per_batch=False,
            reference="Zang et al. 2020 (TextAttack's PSOZang2020 recipe)",
            tasks=("text",),
        ),
        AttackKind(
            "iga",
            "IGA",
            None,
            "never",
            False,
            options=frozenset(
                {
                    "embeddings",
                    "pop_size",
                    "max_iters",
                    "max_candidates",
                    "max_distance",
                    "max_rate",
                    "max_replacements",
                }
            ),
            per_batch=False,
            reference="Wang et al. 2019 (TextAttack's IGAWang2019 recipe)",
            tasks=("text",),
        ),
    )
}


# Hendrycks & Dietterich's 15 common corruptions, in the order of their CIFAR-10-C release.
CORRUPTION_NAMES: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)


def default_alpha(norm: str, eps: float) -> float:
    """PGD's step size when none is given: eps / 4 (l_inf) or eps / 8 (l_2), for evaluation and
    adversarial training alike."""
    return eps / (4 if norm == "linf" else 8)
