"""A small CNN for quick runs on digits and synthetic data (seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn

from samat.models.registry import register


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (width, 2 width, 4 width channels), global pooling, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width),
            _block(width, 2 * width),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("small_cnn")
def small_cnn(
    num_classes: int, *, in_channels: int = 3, image_size: int = 8, width: int | None = None
) -> SmallCNN:
    """SmallCNN; `width` is the first layer's channels (default 32)."""
    return SmallCNN(num_classes, in_channels, width or 32)
