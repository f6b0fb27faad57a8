"""Adversarial training on PGD (Madry et al. 2018) or FGSM-with-random-start (Wong et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from samat.attacks.kinds import default_alpha
from samat.config import Norm
from samat.methods.base import Method, StepResult, classification_loss
from samat.methods.batchnorm import frozen_bn_stats

# Guards divisions by a per-example norm; far below any gradient or perturbation that matters.
_TINY = 1e-12


def _per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """l_2 norm of each example, shaped to broadcast against `x`."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).view(-1, *[1] * (x.dim() - 1))


def project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project each example's perturbation onto the eps ball of the given norm."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_example_norm(delta).clamp_min(_TINY)).clamp(max=1)


def pgd_step(
    adv: torch.Tensor,
    grad: torch.Tensor,
    images: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    norm: Norm,
) -> torch.Tensor:
    """One ascent step from `adv`, projected onto the eps ball around `images` and into [0, 1].

    l_inf steps by alpha * sign(grad); l_2 by alpha * grad / ||grad||_2 per example. Clamping to
    [0, 1] after the projection only shrinks coordinates towards `images`, so stays in the ball.
    """
    direction = grad.sign() if norm == "linf" else grad / _per_example_norm(grad).clamp_min(_TINY)
    moved = adv + alpha * direction
    return (images + project(moved - images, eps, norm)).clamp(0, 1)


def uniform_in_ball(
    images: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A perturbation drawn uniformly from the eps ball, one per example.

    l_2: a Gaussian direction, normalised, times radius eps * U^(1/d), which is uniform in the
    ball (torchattacks' PGDL2 uses radius eps * U, which favours the centre).
    """
    device = generator.device if generator is not None else images.device
    options = {"generator": generator, "device": device, "dtype": images.dtype}
    if norm == "linf":
        delta = (2 * torch.rand(images.shape, **options) - 1) * eps
    else:
        direction = torch.randn(images.shape, **options)
        direction = direction / _per_example_norm(direction).clamp_min(_TINY)
        dims = images[0].numel()
        radius = eps * torch.rand(images.shape[0], **options) ** (1 / dims)
        delta = direction * radius.view(-1, *[1] * (images.dim() - 1))
    return delta.to(images.device)


def radial_start(
    images: torch.Tensor, eps: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The authors' l_2 random start: a Gaussian direction, normalised, times eps * U(0, 1) per
    example (SAM_AT utils.py:77-81, robust_overfitting train_cifar.py:80-83): mean radius eps / 2,
    where uniform in the ball has eps d / (d + 1). Draws the Gaussian first, then the radii."""
    device = generator.device if generator is not None else images.device
    options = {"generator": generator, "device": device, "dtype": images.dtype}
    direction = torch.randn(images.shape, **options)
    norm = _per_example_norm(direction)
    radius = torch.rand(images.shape[0], **options).view_as(norm)
    return (direction * (radius / norm * eps)).to(images.device)


def start_perturbation(
    images: torch.Tensor,
    eps: float,
    norm: Norm,
    l2_start: str = "ball",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random start's perturbation: `uniform_in_ball`, or `radial_start` for l_2 'radial'."""
    if norm == "l2" and l2_start == "radial":
        return radial_start(images, eps, generator)
    return uniform_in_ball(images, eps, norm, generator)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    alpha: float | None,
    steps: int,
    norm: Norm,
    random_start: bool,
    generator: torch.Generator | None = None,
    amp: str | bool = "off",
    l2_start: str = "ball",
) -> torch.Tensor:
    """Adversarial examples by `steps` steps of projected gradient ascent on the cross-entropy.

    The model stays in its current mode, BatchNorm running statistics are left untouched and no
    parameter's .grad is written (gradients are taken w.r.t. the input only). `alpha` None means
    `default_alpha(norm, eps)`; `l2_start` picks the l_2 random start ('ball' or 'radial', see
    `start_perturbation`). Inputs are images in [0, 1]; so are the outputs.
    """
    step_size = default_alpha(norm, eps) if alpha is None else alpha
    images = images.detach()
    adv = images
    if random_start:
        adv = (images + start_perturbation(images, eps, norm, l2_start, generator)).clamp(0, 1)
    with frozen_bn_stats(model):
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            # Summed, so each example's gradient does not shrink with the batch size.
            loss, _ = classification_loss(model, adv, labels, amp=amp, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = pgd_step(adv.detach(), grad, images, eps=eps, alpha=step_size, norm=norm)
    return adv.detach()


class AdversarialTraining(Method):
    """Train on adversarial examples of each batch with the standard cross-entropy.

    PGD-k AT costs k + 1 passes per step; FGSM-AT is the same with one step (2 passes).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        norm: Norm,
        eps: float,
        alpha: float,
        steps: int,
        random_start: bool,
        l2_start: str = "ball",
        amp: str | bool = "off",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(optimizer, amp=amp)
        self.norm = norm
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.l2_start = l2_start
        self.generator = generator
        self.passes_per_step = steps + 1

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Attack the batch, then one optimizer step on the adversarial batch."""
        adv = pgd(
            model,
            images,
            labels,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            generator=self.generator,
            amp=self.amp,
            l2_start=self.l2_start,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.forward(model, adv, labels)
        self.backward(loss)
        self.optimizer_step()
        return StepResult(loss.detach(), logits.detach())
