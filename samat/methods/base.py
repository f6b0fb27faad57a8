"""What every training method shares: the step result, the base class and the autocast forward."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepResult:
    """Detached scalar loss and logits of the batch a step trained on (adversarial for AT)."""

    loss: torch.Tensor
    logits: torch.Tensor


def autocast_forward(model: nn.Module, images: torch.Tensor, *, amp: bool) -> torch.Tensor:
    """The model's output, under bf16 autocast when `amp` is on."""
    # With amp off no context is entered, so an autocast region the caller opened still applies.
    autocast = (
        torch.autocast(device_type=images.device.type, dtype=torch.bfloat16)
        if amp
        else contextlib.nullcontext()
    )
    with autocast:
        return model(images)


def classification_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    amp: bool = False,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and logits of one forward pass, under bf16 autocast when `amp` is on."""
    logits = autocast_forward(model, images, amp=amp)
    # Under autocast the loss is taken in float32: a bf16 log-softmax loses small differences.
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(wide, labels, reduction=reduction), logits


class Method(ABC):
    """A training method: `step` runs one whole optimisation step (zero_grad, passes, update).

    `passes_per_step` is the number of forward+backward passes a step costs, which is what the
    papers compare methods by (ST 1, SAM 2, PGD-k AT k + 1).
    """

    passes_per_step: int

    def __init__(self, optimizer: torch.optim.Optimizer, *, amp: bool = False) -> None:
        self.optimizer = optimizer
        self.amp = amp

    @abstractmethod
    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Train `model` on one batch and return the loss and logits of that batch."""

    def forward(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and logits, with this method's autocast setting."""
        return classification_loss(model, images, labels, amp=self.amp)
