"""PreActResNet-18 as in the adversarial-training literature (He et al. 2016; Wong et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samat.models.registry import register


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut (when it projects) starts from the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR-style 3x3 stem, four stages of pre-activation blocks, BN-ReLU, pooling, linear."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = width
        for stage, count in enumerate(blocks):
            planes = width * 2**stage
            for i in range(count):
                layers.append(PreActBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        # Adaptive pooling equals the usual 4x4 average pool at 32x32 and also serves 64x64 inputs.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = self.pool(F.relu(self.bn(out))).flatten(1)
        return self.linear(out)


@register("preact_resnet18")
def preact_resnet18(
    num_classes: int, *, in_channels: int = 3, image_size: int = 32, width: int | None = None
) -> PreActResNet:
    """PreActResNet-18; `width` is the first stage's channels (default 64)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width or 64)
