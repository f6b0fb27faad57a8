"""Segmentation networks through torchvision, as `Sequential(Normalize, net)` returning logits.

Every constructor is `fn(num_classes, *, mean, std, pretrained=None)`; the model maps images in
[0, 1] [N, 3, H, W] to logits [N, num_classes, H, W] (torchvision's 'out', upsampled to the input).

- deeplabv3_resnet50: torchvision's builder (dilated ResNet-50, output stride 8, ASPP rates
  12/24/36, no auxiliary head), random init unless `pretrained` names ResNet-50 ImageNet weights.
- deeplabv3_mobilenetv2: torchvision has no builder; assembled as in the common ports
  (VainF/DeepLabV3Plus-Pytorch): MobileNetV2's features without the last 1x1 conv (320 channels),
  output stride 16 (the stride-2 block at stride 16 becomes stride 1, later blocks dilation 2),
  torchvision's DeepLabHead with ASPP rates 6/12/18. `pretrained` = torchvision's mobilenet_v2
  ImageNet state dict (keys `features.*`; `features.18.*` and `classifier.*` are dropped).
- seg_tiny: a two-stage conv backbone (output stride 4) under a 32-channel DeepLab head, for
  tests and the tiny example; it trains in seconds on a CPU.

Weights load without unpickling code: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead, DeepLabV3

from samat.config import ConfigError
from samat.models.normalize import Normalize


class SegmentationLogits(nn.Module):
    """torchvision's segmentation model with only its 'out' logits [N, C, H, W] returned."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def deeplabv3_resnet50(
    num_classes: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: Path | str | None = None,
) -> nn.Module:
    """DeepLabv3 on a dilated ResNet-50 (torchvision's builder), from scratch by default."""
    net = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
    )
    if pretrained is not None:
        load_backbone(net.backbone, pretrained, prefix="", skip=("fc.",))
    return nn.Sequential(Normalize(mean, std), SegmentationLogits(net))


def mobilenetv2_features(output_stride: int = 16) -> nn.Sequential:
    """torchvision's MobileNetV2 features 0..17 (320 channels), dilated to `output_stride`."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    features = torchvision.models.mobilenet_v2(weights=None).features[:-1]
    stride, dilation = 2, 1  # after the stem conv
    for block in features[1:]:
        depthwise = next(
            m[0] for m in block.conv if isinstance(m, nn.Sequential) and m[0].groups > 1
        )
        used = dilation
        if block.stride == 2:
            if stride == output_stride:
                # VainF's rule: this block keeps the previous dilation, the ones after double it.
                block.stride = 1
                depthwise.stride = (1, 1)
                dilation *= 2
            else:
                stride *= 2
        depthwise.dilation = (used, used)
        depthwise.padding = (used, used)
    return features


def deeplabv3_mobilenetv2(
    num_classes: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: Path | str | None = None,
) -> nn.Module:
    """DeepLabv3 on MobileNetV2 at output stride 16, backbone weights from `pretrained`."""
    features = mobilenetv2_features(16)
    if pretrained is not None:
        load_backbone(
            features, pretrained, prefix="features.", skip=("features.18.", "classifier.")
        )
    backbone = IntermediateLayerGetter(features, return_layers={"17": "out"})
    net = DeepLabV3(backbone, DeepLabHead(320, num_classes, atrous_rates=(6, 12, 18)))
    return nn.Sequential(Normalize(mean, std), SegmentationLogits(net))


def _conv_bn_relu(inp: int, out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


def seg_tiny(
    num_classes: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: Path | str | None = None,
) -> nn.Module:
    """Two stride-2 conv stages (16, 32 channels) under DeepLabHead's layers at 32 channels."""
    if pretrained is not None:
        raise ConfigError("model seg_tiny has no pretrained weights; remove model.pretrained")
    backbone = nn.Sequential(
        OrderedDict(stem=_conv_bn_relu(3, 16, 2), stage=_conv_bn_relu(16, 32, 2))
    )
    head = nn.Sequential(
        ASPP(32, atrous_rates=(2, 4), out_channels=32),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, num_classes, 1),
    )
    net = DeepLabV3(IntermediateLayerGetter(backbone, return_layers={"stage": "out"}), head)
    return nn.Sequential(Normalize(mean, std), SegmentationLogits(net))


# The one place where a segmentation `model.name` maps to code.
SEG_MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "deeplabv3_mobilenetv2": deeplabv3_mobilenetv2,
    "seg_tiny": seg_tiny,
}


def create_model(
    name: str,
    num_classes: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: Path | str | None = None,
) -> nn.Module:
    """The segmentation model `name`: images in [0, 1] -> logits [N, num_classes, H, W]."""
    if name not in SEG_MODELS:
        raise ConfigError(f"model.name {name!r} is unknown; use one of: {', '.join(SEG_MODELS)}")
    return SEG_MODELS[name](num_classes, mean=mean, std=std, pretrained=pretrained)


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch.save'd state dict, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained {path}: no such file; stage the ImageNet weights there or remove "
            "model.pretrained"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"model.pretrained {path}: not a plain state dict ({reason}); save "
            "model.state_dict() with torch.save or safetensors"
        ) from None
    if isinstance(state, dict) and set(state) in ({"state_dict"}, {"model"}):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"model.pretrained {path}: not a state dict of tensors; save model.state_dict()"
        )
    return state


def load_backbone(
    module: nn.Module, path: Path | str, *, prefix: str, skip: tuple[str, ...]
) -> None:
    """Load `path`'s tensors named `prefix + key` into `module`; keys starting with `skip` dropped.

    Every tensor of `module` must be found with its shape, and nothing else may be left over,
    so that a wrong file fails here instead of training from a half-loaded backbone.
    """
    state = read_state_dict(path)
    kept = {
        k.removeprefix(prefix): v
        for k, v in state.items()
        if k.startswith(prefix) and not k.startswith(skip)
    }
    own = module.state_dict()
    missing = sorted(set(own) - set(kept))
    extra = sorted(set(kept) - set(own)) + sorted(
        k for k in state if not k.startswith(prefix) and not k.startswith(skip)
    )
    wrong = [k for k in own if k in kept and kept[k].shape != own[k].shape]
    if missing or extra or wrong:
        what = (
            f"lacks {prefix}{missing[0]} ({len(missing)} missing)"
            if missing
            else f"has unexpected {extra[0]}"
            if extra
            else f"{prefix}{wrong[0]} has shape {list(kept[wrong[0]].shape)}, "
            f"expected {list(own[wrong[0]].shape)}"
        )
        raise ConfigError(
            f"model.pretrained {path}: {what}; stage torchvision's ImageNet weights for this "
            "backbone"
        )
    module.load_state_dict(kept)
