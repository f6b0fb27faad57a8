"""PGD on segmentation (the mean per-pixel cross-entropy) and mIoU under attack over a split."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from samat.config import Norm
from samat.methods.adversarial import default_alpha, pgd_step, uniform_in_ball
from samat.methods.batchnorm import frozen_bn_stats
from samat.segmentation.loss import pixel_cross_entropy
from samat.segmentation.metrics import confusion_matrix, miou, pixel_accuracy

NATURAL = "natural"


class SegAttack(NamedTuple):
    """One PGD attack: its report label, norm, budget, steps and step size (None = samat's)."""

    label: str
    norm: Norm
    eps: float
    steps: int = 10
    alpha: float | None = None


def pgd_segmentation(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    norm: Norm,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD from a random start in the eps ball, ascending the mean CE over non-ignored pixels.

    images float [N, 3, H, W] in [0, 1], masks int64 [N, H, W]; alpha None = eps / 4 (l_inf) or
    eps / 8 (l_2). Each step moves every example by alpha along the sign (l_inf) or the
    normalised gradient (l_2), so the mean's scale does not matter. The model keeps its mode,
    BatchNorm statistics are left alone and no parameter's .grad is written.
    """
    step_size = default_alpha(norm, eps) if alpha is None else alpha
    images = images.detach()
    adv = (images + uniform_in_ball(images, eps, norm, generator)).clamp(0, 1)
    with frozen_bn_stats(model):
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            loss = pixel_cross_entropy(model(adv), masks)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = pgd_step(adv.detach(), grad, images, eps=eps, alpha=step_size, norm=norm)
    return adv.detach()


def evaluate_segmentation(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    attacks: list[SegAttack] | list[tuple],
    *,
    batch_size: int,
    num_classes: int,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{"natural" and each attack's label: {"miou": ..., "pixel_accuracy": ...}} over the split.

    images uint8 (or float in [0, 1]) [N, 3, H, W] and masks [N, H, W] may live on the CPU; they
    go to the model's device a batch at a time. Attacks are (label, norm, eps, steps, alpha)
    tuples; each starts its own generator from `seed`, so a result does not depend on which
    other attacks run. The model runs in eval mode with parameter gradients off, and gets both
    back. mIoU and pixel accuracy come from one confusion matrix over the whole split.
    """
    specs = [SegAttack(*a) for a in attacks]
    labels = [NATURAL] + [a.label for a in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"attack labels must be unique and not {NATURAL!r}, got {labels[1:]}")
    if len(images) == 0 or len(images) != len(masks):
        raise ValueError(f"need as many masks as images (> 0), got {len(images)}, {len(masks)}")
    device = next(model.parameters()).device
    confusions = {}
    with eval_mode(model):
        for spec in [None, *specs]:
            generator = torch.Generator(device=device).manual_seed(seed)
            confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
            for start in range(0, len(images), batch_size):
                confusion += batch_confusion(
                    model,
                    images[start : start + batch_size],
                    masks[start : start + batch_size],
                    spec,
                    num_classes=num_classes,
                    generator=generator,
                )
            confusions[NATURAL if spec is None else spec.label] = confusion
    return {
        label: {"miou": miou(c), "pixel_accuracy": pixel_accuracy(c)}
        for label, c in confusions.items()
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with parameter gradients off; its mode and flags come back after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def batch_confusion(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    spec: SegAttack | None,
    *,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One batch's confusion matrix [C, C] on the model's device: clean when `spec` is None,
    else under its PGD (budget checked) from `generator`. images uint8 or float in [0, 1]
    [B, 3, H, W] and masks [B, H, W] may live on the CPU. Call it under `eval_mode`."""
    device = next(model.parameters()).device
    x = _as_float(images.to(device))
    y = masks.to(device).long()
    if spec is not None:
        x = _checked(spec, x, _attack(model, x, y, spec, generator))
    with torch.no_grad():
        return confusion_matrix(model(x).argmax(1), y, num_classes)


def _attack(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    spec: SegAttack,
    generator: torch.Generator | None,
) -> torch.Tensor:
    return pgd_segmentation(
        model,
        images,
        masks,
        norm=spec.norm,
        eps=spec.eps,
        steps=spec.steps,
        alpha=spec.alpha,
        generator=generator,
    )


def _as_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.min() < 0 or images.max() > 1:
        raise ValueError("images must lie in [0, 1]; the model normalizes them itself")
    return images.float()


def _checked(spec: SegAttack, x: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    # A bug in an attack must not pass as robustness numbers, so this raises instead of clamping.
    if adversarial.min() < 0 or adversarial.max() > 1:
        raise RuntimeError(f"attack {spec.label!r} left the image range [0, 1]")
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(1) if spec.norm == "linf" else delta.norm(dim=1)
    if size.max().item() > spec.eps * (1 + 1e-4) + 1e-6:
        raise RuntimeError(
            f"attack {spec.label!r} went beyond its budget: {spec.norm} perturbation "
            f"{size.max().item():.6g} > eps {spec.eps:.6g}"
        )
    return adversarial
