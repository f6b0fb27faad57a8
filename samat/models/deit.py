"""DeiT-Tiny and DeiT-Small (Touvron et al. 2021) through timm, sized for 32x32 and 64x64 images.

The networks are timm's own DeiT constructors, always randomly initialised (`pretrained=False`: no
hub access), with the patch size scaled to the image so that every input is an 8x8 grid of 64
tokens plus the class token: 4x4 patches on CIFAR's 32x32 images, 8x8 on Tiny-ImageNet's 64x64.

`width`, when given, is the embedding dimension; the heads keep DeiT's 64 channels each, so
`width` must be a positive multiple of 64 (DeiT-Tiny is width 192 with 3 heads, DeiT-Small 384
with 6). Depth stays 12 and the MLP ratio 4.
"""

from __future__ import annotations

from torch import nn

from samat.config import ConfigError
from samat.models.registry import register

HEAD_DIM = 64
GRID = 8  # patches per side: patch size = image_size // GRID


def patch_size(image_size: int) -> int:
    """The patch size that cuts an `image_size` square into an 8x8 grid (4 at 32, 8 at 64)."""
    if image_size < GRID or image_size % GRID:
        raise ConfigError(
            f"DeiT needs an image size that is a multiple of {GRID}, got {image_size}; "
            "use a 32x32 or 64x64 data set"
        )
    return image_size // GRID


def _heads(name: str, width: int | None, default: int) -> tuple[int, int]:
    embed_dim = default if width is None else width
    if embed_dim <= 0 or embed_dim % HEAD_DIM:
        raise ConfigError(
            f"model.width {width} for {name} is its embedding dimension and must be a positive "
            f"multiple of {HEAD_DIM} (heads of {HEAD_DIM} channels); use e.g. {default}"
        )
    return embed_dim, embed_dim // HEAD_DIM


def _build(
    variant: str,
    name: str,
    default_width: int,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int | None,
) -> nn.Module:
    try:
        from timm.models import deit
    except ImportError:  # pragma: no cover - timm is a dependency
        raise ConfigError(f"model {name} needs timm; pip install 'timm>=1.0'") from None
    embed_dim, num_heads = _heads(name, width, default_width)
    constructor = getattr(deit, variant)
    return constructor(
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size(image_size),
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        num_heads=num_heads,
    )


@register("deit_tiny")
def deit_tiny(
    num_classes: int, *, in_channels: int = 3, image_size: int = 32, width: int | None = None
) -> nn.Module:
    """DeiT-Tiny (12 blocks, width 192, 3 heads), patch size image_size // 8."""
    return _build(
        "deit_tiny_patch16_224", "deit_tiny", 192, num_classes, in_channels, image_size, width
    )


@register("deit_small")
def deit_small(
    num_classes: int, *, in_channels: int = 3, image_size: int = 32, width: int | None = None
) -> nn.Module:
    """DeiT-Small (12 blocks, width 384, 6 heads), patch size image_size // 8."""
    return _build(
        "deit_small_patch16_224", "deit_small", 384, num_classes, in_channels, image_size, width
    )
