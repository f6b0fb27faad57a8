"""Tests for samat.models.deit: timm's DeiT-Tiny/Small, randomly initialised, 32x32 and 64x64."""

from __future__ import annotations

import socket

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from samat import models
from samat.config import ConfigError
from samat.models.deit import patch_size


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model must never reach the network (no pretrained weights, no hub)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _create(name: str, num_classes: int, size: int, channels: int = 3, **kwargs) -> nn.Module:
    return models.create(
        name,
        num_classes,
        in_channels=channels,
        image_size=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        **kwargs,
    )


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered() -> None:
    assert {"deit_tiny", "deit_small"} <= set(models.names())
    assert timm.__version__.split(".")[0] == "1"


def test_builds_timm_vit_behind_normalize() -> None:
    model = _create("deit_tiny", 10, 32)
    assert isinstance(model, nn.Sequential) and len(model) == 2
    assert isinstance(model[0], models.Normalize)
    assert model[0].mean.flatten().tolist() == [0.5] * 3
    assert model[0].std.flatten().tolist() == [0.25] * 3
    net = model[1]
    assert isinstance(net, VisionTransformer)
    assert net.patch_embed.proj.kernel_size == (4, 4)
    assert net.patch_embed.proj.in_channels == 3
    assert net.embed_dim == 192 and len(net.blocks) == 12
    assert net.blocks[0].attn.num_heads == 3
    assert net.num_classes == 10 and net.head.out_features == 10
    # 8x8 = 64 patch tokens plus the class token, no distillation token.
    assert net.pos_embed.shape == (1, 65, 192)


def test_normalization_happens_inside_the_model() -> None:
    torch.manual_seed(0)
    model = _create("deit_tiny", 10, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model[1]((x - 0.5) / 0.25))


@pytest.mark.parametrize(
    ("name", "size", "classes", "patch", "width", "heads", "params"),
    [
        ("deit_tiny", 32, 10, 4, 192, 3, 5_362_762),
        ("deit_tiny", 64, 200, 8, 192, 3, 5_427_080),
        ("deit_small", 32, 100, 4, 384, 6, 21_376_996),
        ("deit_small", 64, 200, 8, 384, 6, 21_470_792),
    ],
)
def test_shapes_and_parameter_counts(
    name: str, size: int, classes: int, patch: int, width: int, heads: int, params: int
) -> None:
    net = _create(name, classes, size)[1]
    assert net.patch_embed.proj.kernel_size == (patch, patch)
    assert net.embed_dim == width and net.blocks[0].attn.num_heads == heads
    assert net.pos_embed.shape == (1, (size // patch) ** 2 + 1, width)
    assert net.head.out_features == classes
    assert _count(net) == params


@pytest.mark.parametrize(
    ("name", "size", "classes"),
    [("deit_tiny", 32, 10), ("deit_tiny", 64, 200), ("deit_small", 32, 100)],
)
def test_forward_backward(name: str, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = _create(name, classes, size)
    net = model[1]
    x = torch.rand(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, classes - 1])).backward()
    # Every parameter takes part: patch embedding, tokens, all 12 blocks, head.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert net.patch_embed.proj.weight.grad.abs().sum() > 0
    assert net.cls_token.grad.abs().sum() > 0
    assert net.pos_embed.grad.abs().sum() > 0


def _by_hand(width: int, channels: int, patch: int, tokens: int, classes: int) -> int:
    """DeiT's parameters: patch embedding, class token, positions, 12 blocks (2 LayerNorms, qkv,
    projection, 2 MLP layers of ratio 4), final norm, head."""
    d, mlp = width, 4 * width
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    embed = channels * patch * patch * d + d
    return embed + d + tokens * d + 12 * block + 2 * d + (d * classes + classes)


def test_parameter_counts_match_the_architecture() -> None:
    assert _by_hand(192, 3, 4, 65, 10) == 5_362_762
    assert _by_hand(192, 3, 8, 65, 200) == 5_427_080
    assert _by_hand(384, 3, 4, 65, 100) == 21_376_996
    assert _by_hand(384, 3, 8, 65, 200) == 21_470_792


def test_random_init_is_seeded_and_not_pretrained() -> None:
    torch.manual_seed(1)
    a = _create("deit_tiny", 10, 32)
    torch.manual_seed(1)
    b = _create("deit_tiny", 10, 32)
    torch.manual_seed(2)
    c = _create("deit_tiny", 10, 32)
    wa, wb, wc = (m[1].blocks[0].attn.qkv.weight.detach() for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    # timm's ViT init: truncated normal, std 0.02, on the linear layers.
    assert abs(float(wa.std()) - 0.02) < 0.002
    assert abs(float(a[1].head.weight.detach().std()) - 0.02) < 0.003
    assert torch.count_nonzero(a[1].head.bias) == 0


def test_grayscale_and_width() -> None:
    model = _create("deit_tiny", 10, 8, channels=1, width=128)
    net = model[1]
    assert net.patch_embed.proj.in_channels == 1
    assert net.patch_embed.proj.kernel_size == (1, 1)
    assert net.embed_dim == 128 and net.blocks[0].attn.num_heads == 2
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert _count(net) == _by_hand(128, 1, 1, 65, 10) == 2_389_514


def test_bad_width_and_image_size_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.width 100 for deit_small .* multiple of 64"):
        _create("deit_small", 10, 32, width=100)
    with pytest.raises(ConfigError, match="multiple of 8, got 28; use a 32x32 or 64x64"):
        _create("deit_tiny", 10, 28)
    assert [patch_size(s) for s in (8, 32, 64)] == [1, 4, 8]
