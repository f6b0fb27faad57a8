"""Per-pixel cross-entropy with an ignore label, in the shape of samat's classification_loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samat.methods.base import autocast_forward

# Stanford Background's unknown (-1) and VOC's void boundaries are stored as this label.
IGNORE_INDEX = 255


def pixel_cross_entropy(
    logits: torch.Tensor, masks: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits [N, C, H, W] against int64 masks [N, H, W], 255 excluded.

    "mean": over the batch's non-ignored pixels (0, not NaN, when all are ignored);
    "sum": summed over them; "none": each example's mean over its own non-ignored pixels, [N].
    """
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    pixels = F.cross_entropy(wide, masks, ignore_index=IGNORE_INDEX, reduction="none")
    valid = masks != IGNORE_INDEX
    if reduction == "sum":
        return pixels.sum()
    if reduction == "mean":
        return pixels.sum() / valid.sum().clamp_min(1)
    if reduction == "none":
        return pixels.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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
