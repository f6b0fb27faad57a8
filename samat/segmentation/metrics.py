"""Confusion-matrix metrics over a whole split: mean IoU and pixel accuracy."""

from __future__ import annotations

import torch

from samat.segmentation.loss import IGNORE_INDEX


def confusion_matrix(
    predictions: torch.Tensor, masks: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """int64 [C, C] counts, rows = true class, columns = predicted; ignored pixels left out.

    Stays on the inputs' device, so a split's confusion accumulates without host round-trips.
    """
    valid = masks != IGNORE_INDEX
    target = masks[valid].long()
    if target.numel() and int(target.max()) >= num_classes:
        raise ValueError(f"mask class {int(target.max())} is not below num_classes {num_classes}")
    index = target * num_classes + predictions[valid].long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU per class, float64 [C]; NaN for a class absent from both the targets and predictions."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(hits, float("nan")))


def miou(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes present in the targets or the predictions (NaN if none are).

    A class that never occurs and is never predicted has no IoU (0 / 0) and does not count;
    one predicted but absent from the targets counts with IoU 0.
    """
    iou = class_iou(confusion)
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of the non-ignored pixels classified correctly (NaN if there are none)."""
    total = int(confusion.sum())
    return int(confusion.trace()) / total if total else float("nan")
