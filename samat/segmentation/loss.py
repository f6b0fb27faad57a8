"""Per-pixel cross-entropy with an ignore label, in the shape of samat's classification_loss."""

from __future__ import annotations

import torch
from torch import nn

# Stanford Background's unknown (-1) and VOC's void boundaries are stored as IGNORE_INDEX.
from samat.methods.base import IGNORE_INDEX, autocast_forward, cross_entropy

__all__ = ["IGNORE_INDEX", "pixel_cross_entropy", "segmentation_loss"]


def pixel_cross_entropy(
    logits: torch.Tensor, masks: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits [N, C, H, W] against int64 masks [N, H, W], 255 excluded.

    "mean": over the batch's non-ignored pixels (0, not NaN, when all are ignored);
    "sum": summed over them; "none": each example's mean over its own non-ignored pixels, [N].
    The training methods' loss (samat.methods.base.cross_entropy) is this one.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [N, C, H, W], got {list(logits.shape)}")
    return cross_entropy(logits, masks, reduction=reduction)


def segmentation_loss(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    amp: str | bool = "off",
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits of one forward pass: samat.methods.base.classification_loss for masks."""
    logits = autocast_forward(model, images, amp=amp)
    return pixel_cross_entropy(logits, masks, reduction=reduction), logits
