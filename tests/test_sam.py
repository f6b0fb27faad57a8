"""SAM and ASAM steps against a reference computed by hand in numpy, BN freezing, zero gradients."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat.config import SAMMethod
from samat.methods import SAM, create, sam_perturbation

W0 = np.array([[0.2, -0.5, 0.1], [0.4, 0.3, -0.2]])
B0 = np.array([0.05, -0.1])
X = np.array([[1.0, 2.0, -1.0], [0.5, -1.5, 2.0], [-1.0, 0.0, 1.0], [2.0, 1.0, 0.5]])
Y = np.array([0, 1, 1, 0])
RHO, ETA, LR = 0.5, 0.01, 0.1


def ce_grad(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Analytic gradient of the mean cross-entropy of the linear model x -> w x + b on (X, Y)."""
    z = X @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(2)[Y]) / len(Y)
    return dz.T @ X, dz.sum(axis=0)


def reference_step(adaptive: bool, weight_decay: float = 0.0) -> tuple[np.ndarray, ...]:
    """Perturbation (eW, eb) and the weights after one SAM/ASAM step with plain SGD."""
    gw, gb = ce_grad(W0, B0)
    tw, tb = (np.abs(W0) + ETA, np.abs(B0) + ETA) if adaptive else (1.0, 1.0)
    norm = np.sqrt(np.sum((tw * gw) ** 2) + np.sum((tb * gb) ** 2))
    ew, eb = RHO * tw**2 * gw / norm, RHO * tb**2 * gb / norm
    gw2, gb2 = ce_grad(W0 + ew, B0 + eb)
    return ew, eb, W0 - LR * (gw2 + weight_decay * W0), B0 - LR * (gb2 + weight_decay * B0)


def linear_model() -> nn.Linear:
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W0))
        model.bias.copy_(torch.from_numpy(B0))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(X), torch.from_numpy(Y)


def assert_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_wrapper_perturbation_and_update_match_hand_computation(adaptive: bool) -> None:
    ew, eb, w1, b1 = reference_step(adaptive)
    assert np.abs(W0 + ew - w1).max() > 1e-2  # the step is big enough to tell methods apart
    model = linear_model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR), RHO, adaptive=adaptive, eta=ETA)
    images, labels = batch()
    F.cross_entropy(model(images), labels).backward()
    perturbation = sam.first_step()
    assert_close(perturbation[0], ew)
    assert_close(perturbation[1], eb)
    assert_close(model.weight, W0 + ew)
    assert_close(model.bias, B0 + eb)
    sam.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    sam.second_step()
    assert_close(model.weight, w1)
    assert_close(model.bias, b1)


@pytest.mark.parametrize("name", ["sam", "asam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_method_step_matches_hand_computation(name: str, weight_decay: float) -> None:
    _, _, w1, b1 = reference_step(name == "asam", weight_decay)
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=weight_decay)
    method = create(SAMMethod(name=name, rho=RHO, eta=ETA), optimizer)
    images, labels = batch()
    result = method.step(model, images, labels)
    assert_close(model.weight, w1)
    assert_close(model.bias, b1)
    # the reported loss and logits are those of the clean pass at the original weights
    logits = X @ W0.T + B0
    assert_close(result.logits, logits)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert result.loss.item() == pytest.approx(-log_p[np.arange(4), Y].mean(), abs=1e-12)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_pure_perturbation_matches_hand_computation(adaptive: bool) -> None:
    ew, eb, _, _ = reference_step(adaptive)
    gw, gb = ce_grad(W0, B0)
    params = [torch.from_numpy(W0), torch.from_numpy(B0)]
    grads = [torch.from_numpy(gw), torch.from_numpy(gb)]
    e = sam_perturbation(params, grads, RHO, adaptive, ETA)
    assert_close(e[0], ew)
    assert_close(e[1], eb)
    if not adaptive:
        joint = torch.cat([t.flatten() for t in e])
        assert torch.linalg.vector_norm(joint).item() == pytest.approx(RHO, abs=1e-12)


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_bn_running_stats_come_from_the_clean_pass_only(name: str) -> None:
    model = bn_model()
    reference = copy.deepcopy(model).train()
    images, labels = batch()
    with torch.no_grad():
        reference(images)
    method = create(SAMMethod(name=name, rho=RHO), torch.optim.SGD(model.parameters(), lr=LR))
    method.step(model.train(), images, labels)
    bn, expected = model[1], reference[1]
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats


def test_bn_test_is_sensitive_to_the_second_pass() -> None:
    # Guard for the test above: the pass at w + e really does see different BN inputs.
    model = bn_model().train()
    images, labels = batch()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR), RHO)
    F.cross_entropy(model(images), labels).backward()
    after_clean = model[1].running_mean.clone()
    sam.first_step()
    with torch.no_grad():
        model(images)
    assert not torch.allclose(model[1].running_mean, after_clean)


@pytest.mark.parametrize("name", ["sam", "asam"])
@pytest.mark.parametrize("eta", [0.0, ETA])
def test_zero_gradient_step_is_finite_and_leaves_weights(name: str, eta: float) -> None:
    # Zero inputs, zero weights and balanced labels: every gradient is exactly zero.
    model = nn.Linear(3, 2).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    method = create(SAMMethod(name=name, rho=RHO, eta=eta), optimizer)
    result = method.step(model, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    assert torch.isfinite(result.loss)
    assert torch.equal(model.weight, torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(model.bias, torch.zeros(2, dtype=torch.float64))


def test_zero_gradient_perturbation_is_zero() -> None:
    params = [torch.ones(2, 2), torch.ones(3)]
    grads = [torch.zeros(2, 2), torch.zeros(3)]
    for adaptive in (False, True):
        for e in sam_perturbation(params, grads, RHO, adaptive, ETA):
            assert torch.equal(e, torch.zeros_like(e))


def test_wrapper_exposes_the_base_optimizer_state() -> None:
    model = linear_model()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sam = SAM(base, RHO)
    assert sam.base_optimizer is base
    assert sam.param_groups is base.param_groups
    images, labels = batch()
    F.cross_entropy(model(images), labels).backward()
    sam.first_step()
    sam.second_step()
    state = sam.state_dict()
    assert state == base.state_dict()
    assert len(state["state"]) == 2  # momentum buffers live in the base optimizer


def test_steps_out_of_order_raise() -> None:
    model = linear_model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR), RHO)
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    images, labels = batch()
    F.cross_entropy(model(images), labels).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        sam.first_step()
