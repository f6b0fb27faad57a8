"""Attacks as callables `attack(images, labels) -> adversarial images`, from their specs, and the
budget check every adversarial batch passes before it counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchattacks
from torch import nn

from samat.attacks import check, default_alpha, kind, label, resolve, steps
from samat.config import AttackSpec, ConfigError

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_TORCH_NORM = {"linf": "Linf", "l2": "L2"}


def _arguments(spec: AttackSpec, num_classes: int, seed: int) -> dict:
    """The class arguments that come from the spec's own fields (options may not set them)."""
    norm, eps, n = _TORCH_NORM[spec.norm], spec.eps, steps(spec)
    return {
        "fgsm": lambda: {"eps": eps},
        "pgd": lambda: {
            "eps": eps,
            "alpha": spec.alpha if spec.alpha is not None else default_alpha(spec.norm, eps),
            "steps": n,
        },
        "fab": lambda: {
            "norm": norm,
            "eps": eps,
            "steps": n,
            "n_classes": num_classes,
            "seed": seed,
        },
        "square": lambda: {"norm": norm, "eps": eps, "n_queries": n, "seed": seed},
        "pixle": lambda: {"max_iterations": n},
    }[spec.attack]()


def build(spec: AttackSpec, model: nn.Module, *, num_classes: int, seed: int) -> Attack:
    """The attack a spec names, on `model` (which normalizes inside and returns logits)."""
    check(spec)
    if spec.attack == "autoattack":
        return standard_autoattack(
            model,
            norm=spec.norm,
            eps=spec.eps,
            num_classes=num_classes,
            seed=seed,
            steps=steps(spec),
            **spec.options,
        )
    if spec.attack == "stadv":
        from samat.attacks.stadv import StAdv

        return StAdv(model, steps=steps(spec), seed=seed, **spec.options)
    if spec.attack == "corruptions":
        raise ValueError("corruptions is a whole-subset evaluation, not a per-batch attack")
    cls = getattr(torchattacks, kind(spec).torchattacks[spec.norm])
    try:
        return cls(model, **{**spec.options, **_arguments(spec, num_classes, seed)})
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


def batch_seed(seed: int, index: int) -> int:
    """Each batch of an attack starts from its own seed, so that a resumed evaluation (which
    skips the batches already stored) attacks the rest exactly as an uninterrupted one."""
    return seed + 1_000_003 * index


def run_batch(
    attack: Attack, spec: AttackSpec, x: torch.Tensor, y: torch.Tensor, *, seed: int, index: int
) -> torch.Tensor:
    """One batch's adversarial images, checked against the spec's budget."""
    # PGD's random start and Pixle draw from the global generators (torch and numpy).
    torch.manual_seed(batch_seed(seed, index))
    np.random.seed(batch_seed(seed, index) % 2**32)
    adversarial = attack(x, y)
    check_budget(spec, x, adversarial, attack)
    return adversarial


def check_budget(
    spec: AttackSpec, x: torch.Tensor, adversarial: torch.Tensor, attack: Attack | None = None
) -> None:
    """A bug in an attack must not pass as robustness numbers, so this raises instead of
    clamping: images stay in [0, 1], perturbations (or StAdv's flows) within their budget."""
    if adversarial.shape != x.shape:
        raise RuntimeError(f"attack {label(spec)!r} changed the batch shape")
    if adversarial.min() < 0 or adversarial.max() > 1:
        raise RuntimeError(f"attack {label(spec)!r} left the image range [0, 1]")
    if spec.attack == "stadv":
        from samat.attacks.stadv import flow_bound_ok

        bounded = getattr(attack, "mode", "bounded") == "bounded"
        if bounded and not flow_bound_ok(attack.last_flow, attack.bound):
            raise RuntimeError(f"attack {label(spec)!r} went beyond its flow bound {attack.bound}")
        return
    if not kind(spec).bounded:
        return
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(1) if spec.norm == "linf" else delta.norm(dim=1)
    if size.max().item() > spec.eps * (1 + 1e-4) + 1e-6:
        raise RuntimeError(
            f"attack {label(spec)!r} went beyond its budget: {spec.norm} perturbation "
            f"{size.max().item():.6g} > eps {spec.eps:.6g}"
        )


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
    """Robust accuracy (a fraction) under each per-batch attack, keyed by label.

    `images` are in [0, 1] (the model normalizes inside); they go to the model's device in
    batches of `batch_size`. The model runs in eval mode with parameter gradients off and gets
    both back; the global torch and numpy random states are restored; batch i of each attack
    starts from `batch_seed(seed, i)`, so results are reproducible and resumable.
    `on_batch(label, done, total)` reports progress after each batch.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0), got {len(images)}, {len(labels)}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("images must lie in [0, 1]; the model normalizes them itself")
    resolved = resolve(specs)
    with attack_mode(model):
        out = {}
        for spec in resolved:
            attack = build(spec, model, num_classes=num_classes, seed=seed)
            correct = 0
            for index, start in enumerate(range(0, len(images), batch_size)):
                x, y = batch_on(model, images, labels, start, batch_size)
                adversarial = run_batch(attack, spec, x, y, seed=seed, index=index)
                correct += count_correct(model, adversarial, y)
                if on_batch is not None:
                    on_batch(label(spec), min(start + batch_size, len(images)), len(images))
            out[label(spec)] = correct / len(images)
        return out


def batch_on(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, start: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    x = images[start : start + size].to(device, non_blocking=True)
    return x, labels[start : start + size].to(device, non_blocking=True)


def count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(images).argmax(1) == labels).sum())


class attack_mode:
    """Eval mode, parameter gradients off, cudnn autotuning off (attacks call the model on
    ever-changing batch sizes), and the global RNG states restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        model = self.model
        self.training = model.training
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.benchmark = torch.backends.cudnn.benchmark
        self.numpy_state = np.random.get_state()
        device = next(model.parameters()).device
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        self.fork.__enter__()
        torch.backends.cudnn.benchmark = False
        model.eval()
        for p, _ in self.grads:
            p.requires_grad_(False)
        return model

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.grads:
            p.requires_grad_(flag)
        self.model.train(self.training)
        torch.backends.cudnn.benchmark = self.benchmark
        np.random.set_state(self.numpy_state)
        self.fork.__exit__(None, None, None)
