"""Tests for samat.models: the registry, Normalize as first layer, and each architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat import models
from samat.config import ConfigError, DataConfig
from samat.data import DeviceLoader, load_dataset
from samat.models import Normalize


def _create(name: str, num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    mean, std = [0.5] * channels, [0.25] * channels
    return models.create(
        name, num_classes, in_channels=channels, image_size=size, mean=mean, std=std, **kwargs
    )


def test_registry_names_equal_the_torch_free_list() -> None:
    assert models.names() == list(models.NAMES)
    assert models.names() == [
        "deit_small",
        "deit_tiny",
        "preact_resnet18",
        "small_cnn",
        "wide_resnet28_10",
    ]


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ConfigError, match=r"model\.name 'resnet9' is unknown") as error:
        _create("resnet9", 10, 3, 32)
    assert all(name in str(error.value) for name in models.names())


def test_register_refuses_a_second_model_of_the_same_name() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        models.register("small_cnn")(lambda num_classes, **_: nn.Linear(1, num_classes))


# (name, channels, image size, classes, parameters): each model on its typical input; the counts
# pin the architectures (11.17M for PreActResNet-18 and 36.48M for WRN-28-10 are the usual ones).
TYPICAL = [
    ("small_cnn", 1, 8, 10, 94_186),
    ("preact_resnet18", 3, 32, 10, 11_172_170),
    ("preact_resnet18", 3, 64, 200, 11_269_640),
    ("wide_resnet28_10", 3, 32, 10, 36_479_194),
]


@pytest.mark.parametrize(("name", "channels", "size", "classes", "parameters"), TYPICAL)
def test_logits_shape_and_size(
    name: str, channels: int, size: int, classes: int, parameters: int
) -> None:
    model = _create(name, classes, channels, size).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, channels, size, size))
    assert logits.shape == (1, classes) and torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_normalize_is_the_first_layer_and_saved_with_the_model() -> None:
    model = models.create(
        "small_cnn", 10, in_channels=3, image_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0)
    )
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    assert first.mean.shape == (1, 3, 1, 1) and first.std.flatten().tolist() == [0.5, 0.25, 2.0]
    assert {"0.mean", "0.std"} <= set(model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), model[1](first(x)))


def test_normalize_numbers() -> None:
    normalize = Normalize((0.5, 0.0), (0.25, 2.0))
    x = torch.tensor([[[[1.0]], [[1.0]]]])
    assert normalize(x).flatten().tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="positive std"):
        Normalize((0.5,), (0.0,))


def test_gradients_reach_the_inputs() -> None:
    model = _create("preact_resnet18", 10, 3, 8, width=4)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_width_scales_channels() -> None:
    small = _create("small_cnn", 10, 1, 8, width=8)
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32]
    prn = _create("preact_resnet18", 10, 3, 32, width=16)
    assert prn[1].linear.in_features == 128
    wrn = _create("wide_resnet28_10", 10, 3, 32, width=1)  # WRN-28-1
    assert wrn[1].linear.in_features == 64
    assert sum(p.numel() for p in wrn.parameters()) == 369_498
    with torch.no_grad():
        assert wrn.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.slow
def test_small_cnn_learns_digits() -> None:
    torch.manual_seed(0)
    data = load_dataset(DataConfig(name="digits"))
    model = models.create(
        "small_cnn", 10, in_channels=1, image_size=8, mean=data.mean, std=data.std, width=16
    )
    loader = DeviceLoader(data.train, 128, device="cpu", shuffle=True)
    epochs = 8
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.2, total_steps=epochs * len(loader), pct_start=0.25
    )
    for epoch in range(epochs):
        for images, labels in loader.epoch(epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(data.test.images.float() / 255).argmax(1)
    assert (predicted == data.test.labels).float().mean() >= 0.97
