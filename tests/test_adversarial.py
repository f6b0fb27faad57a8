"""PGD/FGSM adversarial training: ball and box constraints, loss increase, side effects, costs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat.config import AdversarialMethod
from samat.methods import create, pgd
from samat.methods.adversarial import pgd_step, project, uniform_in_ball

TOL = 1e-6
BUDGETS = {"linf": 8 / 255, "l2": 0.5}


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def images_and_labels(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 4, 4, generator=generator)
    # Pixels on the box's edges, where the [0, 1] clamp has to act.
    images[:, :, 0, :] = 0.0
    images[:, :, -1, :] = 1.0
    return images, torch.randint(0, 3, (n,), generator=generator)


def assert_in_ball_and_box(adv: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> None:
    delta = (adv - images).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else torch.linalg.vector_norm(delta, dim=1)
    assert size.max().item() <= eps + TOL
    assert adv.min().item() >= 0.0
    assert adv.max().item() <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["pgd_at", "fgsm_at"])
def test_every_training_input_is_in_the_ball_and_box(name: str, norm: str) -> None:
    model = small_cnn().train()
    eps = BUDGETS[norm]
    cfg = AdversarialMethod(name=name, norm=norm, eps=eps, steps=3)
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1))
    inputs, outputs = [], []
    model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    model.register_forward_hook(lambda _, __, out: outputs.append(out.detach().clone()))
    images, labels = images_and_labels()
    result = method.step(model, images, labels)
    assert len(inputs) == method.passes_per_step == (4 if name == "pgd_at" else 2)
    for seen in inputs:
        assert_in_ball_and_box(seen, images, eps, norm)
    assert not torch.equal(inputs[-1], images)
    # the step reports the logits of the adversarial batch it trained on
    assert torch.equal(result.logits, outputs[-1])
    assert result.loss.item() == pytest.approx(F.cross_entropy(outputs[-1], labels).item())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_uniform_in_the_ball(norm: str) -> None:
    images = torch.full((256, 3, 4, 4), 0.5)
    delta = uniform_in_ball(images, 0.25, norm, torch.Generator().manual_seed(0))
    flat = delta.flatten(1)
    size = flat.abs().amax(dim=1) if norm == "linf" else torch.linalg.vector_norm(flat, dim=1)
    assert size.max().item() <= 0.25 + TOL
    if norm == "linf":
        # uniform coordinates: mean |delta| is eps / 2
        assert flat.abs().mean().item() == pytest.approx(0.125, rel=0.05)
    else:
        # uniform in a 48-dimensional ball: the radius concentrates near eps
        assert size.min().item() > 0.8 * 0.25


def trained_linear_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    images = (0.5 + 0.2 * (2 * labels.float() - 1)[:, None] + 0.1 * torch.randn(64, 4)).clamp(0, 1)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model, images, labels


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_increases_the_loss(norm: str) -> None:
    model, images, labels = trained_linear_model()
    clean = F.cross_entropy(model(images), labels).item()
    assert clean < 0.3  # trained-ish
    eps = {"linf": 0.1, "l2": 0.25}[norm]
    adv = pgd(model, images, labels, eps=eps, alpha=None, steps=5, norm=norm, random_start=True)
    assert F.cross_entropy(model(adv), labels).item() > 1.25 * clean
    assert_in_ball_and_box(adv, images, eps, norm)


def test_generation_leaves_grads_mode_and_bn_stats_alone() -> None:
    model = small_cnn().train()
    images, labels = images_and_labels()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    pgd(model, images, labels, eps=0.1, alpha=None, steps=2, norm="linf", random_start=True)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    pgd(model.eval(), images, labels, eps=0.1, alpha=None, steps=1, norm="l2", random_start=False)
    assert not model.training


def test_generator_makes_the_attack_reproducible() -> None:
    model = small_cnn().train()
    images, labels = images_and_labels()

    def attack(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        kwargs = {"eps": 0.1, "alpha": None, "steps": 1, "norm": "l2", "random_start": True}
        return pgd(model, images, labels, generator=generator, **kwargs)

    assert torch.equal(attack(0), attack(0))
    assert not torch.equal(attack(0), attack(1))


def test_pgd_step_numbers() -> None:
    images = torch.full((1, 3), 0.5)
    grad = torch.tensor([[1.0, -2.0, 0.0]])
    linf = pgd_step(images, grad, images, eps=0.05, alpha=0.1, norm="linf")
    torch.testing.assert_close(linf, torch.tensor([[0.55, 0.45, 0.5]]))
    # l_2: the step alpha * g / ||g|| = 0.5 * (0.6, 0.8), then projected onto radius 0.25
    images = torch.tensor([[0.5, 0.1]])
    l2 = pgd_step(images, torch.tensor([[-3.0, -4.0]]), images, eps=0.25, alpha=0.5, norm="l2")
    torch.testing.assert_close(l2, torch.tensor([[0.35, 0.0]]))  # (0.5 - 0.15, 0.1 - 0.2) clamped


def test_project_numbers() -> None:
    delta = torch.tensor([[3.0, -4.0], [0.3, 0.0]])
    torch.testing.assert_close(project(delta, 1.0, "l2"), torch.tensor([[0.6, -0.8], [0.3, 0.0]]))
    torch.testing.assert_close(project(delta, 0.5, "linf"), torch.tensor([[0.5, -0.5], [0.3, 0.0]]))


@pytest.mark.parametrize(
    ("name", "norm", "alpha", "expected"),
    [
        ("pgd_at", "linf", None, 2 / 255),
        ("pgd_at", "l2", None, 0.5 / 8),
        ("pgd_at", "linf", 0.01, 0.01),
        ("fgsm_at", "linf", None, 1.25 * 8 / 255),
        ("fgsm_at", "l2", None, 1.25 * 0.5),
    ],
)
def test_default_step_sizes(name: str, norm: str, alpha: float | None, expected: float) -> None:
    cfg = AdversarialMethod(name=name, norm=norm, eps=BUDGETS[norm], alpha=alpha)
    method = create(cfg, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    assert method.alpha == pytest.approx(expected)
