"""StAdv: the warp, the flow smoothness, the bound's units, and the attack on a small digits CNN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat import models
from samat.attacks.stadv import (
    StAdv,
    _Best,
    bound_in_pixels,
    flow_bound_ok,
    margin,
    smoothness_loss,
    warp,
)
from samat.config import DataConfig
from samat.data import load_dataset

N_TEST = 64


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """small_cnn after 2 epochs of SGD on digits (~3 s), in eval mode, and 64 test images."""
    data = load_dataset(DataConfig(name="digits"))
    images, labels = data.train.images.float() / 255, data.train.labels
    torch.manual_seed(0)
    model = models.create(
        "small_cnn", 10, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,), width=16
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        for batch in torch.randperm(len(labels), generator=order).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    test_images = data.test.images[:N_TEST].float() / 255
    return model.eval(), test_images, data.test.labels[:N_TEST]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def ramp(n: int = 2) -> torch.Tensor:
    """[n, 1, 2, 3] images whose pixel values are 0..5, row by row."""
    return torch.arange(6.0).view(1, 1, 2, 3).repeat(n, 1, 1, 1)


def constant_flow(n: int, height: int, width: int, x: float, y: float) -> torch.Tensor:
    flow = torch.zeros(n, 2, height, width)
    flow[:, 0], flow[:, 1] = x, y
    return flow


def test_zero_flow_returns_the_images():
    images = torch.rand(3, 3, 7, 5, generator=torch.Generator().manual_seed(0))
    out = warp(images, torch.zeros(3, 2, 7, 5))
    assert (out - images).abs().max().item() < 1e-6


def test_warp_reads_each_pixel_at_its_flow_hand_checked():
    images = ramp()  # rows [0, 1, 2] and [3, 4, 5]
    right = warp(images, constant_flow(2, 2, 3, x=1.0, y=0.0))
    # Pixel (i, j) reads column j + 1; the last column repeats the border.
    assert torch.allclose(right[0, 0], torch.tensor([[1.0, 2, 2], [4, 5, 5]]), atol=1e-6)
    down = warp(images, constant_flow(2, 2, 3, x=0.0, y=1.0))
    assert torch.allclose(down[0, 0], torch.tensor([[3.0, 4, 5], [3, 4, 5]]), atol=1e-6)
    half = warp(images, constant_flow(2, 2, 3, x=0.5, y=0.0))
    assert torch.allclose(half[0, 0], torch.tensor([[0.5, 1.5, 2], [3.5, 4.5, 5]]), atol=1e-6)
    # Each pixel has its own flow: only pixel (0, 0) moves, one row down.
    local = torch.zeros(2, 2, 2, 3)
    local[:, 1, 0, 0] = 1.0
    assert torch.allclose(warp(images, local)[1, 0], torch.tensor([[3.0, 1, 2], [3, 4, 5]]))


def test_warp_rejects_a_flow_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"flow must have shape \[2, 2, 2, 3\]"):
        warp(ramp(), torch.zeros(2, 2, 3, 2))


def test_smoothness_of_a_constant_flow_is_zero():
    assert smoothness_loss(constant_flow(3, 5, 4, x=0.7, y=-1.3)).abs().max().item() == 0.0
    assert smoothness_loss(torch.zeros(2, 2, 8, 8)).abs().max().item() == 0.0


def test_smoothness_of_a_step_hand_checked():
    # Two pixels side by side, flows (0, 0) and (3, 4): each sees the other at distance 5 once;
    # the replicated border adds nothing.
    flow = torch.zeros(1, 2, 1, 2)
    flow[0, :, 0, 1] = torch.tensor([3.0, 4.0])
    assert smoothness_loss(flow).item() == pytest.approx(10.0, abs=1e-3)
    # A 2 x 2 flow with one displaced pixel: 2 neighbours see it, and it sees 2 of them.
    flow = torch.zeros(2, 2, 2, 2)
    flow[1, 0, 1, 1] = 1.0
    assert smoothness_loss(flow).tolist() == pytest.approx([0.0, 4.0], abs=1e-3)
    # Finite gradient where neighbours agree (the eps), and none at all for a constant flow.
    flow = constant_flow(1, 3, 3, x=0.5, y=0.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(smoothness_loss(flow).sum(), flow)
    assert grad.abs().max().item() == 0.0


def test_bound_is_in_normalized_grid_units():
    assert bound_in_pixels(0.05, 32) == pytest.approx(0.8)
    assert bound_in_pixels(0.05, 8) == pytest.approx(0.2)
    # 8 wide, 4 high: the same bound allows 0.2 px along x but 0.1 px along y.
    assert flow_bound_ok(constant_flow(1, 4, 8, x=0.2, y=-0.1), 0.05)
    assert not flow_bound_ok(constant_flow(1, 4, 8, x=0.21, y=0.0), 0.05)
    assert not flow_bound_ok(constant_flow(1, 4, 8, x=0.0, y=-0.11), 0.05)


def test_margin_is_true_logit_minus_best_other():
    logits = torch.tensor([[2.0, 5.0, 1.0], [2.0, 5.0, 1.0]])
    assert margin(logits, torch.tensor([1, 2])).tolist() == [3.0, -4.0]


def test_best_prefers_fooled_then_lower_objective():
    best = _Best(torch.zeros(1, 1, 2, 2))
    steps = [(1.0, 0.5, 1.0), (2.0, -0.1, 5.0), (3.0, -2.0, 3.0), (4.0, 1.0, -9.0)]
    for flow, fooling, value in steps:
        best.update(torch.full((1, 2, 2, 2), flow), torch.tensor([fooling]), torch.tensor([value]))
    # Flow 3: fooled, with a lower objective than flow 2; flow 4 is lower still but not fooled.
    assert best.flow.unique().tolist() == [3.0]
    assert best.fooled.tolist() == [True]


def test_default_bounded_attack_on_digits(digits):
    model, images, labels = digits
    attack = StAdv(model)
    assert (attack.bound, attack.steps, attack.lr, attack.mode) == (0.05, 100, 0.01, "bounded")
    assert attack.smoothness == pytest.approx(0.0025 / 0.05)
    adv = attack(images, labels)
    clean, robust = accuracy(model, images, labels), accuracy(model, adv, labels)
    # Measured: clean 93.8 %, StAdv 18.8 % (0.2 px flows on 8 x 8 digits already break it).
    assert clean >= 0.9
    assert robust <= clean - 0.4
    assert robust == pytest.approx(accuracy(model, warp(images, attack.last_flow), labels))
    assert flow_bound_ok(attack.last_flow, 0.05)
    assert attack.last_flow.abs().max().item() > 0.1  # the attack does use its budget
    assert adv.shape == images.shape and adv.min() >= 0.0 and adv.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_bounded_flow_is_clamped_to_the_bound(digits):
    model, images, labels = digits
    attack = StAdv(model, bound=0.05, steps=5, lr=0.1, smoothness=0.0)
    attack(images[:16], labels[:16])
    # Steps of 0.1 overshoot a bound of 0.05 (0.2 px on 8 x 8): the clamp must hold them there.
    assert flow_bound_ok(attack.last_flow, 0.05)
    assert attack.last_flow.abs().max().item() == pytest.approx(0.2)


def test_smoothness_weight_smooths_the_flow(digits):
    model, images, labels = digits
    rough, smooth = (StAdv(model, steps=10, smoothness=s) for s in (0.0, 1.0))
    rough(images[:16], labels[:16])
    smooth(images[:16], labels[:16])
    assert smoothness_loss(smooth.last_flow).sum() < 0.5 * smoothness_loss(rough.last_flow).sum()


def test_lagrangian_attack_on_digits(digits):
    model, images, labels = digits
    attack = StAdv(model, mode="lagrangian", steps=20)
    adv = attack(images, labels)
    # Measured: clean 93.8 %, StAdv (lagrangian, 20 L-BFGS iterations) 1.6 %; no bound applies.
    assert accuracy(model, adv, labels) <= accuracy(model, images, labels) - 0.4
    assert attack.last_flow.abs().max().item() > 0.2
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())


def test_same_seed_same_result_and_seed_feeds_the_lagrangian_start(digits):
    model, images, labels = digits
    images, labels = images[:16], labels[:16]
    runs = [StAdv(model, mode="lagrangian", steps=3, seed=s) for s in (0, 0, 1)]
    outputs = [attack(images, labels) for attack in runs]
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(runs[0].last_flow, runs[1].last_flow)
    assert not torch.equal(runs[0].last_flow, runs[2].last_flow)
    bounded = [StAdv(model, steps=3) for _ in range(2)]
    assert torch.equal(bounded[0](images, labels), bounded[1](images, labels))


def test_model_mode_and_parameters_are_left_as_found(digits):
    model, images, labels = digits
    training = copy.deepcopy(model).train()
    before = [p.detach().clone() for p in training.parameters()]
    StAdv(training, steps=2)(images[:8], labels[:8])
    assert training.training
    assert all(p.grad is None for p in training.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, training.parameters(), strict=True))


def test_rejects_bad_settings_and_shapes(digits):
    model, images, labels = digits
    with pytest.raises(ValueError, match="mode must be one of bounded, lagrangian"):
        StAdv(model, mode="free")
    with pytest.raises(ValueError, match="bound > 0"):
        StAdv(model, bound=0.0)
    with pytest.raises(ValueError, match=r"labels \[N\]"):
        StAdv(model)(images, labels[:3])
