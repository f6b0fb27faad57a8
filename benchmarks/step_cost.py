"""Step cost of each training method against plain SGD and against its floor, in one run.

The floor of a method is what its passes would cost if they cost no more than the primitives
measured in the same run: a forward pass t_f, an input-only backward t_bi (loss gradient w.r.t.
the input, parameters frozen) and a whole plain SGD step t_step (forward, backward, update):

    ST     t_step                       SAM / ASAM  2 t_step
    PGD-k  k (t_f + t_bi) + t_step      FGSM-RS     (t_f + t_bi) + t_step
    ESAM / LookSAM  passes_per_step * t_step (the method's own pass count: 1.7 and 1 + 1/k)

measured / floor > 1 is overhead on top of the passes (perturbations, copies, host syncs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.clock import MEAN, STD, median, random_batches, timed
from benchmarks.figures import Figure, Printer, at_most
from samat import methods, models
from samat.config import validate_run
from samat.methods import frozen_bn_stats
from samat.train import make_optimizer

FLOOR_TARGET = 1.05
LOOKSAM_K = 5
LOOKSAM_TARGET = 1.3  # x SGD's step cost


@dataclass(frozen=True)
class Case:
    """One method to time: its config, how its floor is formed and its steps per cycle."""

    label: str
    config: dict[str, Any]
    # "st", "sam", "pgd" (k input-gradient passes + a step) or "passes" (passes_per_step steps)
    floor: str
    attack_steps: int = 0
    # LookSAM is dearer every k-th step: time whole cycles of k steps
    cycle: int = 1


@dataclass(frozen=True)
class Primitives:
    """Median seconds of a forward, an input-only backward and a plain SGD step."""

    forward: float
    input_backward: float
    step: float


@dataclass
class Setup:
    """What every method is timed on."""

    device: torch.device
    model: str = "preact_resnet18"
    width: int | None = None
    batch_size: int = 128
    image_size: int = 32
    channels: int = 3
    classes: int = 10
    amp: bool = False
    channels_last: bool = False
    warmup: int = 3
    steps: int = 5
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        width = f" width {self.width}" if self.width else ""
        return (
            f"{self.model}{width}, batch {self.batch_size} of {self.channels}x{self.image_size}x"
            f"{self.image_size} random images, {self.classes} classes, {self.device}, "
            f"bf16 autocast {'on' if self.amp else 'off'}, channels_last "
            f"{'on' if self.channels_last else 'off'}, {self.warmup} warm-up + {self.steps} "
            "timed steps (median)"
        )


def floor(case: Case, primitives: Primitives, passes_per_step: float) -> float:
    """The method's floor in seconds per step (see the module docstring)."""
    if case.floor == "st":
        return primitives.step
    if case.floor == "sam":
        return 2 * primitives.step
    if case.floor == "pgd":
        attack = primitives.forward + primitives.input_backward
        return case.attack_steps * attack + primitives.step
    if case.floor == "passes":
        return passes_per_step * primitives.step
    raise ValueError(f"unknown floor {case.floor!r}")


def cases(available: Collection[str], pgd_steps: int = 10) -> tuple[list[Case], list[str]]:
    """The methods to time, and a note for each one samat does not have (yet)."""
    eps = 8 / 255
    wanted = [
        Case("SGD", {"name": "standard"}, "st"),
        Case("SAM", {"name": "sam", "rho": 0.1}, "sam"),
        Case("ASAM", {"name": "asam", "rho": 1.0}, "sam"),
        Case("FGSM-AT", {"name": "fgsm_at", "eps": eps}, "pgd", attack_steps=1),
        Case(
            f"PGD-{pgd_steps} AT",
            {"name": "pgd_at", "eps": eps, "steps": pgd_steps},
            "pgd",
            attack_steps=pgd_steps,
        ),
        Case("ESAM", {"name": "esam", "rho": 0.1}, "passes"),
        Case(
            f"LookSAM k={LOOKSAM_K}",
            {"name": "looksam", "rho": 0.1, "k": LOOKSAM_K},
            "passes",
            cycle=LOOKSAM_K,
        ),
    ]
    kept = [case for case in wanted if case.config["name"] in available]
    notes = [
        f"{case.label}: skipped, samat.methods.METHODS has no {case.config['name']!r}"
        for case in wanted
        if case.config["name"] not in available
    ]
    return kept, notes


def _model(setup: Setup) -> nn.Module:
    torch.manual_seed(0)
    model = models.create(
        setup.model,
        setup.classes,
        in_channels=setup.channels,
        image_size=setup.image_size,
        mean=(MEAN,) * setup.channels,
        std=(STD,) * setup.channels,
        width=setup.width,
    ).to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def _autocast(setup: Setup) -> Any:
    return torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.amp)


def _loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # float32 loss under autocast, as samat's methods take it
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def _samples(setup: Setup, work: Callable[[tuple[torch.Tensor, torch.Tensor]], Any]) -> list:
    batches = itertools.cycle(setup.batches)
    for _ in range(setup.warmup):
        work(next(batches))
    return [work(next(batches)) for _ in range(setup.steps)]


def measure_primitives(setup: Setup) -> dict[str, list[float]]:
    """Samples (seconds) of t_f, t_bi and t_step, each after its own warm-up."""
    model = _model(setup)
    optimizer = make_optimizer(validate_run({}).train.optimizer, model)
    device = setup.device

    def sgd_step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        images, labels = batch

        def work() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(setup):
                logits = model(images)
            _loss(logits, labels).backward()
            optimizer.step()

        return timed(work, device)

    def input_passes(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        images, labels = batch
        x = images.detach().clone().requires_grad_(True)
        held: dict[str, torch.Tensor] = {}

        def forward() -> None:
            with _autocast(setup):
                held["loss"] = _loss(model(x), labels, reduction="sum")

        def backward() -> None:
            torch.autograd.grad(held["loss"], x)

        return timed(forward, device), timed(backward, device)

    steps = _samples(setup, sgd_step)
    model.requires_grad_(False)
    with frozen_bn_stats(model):  # as PGD runs: batch statistics, running ones untouched
        pairs = _samples(setup, input_passes)
    model.requires_grad_(True)
    return {
        "forward": [f for f, _ in pairs],
        "input_backward": [b for _, b in pairs],
        "step": steps,
    }


def measure_method(setup: Setup, case: Case) -> tuple[float, float]:
    """(median seconds per step, passes_per_step) of one samat method."""
    model = _model(setup)
    config = validate_run({"method": case.config})
    optimizer = make_optimizer(config.train.optimizer, model)
    method = methods.create(config.method, optimizer, amp=setup.amp)
    batches = itertools.cycle(setup.batches)
    for _ in range(setup.warmup):
        method.step(model, *next(batches))

    def cycle() -> None:
        for _ in range(case.cycle):
            method.step(model, *next(batches))

    cycles = max(1, math.ceil(setup.steps / case.cycle))
    times = [timed(cycle, setup.device) / case.cycle for _ in range(cycles)]
    return median(times), float(method.passes_per_step)


def run(setup: Setup, printer: Printer, *, pgd_steps: int = 10, tag: str = "") -> dict[str, Any]:
    """Time every method and the primitives; print the ratios; the numbers as a dict."""
    if not setup.batches:
        setup.batches = random_batches(
            4,
            setup.batch_size,
            device=setup.device,
            channels=setup.channels,
            size=setup.image_size,
            classes=setup.classes,
            channels_last=setup.channels_last,
        )
    printer.line(f"step cost{tag}: {setup.describe()}")
    kept, notes = cases(methods.METHODS, pgd_steps)
    # primitives before and after the methods, pooled: drift over the run hits both sides
    before = measure_primitives(setup)
    timings = {}
    for case in kept:  # a progress line each: PGD-10 on a CPU takes minutes
        timings[case.label] = measure_method(setup, case)
        printer.line(f"  ... {case.label}: {timings[case.label][0] * 1e3:.2f} ms/step")
    after = measure_primitives(setup)
    pooled = {key: before[key] + after[key] for key in before}
    primitives = Primitives(**{key: median(values) for key, values in pooled.items()})
    printer.line(
        f"  primitives: t_f {primitives.forward * 1e3:.2f} ms, t_bi "
        f"{primitives.input_backward * 1e3:.2f} ms, t_step {primitives.step * 1e3:.2f} ms"
    )
    sgd = timings["SGD"][0]
    rows = {}
    printer.line(
        f"  {'method':14s} {'ms/step':>9s} {'x SGD':>7s} {'passes':>7s} {'floor ms':>9s} "
        f"{'/floor':>7s}"
    )
    for case in kept:
        seconds, passes = timings[case.label]
        bound = floor(case, primitives, passes)
        rows[case.label] = {
            "seconds_per_step": seconds,
            "images_per_second": setup.batch_size / seconds,
            "vs_sgd": seconds / sgd,
            "passes_per_step": passes,
            "floor_seconds": bound,
            "vs_floor": seconds / bound,
            "floor": case.floor,
        }
        printer.line(
            f"  {case.label:14s} {seconds * 1e3:9.2f} {seconds / sgd:7.2f} {passes:7.2f} "
            f"{bound * 1e3:9.2f} {seconds / bound:7.2f}"
        )
    for note in notes:
        printer.line(f"  {note}")
    return {
        "setup": setup.describe(),
        "primitives": {
            "forward": primitives.forward,
            "input_backward": primitives.input_backward,
            "step": primitives.step,
            "samples": pooled,
        },
        "methods": rows,
        "skipped": notes,
    }


def figures(result: dict[str, Any], tag: str = "") -> list[Figure]:
    """Cost vs SGD (against the pass count) and measured / floor (target <= 1.05) per method."""
    out = []
    for label, row in result["methods"].items():
        if label == f"LookSAM k={LOOKSAM_K}":  # the target for LookSAM: at most 1.3x SGD
            out.append(
                at_most(
                    f"{label} step cost vs SGD{tag}",
                    row["vs_sgd"],
                    LOOKSAM_TARGET,
                    f"x{row['vs_sgd']:.2f}",
                )
            )
        elif label != "SGD":
            out.append(
                Figure(
                    f"{label} step cost vs SGD{tag}",
                    row["vs_sgd"],
                    f"x{row['vs_sgd']:.2f}",
                    f"~{row['passes_per_step']:g} (passes)",
                )
            )
    for label, row in result["methods"].items():
        out.append(
            at_most(
                f"{label} measured/floor{tag}",
                row["vs_floor"],
                FLOOR_TARGET,
                f"{row['vs_floor']:.2f}",
            )
        )
    return out
