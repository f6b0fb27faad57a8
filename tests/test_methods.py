"""The method registry, the shared step contract, standard training and BatchNorm freezing."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat.config import AdversarialMethod, ConfigError, SAMMethod, StandardMethod
from samat.methods import (
    METHODS,
    AdversarialTraining,
    SharpnessAwareTraining,
    StandardTraining,
    create,
    frozen_bn_stats,
)

CONFIGS = {
    "standard": StandardMethod(),
    "sam": SAMMethod(name="sam"),
    "asam": SAMMethod(name="asam"),
    "pgd_at": AdversarialMethod(name="pgd_at", steps=2),
    "fgsm_at": AdversarialMethod(name="fgsm_at"),
}


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(8, 3, 2, 2, generator=generator)
    return images, torch.randint(0, 3, (8,), generator=generator)


def test_registry_covers_every_config_name() -> None:
    from samat.config import METHOD_NAMES

    assert set(METHODS) == set(METHOD_NAMES)
    assert set(METHODS) == {"standard", "sam", "asam", "esam", "looksam", "pgd_at", "fgsm_at"}
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"unknown method\.name 'gsam'"):
        create(SimpleNamespace(name="gsam"), optimizer)


@pytest.mark.parametrize(
    ("cfg", "kind", "passes"),
    [
        (StandardMethod(), StandardTraining, 1),
        (SAMMethod(name="sam"), SharpnessAwareTraining, 2),
        (SAMMethod(name="asam"), SharpnessAwareTraining, 2),
        (AdversarialMethod(name="pgd_at"), AdversarialTraining, 11),
        (AdversarialMethod(name="pgd_at", steps=5), AdversarialTraining, 6),
        (AdversarialMethod(name="fgsm_at"), AdversarialTraining, 2),
        (AdversarialMethod(name="fgsm_at", steps=7), AdversarialTraining, 2),
    ],
)
def test_create_and_passes_per_step(cfg: object, kind: type, passes: int) -> None:
    method = create(cfg, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    assert isinstance(method, kind)
    assert method.passes_per_step == passes


def test_asam_flag_and_rho_come_from_the_config() -> None:
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    sam = create(SAMMethod(name="sam", rho=0.3), optimizer).sam
    asam = create(SAMMethod(name="asam", rho=0.4, eta=0.2), optimizer).sam
    assert (sam.rho, sam.adaptive) == (0.3, False)
    assert (asam.rho, asam.adaptive, asam.eta) == (0.4, True, 0.2)
    assert sam.base_optimizer is optimizer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_result_and_forward_count(name: str) -> None:
    model = small_model().train()
    method = create(CONFIGS[name], torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    before = model[-1].weight.detach().clone()
    result = method.step(model, *batch())
    assert len(calls) == method.passes_per_step
    assert result.loss.shape == () and not result.loss.requires_grad
    assert result.logits.shape == (8, 3) and not result.logits.requires_grad
    assert torch.isfinite(result.loss)
    assert not torch.equal(model[-1].weight, before)
    assert model[2].num_batches_tracked.item() == 1


def test_standard_step_is_one_sgd_step() -> None:
    model = small_model().train()
    reference = copy.deepcopy(model)
    images, labels = batch()
    result = create(StandardMethod(), torch.optim.SGD(model.parameters(), lr=0.1)).step(
        model, images, labels
    )
    loss = F.cross_entropy(reference(images), labels)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    assert result.loss.item() == pytest.approx(loss.item())
    for p, q, g in zip(model.parameters(), reference.parameters(), grads, strict=True):
        torch.testing.assert_close(p, q - 0.1 * g)


def test_standard_step_with_adam_learns() -> None:
    model = small_model().train()
    method = create(StandardMethod(), torch.optim.Adam(model.parameters(), lr=1e-2))
    images, labels = batch()
    first = method.step(model, images, labels).loss.item()
    for _ in range(10):
        last = method.step(model, images, labels).loss.item()
    assert last < first


@pytest.mark.parametrize("name", ["standard", "sam", "pgd_at"])
def test_amp_runs_bf16_autocast_on_cpu(name: str) -> None:
    model = small_model().train()
    method = create(CONFIGS[name], torch.optim.SGD(model.parameters(), lr=0.1), amp=True)
    result = method.step(model, *batch())
    assert result.logits.dtype == torch.bfloat16
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_frozen_bn_stats_uses_batch_stats_and_updates_nothing(momentum: float | None) -> None:
    bn = nn.BatchNorm1d(3, momentum=momentum).train()
    x = torch.randn(16, 3) * 2 + 1
    bn(x)
    buffers = {name: b.clone() for name, b in bn.named_buffers()}
    with frozen_bn_stats(nn.Sequential(bn)):
        y = bn(x + 5)
    for name, b in bn.named_buffers():
        assert torch.equal(b, buffers[name]), name
    # the forward normalised with the batch's own statistics
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert bn.track_running_stats
    bn(x)
    assert bn.num_batches_tracked.item() == 2


def test_frozen_bn_stats_restores_after_an_error_and_ignores_eval_mode() -> None:
    model = small_model().eval()
    x = batch()[0]
    expected = model(x)
    with pytest.raises(ValueError), frozen_bn_stats(model):
        torch.testing.assert_close(model(x), expected)
        raise ValueError
    assert model[2].track_running_stats
