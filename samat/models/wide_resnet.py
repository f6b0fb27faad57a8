"""WideResNet-28-10 (Zagoruyko & Komodakis 2016) as used in adversarial training (Rice et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samat.models.preact_resnet import PreActBlock
from samat.models.registry import register


class WideResNet(nn.Module):
    """3x3 stem of 16 channels, three stages of 16k, 32k, 64k channels, BN-ReLU, pooling, linear."""

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, widen_factor: int = 10
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage in range(3):
            planes = 16 * widen_factor * 2**stage
            for i in range(per_stage):
                layers.append(PreActBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        # The reference implementation's initialisation: He-normal (fan out) convs, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = self.pool(F.relu(self.bn(out))).flatten(1)
        return self.linear(out)


@register("wide_resnet28_10")
def wide_resnet28_10(
    num_classes: int, *, in_channels: int = 3, image_size: int = 32, width: int | None = None
) -> WideResNet:
    """WideResNet-28; `width` is the widen factor (default 10)."""
    return WideResNet(28, num_classes, in_channels, width or 10)
