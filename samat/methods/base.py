"""What every training method shares: the step result, the base class and the autocast forward."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# train.amp's modes and their autocast dtypes ("off": float32, no autocast).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Segmentation masks' ignored pixels (Stanford Background's unknown, VOC's void, padding).
IGNORE_INDEX = 255


def amp_mode(amp: str | bool) -> str:
    """'off', 'bf16' or 'fp16'; True means bf16 and False off (the config's old spelling)."""
    if isinstance(amp, bool):
        return "bf16" if amp else "off"
    if amp != "off" and amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}; use off, bf16 or fp16")
    return amp


@dataclass
class StepResult:
    """Detached scalar loss and logits of the batch a step trained on (adversarial for AT)."""

    loss: torch.Tensor
    logits: torch.Tensor


def autocast_forward(model: nn.Module, images: torch.Tensor, *, amp: str | bool) -> torch.Tensor:
    """The model's output, under bf16 or fp16 autocast as `amp` says (see amp_mode)."""
    mode = amp_mode(amp)
    # With amp off no context is entered, so an autocast region the caller opened still applies.
    autocast = (
        torch.autocast(device_type=images.device.type, dtype=AMP_DTYPES[mode])
        if mode != "off"
        else contextlib.nullcontext()
    )
    with autocast:
        return model(images)


def classification_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    amp: str | bool = "off",
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and logits of one forward pass, under autocast as `amp` says."""
    logits = autocast_forward(model, images, amp=amp)
    return cross_entropy(logits, labels, reduction=reduction), logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"):
    """Cross-entropy of logits [N, C] against labels [N], or per pixel of logits [N, C, H, W]
    against masks [N, H, W] with IGNORE_INDEX pixels excluded: "mean" over the batch's counted
    pixels (0 when none is), "sum" over them, "none" each example's mean over its own, [N].
    Under autocast the loss is taken in float32: a bf16 log-softmax loses small differences."""
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if logits.dim() <= 2:
        return F.cross_entropy(wide, targets, reduction=reduction)
    pixels = F.cross_entropy(wide, targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    if reduction == "sum":
        return pixels.sum()
    if reduction == "mean":
        return pixels.sum() / valid.sum().clamp_min(1)
    if reduction == "none":
        return pixels.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class Method(ABC):
    """A training method: `step` runs one whole optimisation step (zero_grad, passes, update).

    `passes_per_step` is the number of forward+backward passes a step costs, which is what the
    papers compare methods by (ST 1, SAM 2, PGD-k AT k + 1).

    amp 'fp16' brings a GradScaler: every backward goes through `backward` (the loss scaled),
    every update through `optimizer_step` (unscaled; skipped, with the scale lowered, when a
    gradient is inf or NaN). SAM's perturbation rho g / ||g|| does not depend on the scale.
    """

    passes_per_step: int

    def __init__(self, optimizer: torch.optim.Optimizer, *, amp: str | bool = "off") -> None:
        self.optimizer = optimizer
        self.amp = amp_mode(amp)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = params[0].device.type if params else "cpu"
        self.scaler = torch.amp.GradScaler(device, enabled=self.amp == "fp16")

    @abstractmethod
    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Train `model` on one batch and return the loss and logits of that batch."""

    def forward(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and logits, with this method's autocast setting."""
        return classification_loss(model, images, labels, amp=self.amp)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: scaled by the GradScaler under fp16, else itself."""
        return self.scaler.scale(loss) if self.scaler.is_enabled() else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def optimizer_step(self) -> None:
        """The optimizer's step on the gradients `backward` left (through the scaler under fp16)."""
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State kept between steps, as tensors for the checkpoint: the fp16 loss scale."""
        if not self.scaler.is_enabled():
            return {}
        state = self.scaler.state_dict()
        return {
            "amp.scale": torch.tensor(state["scale"], dtype=torch.float64),
            "amp.growth_tracker": torch.tensor(state["_growth_tracker"], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (nothing to do without fp16)."""
        if self.scaler.is_enabled() and "amp.scale" in state:
            self.scaler.load_state_dict(
                {
                    **self.scaler.state_dict(),
                    "scale": float(state["amp.scale"]),
                    "_growth_tracker": int(state["amp.growth_tracker"]),
                }
            )
