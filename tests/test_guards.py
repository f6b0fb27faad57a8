"""Tests that fail when a line that matters is broken: each names the mutation it guards."""

from __future__ import annotations

import copy

import pytest
import torch
import torchattacks
from torch import nn

from samat.config import AdversarialMethod, AttackSpec, OptimizerConfig, validate_run
from samat.data import DeviceLoader, Split
from samat.grid import RunSpec, run_id
from samat.methods import create
from samat.store import CHECKPOINT, prepare, read_checkpoint
from samat.train import _set_determinism, execute, make_optimizer
from tests.conftest import TINY_BASE


def _trained_weights(tmp_path, **train_changes) -> dict[str, torch.Tensor]:
    data = copy.deepcopy(TINY_BASE)
    data["train"] = {**data["train"], "epochs": 1, **train_changes}
    data["eval"]["attacks"] = []
    config = validate_run(data)
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "SGD", tmp_path / rid))
    execute(run.path)
    tensors, meta = read_checkpoint(run.file(CHECKPOINT))
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    return {**weights, "lr": torch.tensor(meta["param_groups"][0]["lr"])}


def test_the_scheduled_lr_is_what_the_optimizer_uses(tmp_path):
    """Guards `group['lr'] = lr`: a warm-up epoch at half the lr trains exactly as lr / 2 does."""
    warm = _trained_weights(
        tmp_path / "w", optimizer={"name": "sgd", "lr": 0.1}, schedule={"warmup_epochs": 1}
    )
    half = _trained_weights(
        tmp_path / "h", optimizer={"name": "sgd", "lr": 0.05}, schedule={"name": "constant"}
    )
    full = _trained_weights(
        tmp_path / "f", optimizer={"name": "sgd", "lr": 0.1}, schedule={"name": "constant"}
    )
    assert warm["lr"].item() == pytest.approx(0.05)
    assert all(torch.equal(warm[k], half[k]) for k in warm if k != "lr")
    assert not all(torch.equal(warm[k], full[k]) for k in warm if k != "lr")


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_weight_decay_and_momentum_reach_the_optimizer(name):
    model = nn.Linear(3, 2)
    config = OptimizerConfig(name=name, lr=0.01, weight_decay=0.25, momentum=0.5, nesterov=True)
    group = make_optimizer(config, model).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.25)
    if name == "sgd":
        assert (group["momentum"], group["nesterov"]) == (0.5, True)
    # and it acts: with zero gradients, decay alone moves the weights
    optimizer = make_optimizer(config, model)
    before = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()
    assert not torch.equal(model.weight, before)


def test_crop_offsets_cover_0_to_2p_inclusive():
    split = Split(torch.zeros(64, 1, 4, 4, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64))
    loader = DeviceLoader(split, 64, device="cpu", shuffle=True, crop_padding=2, flip=True)
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat([loader._draws(64, gen)["offsets"].flatten() for _ in range(20)])
    assert set(seen.tolist()) == {0, 1, 2, 3, 4}


def test_a_crop_moves_the_image_by_its_offset():
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    loader = DeviceLoader(
        Split(images, torch.zeros(1, dtype=torch.int64)),
        1,
        device="cpu",
        shuffle=False,
        crop_padding=1,
    )
    for dy, dx in [(0, 0), (2, 2), (1, 0)]:
        draws = {"offsets": torch.tensor([[[dy]], [[dx]]])}
        out = loader._augment(images, draws)
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
        assert torch.equal(out, padded[:, :, dy : dy + 4, dx : dx + 4])


def _one_at_step(random_start: bool, norm: str = "linf") -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = AdversarialMethod(
        name="pgd_at", norm=norm, eps=0.3, steps=1, alpha=1e-6, random_start=random_start
    )
    method = create(cfg, optimizer, generator=torch.Generator().manual_seed(1))
    images = torch.full((8, 1, 4, 4), 0.5)
    method.step(model, images, torch.zeros(8, dtype=torch.int64))
    return model[1].weight.detach().clone()


def test_adversarial_training_uses_its_random_start():
    # with a tiny step the adversarial batch is the random start: it must change the update
    assert not torch.equal(_one_at_step(True), _one_at_step(False))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adversarial_training_keeps_its_norm_and_alpha(norm):
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    method = create(AdversarialMethod(name="pgd_at", norm=norm, eps=0.5, alpha=0.07), optimizer)
    assert (method.norm, method.alpha, method.eps) == (norm, 0.07, 0.5)


def test_deterministic_mode_is_switched_on():
    config = validate_run({**copy.deepcopy(TINY_BASE)})
    before = torch.are_deterministic_algorithms_enabled()
    try:
        _set_determinism(config)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before)


def test_autoattack_is_samats_official_composition_not_torchattacks_own():
    from samat.attacks import build

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    attack = build(
        AttackSpec(attack="autoattack", norm="linf", eps=0.1), model, num_classes=10, seed=3
    )
    assert type(attack) is torchattacks.MultiAttack
    apgd, apgdt, fab, square = attack.attacks
    assert (type(apgd), type(apgdt), type(fab), type(square)) == (
        torchattacks.APGD,
        torchattacks.APGDT,
        torchattacks.FAB,
        torchattacks.Square,
    )
    assert (apgd.steps, apgd.loss, apgdt.steps, apgdt.n_target_classes) == (100, "ce", 100, 9)
    assert (fab.multi_targeted, square.n_queries, square.rescale_schedule) == (True, 5000, False)
    assert apgd.seed == apgdt.seed == fab.seed == square.seed == 3
