"""ESAM and LookSAM: equivalence to SAM at their limits, hand-checked steps, SWP/SDS, resume."""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from samat.config import validate_run
from samat.methods import (
    ESAMTraining,
    LookSAMTraining,
    SharpnessAwareTraining,
    StandardTraining,
    create,
)
from samat.methods.esam import esam_passes_per_step, sds_count, swp_mask
from samat.methods.looksam import looksam_gradient_, orthogonal_component

RHO, LR = 0.5, 0.1


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).train()


def deep_model() -> nn.Sequential:
    """Three linear layers (six parameter tensors), double precision, no BatchNorm."""
    torch.manual_seed(1)
    layers = [nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(4, 3)).double()


def batch(
    size: int = 8, seed: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, 2, 2, generator=generator, dtype=dtype)
    return images, torch.randint(0, 3, (size,), generator=generator)


def sgd(model: nn.Module, weight_decay: float = 0.0, momentum: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, weight_decay=weight_decay)


def train(method_factory, model: nn.Module, steps: int, **sgd_options) -> nn.Module:
    """A copy of `model` after `steps` steps of the method on batches 0, 1, 2, ..."""
    model = copy.deepcopy(model)
    method = method_factory(sgd(model, **sgd_options))
    dtype = next(model.parameters()).dtype
    for i in range(steps):
        method.step(model, *batch(seed=i, dtype=dtype))
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def assert_differs(a: nn.Module, b: nn.Module) -> None:
    diffs = [
        (x.double() - y.double()).abs().max()
        for x, y in zip(a.parameters(), b.parameters(), strict=True)
    ]
    assert max(diffs) > 1e-3


class WithSpareParameters(nn.Module):
    """bn_model() plus a layer that is never called (no gradient) and, optionally, a frozen bias."""

    def __init__(self, freeze: bool) -> None:
        super().__init__()
        self.net = bn_model()
        self.unused = nn.Linear(2, 2)
        self.net[1].bias.requires_grad_(not freeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ForwardLog:
    """Batch sizes and parameter copies seen by every forward of the model."""

    def __init__(self, model: nn.Module) -> None:
        self.sizes: list[int] = []
        self.autocast: list[bool] = []
        self.params: list[list[torch.Tensor]] = []
        model.register_forward_pre_hook(self.hook)
        self.model = model

    def hook(self, _: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.sizes.append(args[0].shape[0])
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        self.params.append([p.detach().clone() for p in self.model.parameters()])


class GradLog:
    """How many times a gradient was computed for each parameter."""

    def __init__(self, model: nn.Module) -> None:
        self.counts = [0] * len(list(model.parameters()))
        for i, p in enumerate(model.parameters()):
            p.register_hook(lambda g, i=i: self.counts.__setitem__(i, self.counts[i] + 1))


# -- ESAM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_esam_with_beta_and_gamma_one_is_sam(weight_decay: float) -> None:
    model = bn_model()
    options = {"weight_decay": weight_decay, "momentum": 0.9}
    sam = train(lambda o: SharpnessAwareTraining(o, RHO), model, 3, **options)
    esam = train(lambda o: ESAMTraining(o, RHO, beta=1.0, gamma=1.0), model, 3, **options)
    assert_same_state(sam, esam)
    assert_differs(sam, train(lambda o: StandardTraining(o), model, 3, **options))


def test_esam_default_hyper_parameters() -> None:
    method = ESAMTraining(sgd(nn.Linear(1, 1)), 0.2)
    assert (method.rho, method.beta, method.gamma, method.amp) == (0.2, 0.6, 0.5, "off")
    assert method.generator is None


@pytest.mark.parametrize(
    ("beta", "gamma", "passes"),
    [(1.0, 1.0, 2.0), (0.6, 0.5, 1.7), (0.5, 1.0, 2.5 / 3 + 1), (1.0, 0.5, 1 + 1 / 3 + 0.5)],
)
def test_esam_passes_per_step(beta: float, gamma: float, passes: float) -> None:
    assert esam_passes_per_step(beta, gamma) == pytest.approx(passes, abs=1e-12)
    method = ESAMTraining(sgd(nn.Linear(1, 1)), 0.1, beta=beta, gamma=gamma)
    assert method.passes_per_step == pytest.approx(passes, abs=1e-12)


@pytest.mark.parametrize(
    ("gamma", "size", "count"),
    [(0.5, 8, 4), (0.3, 10, 3), (0.26, 10, 3), (0.34, 10, 4), (1.0, 7, 7), (1e-12, 10, 1)],
)
def test_sds_count_is_the_ceiling_of_gamma_b(gamma: float, size: int, count: int) -> None:
    assert sds_count(gamma, size) == count


def test_sds_second_pass_is_the_subset_gradient_computed_by_hand() -> None:
    model = deep_model()
    images, labels = batch(seed=3, dtype=torch.float64)
    # Reference: SAM's perturbation, each example's loss rise, the top half's gradient at w + e.
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    grads = torch.autograd.grad(F.cross_entropy(reference(images), labels), params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        before = F.cross_entropy(reference(images), labels, reduction="none")
        for p, g in zip(params, grads, strict=True):
            p.add_(RHO * g / norm)
        after = F.cross_entropy(reference(images), labels, reduction="none")
    top = torch.argsort(after - before, descending=True)[:4]
    assert set(top.tolist()) not in ({0, 1, 2, 3}, {4, 5, 6, 7})
    # the largest rise, not the largest loss at w + e
    assert set(top.tolist()) != set(torch.argsort(after, descending=True)[:4].tolist())
    subset = torch.autograd.grad(F.cross_entropy(reference(images[top]), labels[top]), params)
    full = torch.autograd.grad(F.cross_entropy(reference(images), labels), params)
    assert max((a - b).abs().max() for a, b in zip(subset, full, strict=True)) > 1e-2
    log = ForwardLog(model)
    method = ESAMTraining(sgd(model), RHO, beta=1.0, gamma=0.5)
    result = method.step(model, images, labels)
    assert log.sizes == [8, 8, 4]  # clean, selection (forward only), second pass on ceil(B / 2)
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), deep_model().parameters(), subset, strict=True):
            torch.testing.assert_close(p, w - LR * g, rtol=0, atol=1e-12)
    # the result is the clean batch's loss and logits at w
    clean_logits = deep_model()(images)
    torch.testing.assert_close(result.logits, clean_logits, rtol=0, atol=1e-12)
    expected_loss = F.cross_entropy(clean_logits, labels)
    torch.testing.assert_close(result.loss, expected_loss, rtol=0, atol=1e-12)
    assert not result.loss.requires_grad and not result.logits.requires_grad


def test_sds_with_gamma_one_makes_no_selection_pass() -> None:
    model = deep_model()
    log = ForwardLog(model)
    ESAMTraining(sgd(model), RHO, beta=1.0, gamma=1.0).step(model, *batch(dtype=torch.float64))
    assert log.sizes == [8, 8]


def test_swp_mask_is_a_seeded_bernoulli_draw_per_tensor() -> None:
    def draw(beta: float, generator: torch.Generator | None = None) -> list[bool]:
        probability = torch.full((50,), beta, dtype=torch.float64)
        return torch.bernoulli(probability, generator=generator).bool().tolist()

    expected = draw(0.4, torch.Generator().manual_seed(3))
    assert swp_mask(50, 0.4, torch.Generator().manual_seed(3)) == expected
    assert 10 < sum(expected) < 30
    assert swp_mask(50, 0.4, torch.Generator().manual_seed(4)) != expected
    torch.manual_seed(4)
    expected = draw(0.7)
    torch.manual_seed(4)
    assert swp_mask(50, 0.7) == expected  # no generator: the global CPU RNG
    assert 25 < sum(expected) < 45


def test_swp_mask_with_beta_one_keeps_all_and_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(5)
    state, global_state = generator.get_state(), torch.get_rng_state()
    assert swp_mask(6, 1.0, generator) == [True] * 6
    assert swp_mask(6, 1.0) == [True] * 6
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_swp_perturbs_the_drawn_tensors_by_rho_over_beta() -> None:
    beta, seed = 0.5, 7
    mask = swp_mask(6, beta, torch.Generator().manual_seed(seed))
    assert 0 < sum(mask) < 6
    model = deep_model()
    w = [p.detach().clone() for p in model.parameters()]
    images, labels = batch(dtype=torch.float64)
    grads = torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))
    chosen = [g for g, keep in zip(grads, mask, strict=True) if keep]
    norm = torch.sqrt(sum((g**2).sum() for g in chosen))  # over the drawn tensors only
    log, counts = ForwardLog(model), GradLog(model)
    generator = torch.Generator().manual_seed(seed)
    ESAMTraining(sgd(model), RHO, beta=beta, gamma=1.0, generator=generator).step(
        model, images, labels
    )
    assert log.sizes == [8, 8]
    for w0, clean, perturbed, g, keep in zip(w, *log.params, grads, mask, strict=True):
        assert torch.equal(clean, w0)
        shift = RHO / beta * g / norm if keep else torch.zeros_like(g)
        torch.testing.assert_close(perturbed - w0, shift, rtol=0, atol=1e-12)
    # the clean backward computes only the drawn tensors' gradients; the second pass all of them
    assert counts.counts == [2 if keep else 1 for keep in mask]


def test_swp_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    def run(seed: int) -> nn.Module:
        generator = torch.Generator().manual_seed(seed)
        factory = lambda o: ESAMTraining(o, RHO, beta=0.5, gamma=1.0, generator=generator)  # noqa: E731
        return train(factory, deep_model(), 3)

    assert_same_state(run(0), run(0))
    assert not all(
        torch.equal(a, b) for a, b in zip(run(0).parameters(), run(1).parameters(), strict=True)
    )


def test_swp_drawing_no_tensor_is_a_plain_step() -> None:
    model, reference = deep_model(), deep_model()
    counts = GradLog(model)
    method, standard = (
        ESAMTraining(sgd(model), RHO, beta=1e-9, gamma=1.0),
        StandardTraining(sgd(reference)),
    )
    for i in range(2):
        method.step(model, *batch(seed=i, dtype=torch.float64))
        standard.step(reference, *batch(seed=i, dtype=torch.float64))
    assert_same_state(model, reference)
    assert counts.counts == [2] * 6  # one gradient per step: the clean pass computes none


def test_esam_skips_unused_and_frozen_parameters() -> None:
    model = WithSpareParameters(freeze=True)  # a frozen tensor must not be differentiated
    sam = train(lambda o: SharpnessAwareTraining(o, RHO), model, 2)
    esam = train(lambda o: ESAMTraining(o, RHO, beta=1.0, gamma=1.0), model, 2)
    assert_same_state(sam, esam)
    assert torch.equal(esam.net[1].bias, model.net[1].bias)
    assert torch.equal(esam.unused.weight, model.unused.weight)


def test_esam_bn_running_stats_come_from_the_clean_pass_only() -> None:
    model = bn_model()
    reference = copy.deepcopy(model)
    images, labels = batch()
    with torch.no_grad():
        reference(images)
    ESAMTraining(sgd(model), RHO, beta=0.5, gamma=0.5).step(model, images, labels)
    bn, expected = model[2], reference[2]
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats


@pytest.mark.parametrize("amp", [False, True])
def test_esam_amp_runs_every_pass_under_bf16_autocast(amp: bool) -> None:
    model = bn_model()
    log = ForwardLog(model)
    result = ESAMTraining(sgd(model), RHO, gamma=0.5, amp=amp).step(model, *batch())
    assert log.autocast == [amp] * 3
    assert result.logits.dtype == (torch.bfloat16 if amp else torch.float32)
    assert result.loss.dtype == torch.float32


# -- LookSAM --------------------------------------------------------------------------------------

W0 = np.array([[0.2, -0.5, 0.1], [0.4, 0.3, -0.2]])
B0 = np.array([0.05, -0.1])
X = np.array([[1.0, 2.0, -1.0], [0.5, -1.5, 2.0], [-1.0, 0.0, 1.0], [2.0, 1.0, 0.5]])
Y = np.array([0, 1, 1, 0])


def ce_grad(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Analytic gradient (weight then bias, flattened) of the linear model's mean cross-entropy."""
    z = X @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(2)[Y]) / len(Y)
    return np.concatenate([(dz.T @ X).ravel(), dz.sum(axis=0)])


def unpack(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return v[:6].reshape(2, 3), v[6:]


def linear_model() -> nn.Linear:
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W0))
        model.bias.copy_(torch.from_numpy(B0))
    return model


def flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_looksam_steps_match_hand_computation(alpha: float) -> None:
    w = np.concatenate([W0.ravel(), B0])
    g = ce_grad(*unpack(w))
    g_s = ce_grad(*unpack(w + RHO * g / np.linalg.norm(g)))
    g_v = g_s - (g_s @ g) / (g @ g) * g
    assert abs(g_v @ g) < 1e-12 and np.linalg.norm(g_v) > 1e-3
    expected = [w - LR * g_s]
    for _ in range(2):  # two cheap steps reuse g_v with the current ||g||
        g = ce_grad(*unpack(expected[-1]))
        ratio = np.linalg.norm(g) / np.linalg.norm(g_v)
        assert abs(ratio - 1) > 0.1  # the norm ratio matters
        expected.append(expected[-1] - LR * (g + alpha * ratio * g_v))
    g = ce_grad(*unpack(expected[-1]))  # step 3 = k: SAM again
    expected.append(
        expected[-1] - LR * ce_grad(*unpack(expected[-1] + RHO * g / np.linalg.norm(g)))
    )
    model = linear_model()
    method = LookSAMTraining(sgd(model), RHO, k=3, alpha=alpha)
    inputs, targets = torch.from_numpy(X), torch.from_numpy(Y)
    for step, want in enumerate(expected):
        method.step(model, inputs, targets)
        np.testing.assert_allclose(flat(model), want, rtol=0, atol=1e-12)
        if step == 0:
            stored = np.concatenate([v.numpy().ravel() for v in method.stored.values()])
            np.testing.assert_allclose(stored, g_v, rtol=0, atol=1e-12)


def test_looksam_defaults_and_passes_per_step() -> None:
    method = LookSAMTraining(sgd(nn.Linear(1, 1)), 0.3)
    assert (method.sam.rho, method.k, method.alpha, method.amp) == (0.3, 5, 0.7, "off")
    assert not method.sam.adaptive
    assert method.passes_per_step == pytest.approx(1.2, abs=1e-12)
    for k, passes in [(1, 2.0), (2, 1.5), (10, 1.1)]:
        assert LookSAMTraining(sgd(nn.Linear(1, 1)), 0.3, k=k).passes_per_step == passes


def test_looksam_with_k_one_is_sam() -> None:
    model = bn_model()
    options = {"weight_decay": 5e-4, "momentum": 0.9}
    sam = train(lambda o: SharpnessAwareTraining(o, RHO), model, 3, **options)
    looksam = train(lambda o: LookSAMTraining(o, RHO, k=1, alpha=5.0), model, 3, **options)
    assert_same_state(sam, looksam)


def test_looksam_refreshes_every_k_steps() -> None:
    model = bn_model()
    log = ForwardLog(model)
    method = LookSAMTraining(sgd(model), RHO, k=3)
    per_step = []
    for i in range(7):
        before = len(log.sizes)
        method.step(model, *batch(seed=i))
        per_step.append(len(log.sizes) - before)
    assert per_step == [2, 1, 1, 2, 1, 1, 2]
    assert model[2].num_batches_tracked.item() == 7  # BN stats from the clean passes only


def test_orthogonal_component_and_gradient_edge_cases() -> None:
    g_s = [torch.tensor([0.3, 0.1]), torch.tensor([[0.2]])]
    g = [torch.tensor([0.2, 0.0]), torch.tensor([[0.1]])]
    g_v = orthogonal_component(g_s, g)  # coefficient (0.06 + 0.02) / 0.05 = 1.6
    torch.testing.assert_close(g_v[0], torch.tensor([-0.02, 0.1]))
    torch.testing.assert_close(g_v[1], torch.tensor([[0.04]]))
    zero = [torch.zeros(2), torch.zeros(1, 1)]
    for v, s in zip(orthogonal_component(g_s, zero), g_s, strict=True):
        assert torch.equal(v, s)
    grads = [t.clone() for t in g]
    looksam_gradient_(grads, zero, 0.7)  # g_v = 0 leaves g (no NaN)
    assert all(torch.equal(a, b) for a, b in zip(grads, g, strict=True))
    looksam_gradient_(grads, g_s, 0.5)  # ||g|| / ||g_s|| = sqrt(0.05 / 0.14)
    factor = 0.5 * math.sqrt(0.05 / 0.14)
    for a, b, s in zip(grads, g, g_s, strict=True):
        torch.testing.assert_close(a, b + factor * s)


def test_looksam_without_a_stored_direction_takes_a_plain_step() -> None:
    model = deep_model()
    looksam = copy.deepcopy(model)
    method = LookSAMTraining(sgd(looksam), RHO, k=3)
    method.load_state_dict({"step": torch.tensor(1)})
    images, labels = batch(dtype=torch.float64)
    method.step(looksam, images, labels)
    StandardTraining(sgd(model)).step(model, images, labels)
    assert_same_state(model, looksam)
    assert method.state_dict()["step"].item() == 2


def test_looksam_skips_parameters_without_gradients() -> None:
    model = WithSpareParameters(freeze=False)
    looksam = train(lambda o: LookSAMTraining(o, RHO, k=2), model, 4)
    assert torch.equal(looksam.unused.weight, model.unused.weight)
    sam = train(lambda o: SharpnessAwareTraining(o, RHO), model, 2)
    k_one = train(lambda o: LookSAMTraining(o, RHO, k=1), model, 2)
    assert_same_state(sam, k_one)


def test_looksam_resumes_exactly_from_its_state_dict() -> None:
    model = bn_model()
    reference = copy.deepcopy(model)
    method = LookSAMTraining(sgd(reference, 5e-4, 0.9), RHO, k=3, alpha=0.7)
    for i in range(7):
        method.step(reference, *batch(seed=i))

    first = copy.deepcopy(model)
    optimizer = sgd(first, 5e-4, 0.9)
    method = LookSAMTraining(optimizer, RHO, k=3, alpha=0.7)
    for i in range(5):
        method.step(first, *batch(seed=i))
    state = method.state_dict()
    assert state["step"].dtype == torch.int64 and state["step"].item() == 5
    assert sorted(state) == ["g_v.0", "g_v.1", "g_v.2", "g_v.3", "g_v.4", "g_v.5", "step"]
    saved = load_tensors(save_tensors(state))  # what a safetensors checkpoint holds
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": optimizer.state_dict()}, buffer)

    def resumed(load: bool) -> nn.Module:
        buffer.seek(0)
        checkpoint = torch.load(buffer)
        second = bn_model()
        second.load_state_dict(checkpoint["model"])
        optimizer = sgd(second, 5e-4, 0.9)
        optimizer.load_state_dict(checkpoint["optim"])
        method = LookSAMTraining(optimizer, RHO, k=3, alpha=0.7)
        if load:
            method.load_state_dict(saved)
        for i in range(5, 7):
            method.step(second, *batch(seed=i))
        return second

    assert_same_state(reference, resumed(True))
    assert_differs(reference, resumed(False))


def test_looksam_state_before_the_first_step() -> None:
    state = LookSAMTraining(sgd(deep_model()), RHO).state_dict()
    assert list(state) == ["step"] and state["step"].item() == 0


class ExtraOnEvenCalls(nn.Module):
    """deep_model() plus a layer used on every other forward: no gradient at w + e under k = 2."""

    def __init__(self) -> None:
        super().__init__()
        self.net = deep_model()
        self.extra = nn.Linear(3, 3).double()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.calls % 2 == 0:
            out = out + self.extra(out)
        self.calls += 1
        return out


def test_looksam_parameter_without_a_gradient_at_w_plus_e() -> None:
    model = ExtraOnEvenCalls()
    method = LookSAMTraining(sgd(model), RHO, k=2)
    images, labels = batch(dtype=torch.float64)
    grads = torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))
    model.calls = 0
    method.step(model, images, labels)  # clean pass uses `extra`, the pass at w + e does not
    assert sorted(method.stored) == list(range(8))
    # g_s is 0 there, so g_v = -(g_s . g / ||g||^2) g: parallel to the clean gradient, nonzero
    for index in (6, 7):
        v, g = method.stored[index].flatten(), grads[index].flatten()
        cosine = torch.dot(v, g) / (v.norm() * g.norm())
        assert abs(abs(cosine.item()) - 1) < 1e-9 and v.norm() > 1e-6
    method.step(model, images, labels)
    assert model.calls == 3


def test_looksam_state_moves_to_the_parameters_dtype() -> None:
    model = deep_model()
    method = LookSAMTraining(sgd(model), RHO)
    method.load_state_dict({"step": torch.tensor(3), "g_v.2": torch.ones(4, 5)})
    assert method.steps == 3
    assert list(method.stored) == [2]
    assert method.stored[2].dtype == torch.float64 and torch.equal(
        method.stored[2], torch.ones(4, 5, dtype=torch.float64)
    )


@pytest.mark.parametrize("amp", [False, True])
def test_looksam_amp_runs_every_pass_under_bf16_autocast(amp: bool) -> None:
    model = bn_model()
    log = ForwardLog(model)
    method = LookSAMTraining(sgd(model), RHO, k=2, amp=amp)
    results = [method.step(model, *batch(seed=i)) for i in range(2)]
    assert log.autocast == [amp] * 3
    for result in results:
        assert result.logits.dtype == (torch.bfloat16 if amp else torch.float32)


def test_looksam_result_is_the_clean_batch() -> None:
    model = linear_model()
    method = LookSAMTraining(sgd(model), RHO, k=2)
    inputs, targets = torch.from_numpy(X), torch.from_numpy(Y)
    for _ in range(2):
        logits = model(inputs).detach()
        result = method.step(model, inputs, targets)
        assert torch.equal(result.logits, logits)
        assert torch.equal(result.loss, F.cross_entropy(logits, targets))
        assert not result.loss.requires_grad and not result.logits.requires_grad


# -- registry -------------------------------------------------------------------------------------


def test_create_from_a_validated_run_config() -> None:
    optimizer = sgd(nn.Linear(1, 1))
    esam = create(validate_run({"method": {"name": "esam"}}).method, optimizer)
    assert isinstance(esam, ESAMTraining) and esam.optimizer is optimizer
    assert (esam.rho, esam.beta, esam.gamma, esam.amp) == (0.05, 0.6, 0.5, "off")
    assert esam.passes_per_step == pytest.approx(1.7, abs=1e-12)
    looksam = create(validate_run({"method": {"name": "looksam"}}).method, optimizer)
    assert isinstance(looksam, LookSAMTraining) and looksam.optimizer is optimizer
    assert (looksam.sam.rho, looksam.k, looksam.alpha, looksam.amp) == (0.05, 5, 0.7, "off")
    assert looksam.sam.base_optimizer is optimizer
    assert looksam.passes_per_step == pytest.approx(1.2, abs=1e-12)


def test_create_passes_every_setting_through() -> None:
    optimizer, generator = sgd(nn.Linear(1, 1)), torch.Generator()
    cfg = {"name": "esam", "rho": 0.2, "beta": 0.3, "gamma": 0.4}
    esam = create(validate_run({"method": cfg}).method, optimizer, amp=True, generator=generator)
    assert (esam.rho, esam.beta, esam.gamma, esam.amp) == (0.2, 0.3, 0.4, "bf16")
    assert esam.generator is generator
    cfg = {"name": "looksam", "rho": 0.3, "k": 4, "alpha": 0.2}
    looksam = create(validate_run({"method": cfg}).method, optimizer, amp=True)
    assert (looksam.sam.rho, looksam.k, looksam.alpha, looksam.amp) == (0.3, 4, 0.2, "bf16")
