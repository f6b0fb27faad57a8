"""Sharpness-aware minimisation (Foret et al. 2020) and adaptive SAM, ASAM (Kwon et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from samat.methods.base import Method, StepResult
from samat.methods.batchnorm import frozen_bn_stats


@torch.no_grad()
def sam_perturbation(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
    scaled: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """The weight perturbation e of one SAM (or ASAM) step, one tensor per parameter.

    SAM: e = rho * g / ||g||_2, the norm taken over all parameters jointly.
    ASAM: with T_w = |w| + eta element-wise, e = rho * T_w^2 g / ||T_w g||_2. T_w applies to the
    parameters that `scaled` marks (None: every one, biases and normalisation weights included:
    davda54/sam's and the authors' `adaptive=True` at eta = 0); T = 1 on the others (Kwon et
    al.'s released code leaves parameters not named 'weight' unscaled). A zero norm gives e = 0.
    """
    if not params:
        return []
    marks = [True] * len(params) if scaled is None else list(scaled)
    scales = (
        [p.abs() + eta if mark else None for p, mark in zip(params, marks, strict=True)]
        if adaptive
        else [None] * len(params)
    )
    weighted = [g if t is None else t * g for t, g in zip(scales, grads, strict=True)]
    device = weighted[0].device
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(s).to(device) for s in weighted])
    )
    # torch.where instead of an `if` on the norm: no host-device sync on every step.
    factor = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    shifts = [factor.to(s.device) * s for s in weighted]
    return [e if t is None else t * e for t, e in zip(scales, shifts, strict=True)]


class SAM:
    """Optimizer wrapper: `first_step` moves w to w + e, `second_step` restores w and steps.

    The wrapped `base_optimizer` holds all optimizer state (param_groups, momentum buffers), so it
    is what gets checkpointed and what learning-rate schedulers drive; SAM itself keeps none
    between steps.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float,
        *,
        adaptive: bool = False,
        eta: float = 0.01,
    ) -> None:
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        # ASAM: the parameters T_w leaves unscaled (by identity); empty = T_w on all
        self.unscaled: set[int] = set()
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's parameter groups."""
        return self.base_optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the base optimizer's state."""
        self.base_optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the base optimizer's parameters."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def first_step(self) -> list[torch.Tensor]:
        """Store w and move to w + e using the current gradients; returns e."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice; call second_step in between")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        marks = [id(p) not in self.unscaled for p in params] if self.unscaled else None
        perturbation = sam_perturbation(
            params, [p.grad for p in params], self.rho, self.adaptive, self.eta, marks
        )
        # Restoring a saved copy, rather than subtracting e, returns exactly to w.
        self._saved = [(p, p.detach().clone()) for p in params]
        for p, e in zip(params, perturbation, strict=True):
            p.add_(e)
        return perturbation

    @torch.no_grad()
    def restore(self) -> None:
        """Move back to the w that first_step stored."""
        if not self._saved:
            raise RuntimeError("SAM.second_step called without first_step")
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []

    def second_step(self) -> None:
        """Restore w and take the base optimizer's step with the gradient computed at w + e."""
        self.restore()
        self.base_optimizer.step()


class SharpnessAwareTraining(Method):
    """SAM or ASAM around the given base optimizer: a clean pass, then one at w + e."""

    passes_per_step = 2

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rho: float,
        *,
        adaptive: bool = False,
        eta: float = 0.01,
        scaled: str = "all",
        amp: str | bool = "off",
    ) -> None:
        super().__init__(optimizer, amp=amp)
        self.sam = SAM(optimizer, rho, adaptive=adaptive, eta=eta)
        # 'weights': T_w only on parameters whose name holds 'weight' (named at the first step)
        self.scaled_params = scaled

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Clean pass (updates BN stats), perturb, second pass (BN frozen), restore and step."""
        if self.scaled_params == "weights" and not self.sam.unscaled:
            self.sam.unscaled = {id(p) for n, p in model.named_parameters() if "weight" not in n}
        self.sam.zero_grad()
        loss, logits = self.forward(model, images, labels)
        # fp16: e is the same for scaled gradients; an overflow makes w + e (and so the second
        # gradients) non-finite, and the scaler skips the step after w is restored
        self.backward(loss)
        self.sam.first_step()
        self.sam.zero_grad()
        with frozen_bn_stats(model):
            perturbed_loss, _ = self.forward(model, images, labels)
        self.backward(perturbed_loss)
        self.sam.restore()
        self.optimizer_step()
        return StepResult(loss.detach(), logits.detach())
