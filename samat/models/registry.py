"""Model names to constructors (timm's pattern): a YAML `model.name` maps to one function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from samat.config import ConfigError
from samat.models.normalize import Normalize

Constructor = TypeVar("Constructor", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Constructor], Constructor]:
    """Register a constructor `fn(num_classes, *, in_channels, image_size, width)` under `name`."""

    def add(fn: Constructor) -> Constructor:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return add


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create(
    name: str,
    num_classes: int,
    *,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int | None = None,
) -> nn.Module:
    """Build `Sequential(Normalize(mean, std), net)`: inputs in [0, 1], budgets in pixel space."""
    if name not in _MODELS:
        raise ConfigError(f"model.name {name!r} is unknown; use one of: {', '.join(names())}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {in_channels} channels")
    net = _MODELS[name](num_classes, in_channels=in_channels, image_size=image_size, width=width)
    return nn.Sequential(Normalize(mean, std), net)
