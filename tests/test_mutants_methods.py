"""Guards for samat.methods found by mutation testing (docs/mutation.md): each test fails on a
change that the other tests let through, and says which."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from samat.config import AdversarialMethod, ConfigError, SAMMethod
from samat.methods import (
    METHODS,
    SAM,
    SharpnessAwareTraining,
    StandardTraining,
    create,
    pgd,
)
from samat.methods.adversarial import AdversarialTraining
from samat.methods.base import IGNORE_INDEX, classification_loss, cross_entropy

# A bias-free linear model on 4 pixels with class rows w0 = 0 and w1 = D. Its cross-entropy has
# the input gradient (p1 - [y == 1]) * D: +p1 D for label 0, -p0 D for label 1. So one PGD step
# from x = 0.5 moves along +-sign(D) (l_inf) or +-D / ||D|| (l_2), whatever p is; ||D|| = 5.
D = torch.tensor([3.0, -4.0, 0.0, 0.0])
IMAGES = torch.full((2, 1, 2, 2), 0.5)
LABELS = torch.tensor([0, 1])
ALPHA, EPS = 0.1, 1.0
EXPECTED = {
    # 0.5 + alpha * (+-sign(D)); sign(0) = 0 leaves those pixels alone
    "linf": torch.tensor([[0.6, 0.4, 0.5, 0.5], [0.4, 0.6, 0.5, 0.5]]),
    # 0.5 + alpha * (+-D / ||D||) = 0.5 +- 0.1 * (0.6, -0.8, 0, 0)
    "l2": torch.tensor([[0.56, 0.42, 0.5, 0.5], [0.44, 0.58, 0.5, 0.5]]),
}


def linear_model() -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(4), D]))
    return model


def trained_input(method: object, model: nn.Module) -> torch.Tensor:
    """The batch the method's optimizer step trained on (the input of the last forward)."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    method.step(model, IMAGES, LABELS)
    return seen[-1].flatten(1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_pgd_step_by_hand(norm: str) -> None:
    """Kills: l_2 step multiplied by the gradient norm, linf/l2 branches swapped, alpha ignored."""
    adv = pgd(
        linear_model(), IMAGES, LABELS, eps=EPS, alpha=ALPHA, steps=1, norm=norm, random_start=False
    )
    torch.testing.assert_close(adv.flatten(1), EXPECTED[norm])


@pytest.mark.parametrize("name", ["pgd_at", "fgsm_at"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adversarial_training_trains_on_the_step_its_config_asks_for(name: str, norm: str) -> None:
    """Kills: `norm` or an explicit `alpha` not reaching the attack (FGSM-AT's 1.25 eps default
    or PGD's eps / 4 taken instead, l_2 used for l_inf), in create and in the method's step."""
    model = linear_model()
    cfg = AdversarialMethod(name=name, norm=norm, eps=EPS, alpha=ALPHA, steps=1, random_start=False)
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1))
    torch.testing.assert_close(trained_input(method, model), EXPECTED[norm])


@pytest.mark.parametrize("name", ["pgd_at", "fgsm_at"])
def test_adversarial_training_is_l_inf_when_the_norm_is_not_given(name: str) -> None:
    model = linear_model()
    cfg = AdversarialMethod(name=name, eps=EPS, alpha=ALPHA, steps=1, random_start=False)
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1))
    torch.testing.assert_close(trained_input(method, model), EXPECTED["linf"])


@pytest.mark.parametrize("name", ["pgd_at", "fgsm_at"])
def test_random_start_comes_from_the_generator_not_the_global_rng(name: str) -> None:
    """Kills: `generator` dropped by the factory (the start would come from the global RNG)."""
    cfg = AdversarialMethod(name=name, norm="linf", eps=0.3, alpha=0.01, steps=1)

    def start(global_seed: int) -> torch.Tensor:
        model = linear_model()
        generator = torch.Generator().manual_seed(7)
        method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1), generator=generator)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        seen = trained_input(method, model)
        assert torch.equal(torch.get_rng_state(), before)  # the global RNG was not drawn from
        return seen

    first, second = start(0), start(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, EXPECTED["linf"])  # a random start was taken


@pytest.mark.parametrize("name", ["pgd_at", "fgsm_at"])
def test_random_start_setting_reaches_the_method(name: str) -> None:
    """Kills: `random_start` dropped (None, falsy) by the factory."""
    cfg = AdversarialMethod(name=name, norm="linf", eps=0.3, alpha=0.1, steps=1)
    model = linear_model()
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = trained_input(method, model)
    # from a random start in the 0.3 ball the step lands off the deterministic grid point
    assert not torch.allclose(seen, EXPECTED["linf"])
    assert (seen - IMAGES.flatten(1)).abs().max().item() <= 0.3 + 1e-6


@pytest.mark.parametrize(
    "cfg",
    [
        AdversarialMethod(name="pgd_at", steps=1),
        AdversarialMethod(name="fgsm_at"),
        SAMMethod(name="asam"),
    ],
    ids=["pgd_at", "fgsm_at", "asam"],
)
def test_amp_reaches_every_method(cfg: object) -> None:
    """Kills: `amp` dropped by a factory (the logits of an autocast forward are bf16)."""
    model = linear_model()
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1), amp=True)
    assert method.step(model, IMAGES, LABELS).logits.dtype == torch.bfloat16
    plain = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1))
    assert plain.step(model, IMAGES, LABELS).logits.dtype == torch.float32


def test_sam_load_state_dict_restores_the_base_optimizers_momentum() -> None:
    model = nn.Linear(2, 1)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    base.step()
    state = SAM(base, 0.1).state_dict()
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    SAM(fresh, 0.1).load_state_dict(state)
    momentum = fresh.state[model.weight]["momentum_buffer"]
    torch.testing.assert_close(momentum, torch.ones_like(model.weight))


def test_adversarial_training_counts_its_passes() -> None:
    method = AdversarialTraining(
        torch.optim.SGD(linear_model().parameters(), lr=0.1),
        norm="l2",
        eps=0.5,
        alpha=0.1,
        steps=3,
        random_start=False,
    )
    assert method.passes_per_step == 4


@pytest.mark.parametrize(("norm", "step"), [("linf", EPS / 4), ("l2", EPS / 8)])
def test_pgd_without_alpha_steps_by_the_default_of_its_norm(norm: str, step: float) -> None:
    """Kills: the default step size looked up for another norm (eps / 8 for l_inf)."""
    adv = pgd(
        linear_model(), IMAGES, LABELS, eps=EPS, alpha=None, steps=1, norm=norm, random_start=False
    )
    expected = 0.5 + (EXPECTED[norm] - 0.5) * (step / ALPHA)
    torch.testing.assert_close(adv.flatten(1), expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_starts_at_the_images_plus_the_random_draw(norm: str) -> None:
    """Kills: the random start subtracted, or drawn from the ball of another norm."""
    images = torch.full((3, 1, 2, 2), 0.5)
    eps = 0.2
    start = pgd(
        linear_model(),
        images,
        torch.tensor([0, 1, 0]),
        eps=eps,
        alpha=ALPHA,
        steps=0,
        norm=norm,
        random_start=True,
        generator=torch.Generator().manual_seed(3),
    )
    draw = torch.Generator().manual_seed(3)
    if norm == "linf":
        # the draw uniform_in_ball makes: 2 U - 1 per pixel, times eps
        delta = (2 * torch.rand(images.shape, generator=draw) - 1) * eps
    else:
        direction = torch.randn(images.shape, generator=draw)
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        radius = eps * torch.rand(3, generator=draw) ** (1 / 4)
        delta = direction * radius.view(-1, 1, 1, 1)
    torch.testing.assert_close(start, images + delta)


def test_an_l2_random_start_for_a_single_example() -> None:
    """Kills: the pixel count read from a second example (a batch of one has none)."""
    images = torch.full((1, 1, 2, 2), 0.5)
    adv = pgd(
        linear_model(),
        images,
        torch.tensor([0]),
        eps=0.2,
        alpha=ALPHA,
        steps=1,
        norm="l2",
        random_start=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert (adv - images).norm().item() <= 0.2 + 1e-6


def test_an_l2_step_is_alpha_long_even_on_a_very_flat_loss() -> None:
    """Kills: the attack loss averaged over the batch instead of summed, which shrinks each
    example's gradient by the batch size until the tiny-norm guard (1e-12) caps the step."""
    model = linear_model().double()
    with torch.no_grad():
        model[1].weight.mul_(1e-12)  # per-example input gradient about 2.5e-12 long
    images = torch.full((16, 1, 2, 2), 0.5, dtype=torch.float64)
    labels = torch.zeros(16, dtype=torch.int64)
    adv = pgd(model, images, labels, eps=EPS, alpha=ALPHA, steps=1, norm="l2", random_start=False)
    lengths = (adv - images).flatten(1).norm(dim=1)
    torch.testing.assert_close(lengths, torch.full((16,), ALPHA, dtype=torch.float64))


class AutocastProbe(nn.Module):
    """Records whether each forward ran under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = linear_model()
        self.autocast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.inner(x)


@pytest.mark.parametrize("amp", [False, True])
def test_pgd_forwards_follow_amp(amp: bool) -> None:
    """Kills: amp dropped from the attack's forward, or pgd defaulting to amp on."""
    model = AutocastProbe()
    kwargs = {"amp": amp} if amp else {}
    pgd(
        model,
        IMAGES,
        LABELS,
        eps=EPS,
        alpha=ALPHA,
        steps=2,
        norm="linf",
        random_start=False,
        **kwargs,
    )
    assert model.autocast == [amp, amp]


@pytest.mark.parametrize("amp", [False, True])
def test_adversarial_training_forwards_follow_amp(amp: bool) -> None:
    """Kills: amp not passed on to the attack, or AdversarialTraining defaulting to amp on."""
    model = AutocastProbe()
    kwargs = {"amp": amp} if amp else {}
    method = AdversarialTraining(
        torch.optim.SGD(model.parameters(), lr=0.1),
        norm="linf",
        eps=EPS,
        alpha=ALPHA,
        steps=2,
        random_start=False,
        **kwargs,
    )
    method.step(model, IMAGES, LABELS)
    assert model.autocast == [amp] * 3


def test_adversarial_training_clears_stale_gradients() -> None:
    """Kills: zero_grad(set_to_none=False): a parameter outside the loss with a stale gradient
    would then get a zero gradient, and SGD's weight decay would move it."""
    model = linear_model()
    unused = nn.Parameter(torch.ones(3))
    unused.grad = torch.ones(3)
    params = [*model.parameters(), unused]
    cfg = AdversarialMethod(name="pgd_at", eps=EPS, alpha=ALPHA, steps=1, random_start=False)
    create(cfg, torch.optim.SGD(params, lr=0.1, weight_decay=0.5)).step(model, IMAGES, LABELS)
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.ones(3))


def test_an_unknown_method_lists_the_known_names() -> None:
    """Kills: a mangled separator in the list of names the error offers."""
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ConfigError) as error:
        create(SimpleNamespace(name="gsam"), optimizer)
    assert str(error.value).endswith("use one of " + ", ".join(METHODS))


def test_forward_passes_are_float32_unless_amp_is_asked_for() -> None:
    """Kills: amp defaulting to on in classification_loss or in the Method base class."""
    model = linear_model()
    loss, logits = classification_loss(model, IMAGES, LABELS)
    assert logits.dtype == loss.dtype == torch.float32
    method = StandardTraining(torch.optim.SGD(model.parameters(), lr=0.1))
    assert method.step(model, IMAGES, LABELS).logits.dtype == torch.float32


def test_asam_default_eta_is_0_01() -> None:
    """Kills: another default eta in SAM or SharpnessAwareTraining. With one weight w = 1 and
    gradient g, ASAM's e = rho T^2 g / |T g| = rho T sign(g), T = |w| + eta = 1.01."""
    for make in (
        lambda opt: SAM(opt, 0.5, adaptive=True),
        lambda opt: SharpnessAwareTraining(opt, 0.5, adaptive=True).sam,
    ):
        weight = nn.Parameter(torch.ones(1))
        weight.grad = torch.tensor([-2.0])
        perturbation = make(torch.optim.SGD([weight], lr=0.1)).first_step()
        torch.testing.assert_close(perturbation[0], torch.tensor([-0.5 * 1.01]))


def test_standard_training_clears_stale_gradients() -> None:
    """Kills: zero_grad(set_to_none=False) in StandardTraining (see the AT test above)."""
    model = linear_model()
    unused = nn.Parameter(torch.ones(3))
    unused.grad = torch.ones(3)
    optimizer = torch.optim.SGD([*model.parameters(), unused], lr=0.1, weight_decay=0.5)
    StandardTraining(optimizer).step(model, IMAGES, LABELS)
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.ones(3))


def test_per_pixel_cross_entropy_per_example_is_each_images_mean_over_its_counted_pixels() -> None:
    """Kills, in `cross_entropy(reduction="none")` for [N, C, H, W] logits (ESAM's per-example
    loss on segmentation): the branch skipped, the division turned into a product, the sums
    taken over other dimensions."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 2, 3)
    masks = torch.randint(0, 4, (3, 2, 3))
    masks[0] = IGNORE_INDEX
    masks[0, 1, 2] = 1  # image 0 has one counted pixel
    masks[2] = IGNORE_INDEX  # image 2 has none: its loss is 0
    per_pixel = nn.functional.cross_entropy(
        logits, masks, ignore_index=IGNORE_INDEX, reduction="none"
    )
    expected = torch.stack([per_pixel[0, 1, 2], per_pixel[1].mean(), torch.tensor(0.0)])
    got = cross_entropy(logits, masks, reduction="none")
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        cross_entropy(logits, masks), per_pixel[masks != IGNORE_INDEX].mean()
    )
    torch.testing.assert_close(cross_entropy(logits, masks, reduction="sum"), per_pixel.sum())
    # a batch with a single counted pixel: the mean is that pixel's loss
    torch.testing.assert_close(cross_entropy(logits[:1], masks[:1]), per_pixel[0, 1, 2])
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy(logits, masks, reduction="max")
