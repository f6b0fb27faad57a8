"""Tests for samat.attacks: presets, labels, the torchattacks mapping, AutoAttack and evaluate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchattacks
from sklearn.datasets import load_digits
from torch import nn

from samat.attacks import PRESETS, build, evaluate, label, resolve
from samat.config import AttackSpec, ConfigError

N_CLASSES = 10


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained briefly on 8x8 digits, and 100 held-out images in [0, 1] with labels."""
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[:1500]), labels[:1500]).backward()
        optimizer.step()
    return model.eval(), images[1500:1600], labels[1500:1600]


def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def run(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *specs, **kwargs) -> dict:
    options = {"batch_size": 64, "num_classes": N_CLASSES, "seed": 0, **kwargs}
    return evaluate(model, images, labels, list(specs), **options)


def test_presets_hold_the_paper_columns():
    expected = {
        "fgsm_linf_1": ("fgsm", "linf", 1 / 255, None),
        "pgd10_linf_1": ("pgd", "linf", 1 / 255, 10),
        "pgd10_l2_32": ("pgd", "l2", 32 / 255, 10),
        "aa_l2_32": ("autoattack", "l2", 32 / 255, None),
        "aa_linf_1": ("autoattack", "linf", 1 / 255, None),
        "fab_l2_32": ("fab", "l2", 32 / 255, 10),
    }
    for name, (attack, norm, eps, steps) in expected.items():
        spec = PRESETS[name]
        assert (spec.attack, spec.norm, spec.steps) == (attack, norm, steps)
        assert spec.eps == pytest.approx(eps)
    assert (PRESETS["pixle"].attack, PRESETS["pixle"].steps) == ("pixle", 5)
    assert [label(spec) for spec in resolve(["paper"])] == [
        "FGSM linf 1/255",
        "PGD-10 linf 1/255",
        "PGD-10 l2 32/255",
        "AA l2 32/255",
        "StAdv",
        "FAB-10 l2 32/255",
        "Pixle-5",
    ]


def test_resolve_mixes_presets_and_specs_and_copies_presets():
    own = AttackSpec(attack="pgd", norm="l2", eps=0.5, steps=20)
    specs = resolve(["aa_linf_1", own])
    assert [label(spec) for spec in specs] == ["AA linf 1/255", "PGD-20 l2 0.5"]
    specs[0].eps = 0.5
    assert PRESETS["aa_linf_1"].eps == pytest.approx(1 / 255)


def test_unknown_preset_is_a_one_line_error_listing_the_presets():
    with pytest.raises(ConfigError) as error:
        resolve(["pgd10_linf_1", "pgd_20"])
    message = str(error.value)
    assert "'pgd_20'" in message and "\n" not in message
    assert all(name in message for name in [*PRESETS, "paper"])


def test_duplicate_labels_are_an_error_unless_relabelled():
    twin = AttackSpec(attack="pgd", eps="1/255")
    with pytest.raises(ConfigError, match="PGD-10 linf 1/255"):
        resolve(["pgd10_linf_1", twin])
    with pytest.raises(ConfigError, match="label"):
        resolve(["paper", "fab_l2_32"])
    twin.label = "PGD again"
    assert len(resolve(["pgd10_linf_1", twin])) == 2


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"attack": "fgsm", "eps": "1/255"}, "FGSM linf 1/255"),
        ({"attack": "pgd", "norm": "l2", "eps": "32/255"}, "PGD-10 l2 32/255"),
        ({"attack": "pgd", "norm": "l2", "eps": 0.5, "steps": 20}, "PGD-20 l2 0.5"),
        ({"attack": "pgd", "eps": 0.0123456}, "PGD-10 linf 0.01235"),
        ({"attack": "pgd", "norm": "l2", "eps": 1.0}, "PGD-10 l2 1"),
        ({"attack": "autoattack", "norm": "l2", "eps": "32/255"}, "AA l2 32/255"),
        ({"attack": "autoattack", "steps": 10}, "AA-10 linf 8/255"),
        ({"attack": "fab", "norm": "l2", "eps": "32/255"}, "FAB-10 l2 32/255"),
        ({"attack": "square"}, "Square-5000 linf 8/255"),
        ({"attack": "pixle", "steps": 5}, "Pixle-5"),
        ({"attack": "pixle"}, "Pixle-5"),
        ({"attack": "pgd", "label": "mine"}, "mine"),
    ],
)
def test_label(fields, expected):
    assert label(AttackSpec(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"attack": "fgsm", "norm": "l2"}, "norm linf only"),
        ({"attack": "fgsm", "steps": 3}, "takes no steps"),
        ({"attack": "fab", "alpha": 0.01}, "pgd only"),
        ({"attack": "pixle", "eps": 0.1}, "no eps or norm"),
        ({"attack": "pgd", "options": {"stepz": 3}}, r"\['stepz'\] for torchattacks.PGD"),
        ({"attack": "pgd", "options": {"eps": 0.1}}, r"options \['eps'\]"),
        ({"attack": "fab", "options": {"seed": 1}}, r"options \['seed'\]"),
        ({"attack": "autoattack", "options": {"version": "plus"}}, r"\['version'\] for autoattack"),
    ],
)
def test_bad_specs_fail_at_resolve_with_one_line(fields, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve([AttackSpec(**fields)])
    assert "\n" not in str(error.value)


def test_bad_option_values_and_too_few_classes_fail_at_build(digits):
    model, _, _ = digits
    with pytest.raises(ConfigError, match="Pixle-5.*torchattacks.Pixle rejects"):
        build(
            AttackSpec(attack="pixle", options={"pixel_mapping": "nope"}),
            model,
            num_classes=N_CLASSES,
            seed=0,
        )
    with pytest.raises(ConfigError, match="at least 4 classes"):
        build(AttackSpec(attack="autoattack"), model, num_classes=3, seed=0)


def test_build_maps_specs_onto_torchattacks(digits):
    model, _, _ = digits

    def make(**fields):
        return build(AttackSpec(**fields), model, num_classes=N_CLASSES, seed=7)

    fgsm = make(attack="fgsm", eps=0.1)
    assert type(fgsm) is torchattacks.FGSM and fgsm.eps == 0.1
    pgd = make(attack="pgd", eps=0.1)
    assert type(pgd) is torchattacks.PGD
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.random_start) == (0.1, 0.025, 10, True)
    pgd2 = make(attack="pgd", norm="l2", eps=0.8, steps=3, alpha=0.3)
    assert type(pgd2) is torchattacks.PGDL2 and (pgd2.alpha, pgd2.steps) == (0.3, 3)
    assert make(attack="pgd", norm="l2", eps=0.8).alpha == pytest.approx(0.1)
    fab = make(attack="fab", norm="l2", eps=0.5)
    assert type(fab) is torchattacks.FAB
    assert (fab.norm, fab.steps, fab.n_target_classes, fab.multi_targeted) == ("L2", 10, 9, False)
    assert make(attack="fab", options={"multi_targeted": True}).multi_targeted
    pixle = make(attack="pixle", options={"restarts": 3})
    assert type(pixle) is torchattacks.Pixle and (pixle.max_patches, pixle.restarts) == (5, 3)
    square = make(attack="square", norm="l2", eps=0.5, steps=300)
    assert (square.norm, square.n_queries, square.seed) == ("L2", 300, 7)


def test_autoattack_is_the_official_standard_composition(digits):
    model, _, _ = digits
    composed = build(
        AttackSpec(attack="autoattack", norm="l2", eps="32/255"),
        model,
        num_classes=N_CLASSES,
        seed=3,
    )
    assert type(composed) is torchattacks.MultiAttack
    apgd, apgdt, fab, square = composed.attacks
    assert [type(a) for a in composed.attacks] == [
        torchattacks.APGD,
        torchattacks.APGDT,
        torchattacks.FAB,
        torchattacks.Square,
    ]
    for attack in composed.attacks:
        assert (attack.norm, attack.eps, attack.seed, attack.n_restarts) == ("L2", 32 / 255, 3, 1)
    assert (apgd.steps, apgd.loss, apgd.eot_iter, apgd.thr_decr) == (100, "ce", 1, 0.75)
    assert (apgdt.steps, apgdt.n_target_classes, apgdt.eot_iter) == (100, 9, 1)
    assert (fab.steps, fab.multi_targeted, fab.n_target_classes) == (100, True, 9)
    assert (square.n_queries, square.p_init, square.loss, square.rescale_schedule) == (
        5000,
        0.8,
        "margin",
        False,
    )
    # Nine targets however many classes there are; fewer only when there are fewer other classes.
    for classes, targets in [(100, 9), (5, 4)]:
        _, apgdt, fab, _ = build(
            AttackSpec(attack="autoattack"), model, num_classes=classes, seed=0
        ).attacks
        assert apgdt.n_target_classes == fab.n_target_classes == targets
    quick = build(
        AttackSpec(attack="autoattack", steps=10, options={"n_queries": 50}),
        model,
        num_classes=N_CLASSES,
        seed=0,
    )
    assert [quick.attacks[i].steps for i in range(3)] == [10, 10, 10]
    assert quick.attacks[3].n_queries == 50


@pytest.mark.parametrize(
    "spec",
    [
        AttackSpec(attack="fgsm", eps=0.1),
        AttackSpec(attack="pgd", eps=0.1),
        AttackSpec(attack="pgd", norm="l2", eps=1.0),
        AttackSpec(attack="fab", norm="l2", eps=1.0),
        AttackSpec(attack="fab", eps=0.1, options={"multi_targeted": True}),
        AttackSpec(attack="square", eps=0.1, steps=100),
        AttackSpec(attack="pixle", options={"restarts": 2}),
        AttackSpec(attack="autoattack", eps=0.1, steps=5, options={"n_queries": 50}),
        AttackSpec(attack="autoattack", norm="l2", eps=1.0, steps=5, options={"n_queries": 50}),
    ],
    ids=label,
)
def test_each_attack_lowers_accuracy_within_budget(digits, spec):
    model, images, labels = digits
    clean = clean_accuracy(model, images, labels)
    robust = run(model, images, labels, spec)[label(spec)]
    assert 0 <= robust < clean


@pytest.mark.parametrize(
    "spec",
    [
        AttackSpec(attack="fgsm", eps=0.05),
        AttackSpec(attack="pgd", eps=0.05),
        AttackSpec(attack="pgd", norm="l2", eps=0.7),
    ],
    ids=label,
)
def test_fgsm_and_pgd_adversarials_stay_in_the_budget(digits, spec):
    model, images, labels = digits
    adversarial = build(spec, model, num_classes=N_CLASSES, seed=0)(images, labels)
    delta = (adversarial - images).flatten(1)
    size = delta.abs().amax(1) if spec.norm == "linf" else delta.norm(dim=1)
    assert size.max().item() <= spec.eps + 1e-6
    assert size.max().item() > 0.5 * spec.eps
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_an_attack_beyond_its_budget_is_refused(digits, monkeypatch):
    model, images, labels = digits
    from samat.attacks import runner

    monkeypatch.setattr(runner, "build", lambda *a, **k: lambda x, y: (x + 0.2).clamp(0, 1))
    with pytest.raises(RuntimeError, match="beyond its budget"):
        run(model, images, labels, AttackSpec(attack="pgd", eps=0.1))


def test_pgd_robust_accuracy_does_not_increase_with_eps(digits):
    model, images, labels = digits
    budgets = [0.0, 0.02, 0.05, 0.1, 0.2]
    results = run(model, images, labels, *[AttackSpec(attack="pgd", eps=e) for e in budgets])
    accuracies = list(results.values())
    assert accuracies[0] == pytest.approx(clean_accuracy(model, images, labels))
    assert all(a >= b for a, b in itertools.pairwise(accuracies))
    assert accuracies[-1] < accuracies[0] - 0.3


def test_evaluate_restores_mode_and_random_state_and_reports_progress(digits):
    model, images, labels = digits
    calls = []
    model.train()
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    try:
        results = run(
            model,
            images,
            labels,
            "pgd10_linf_1",
            "pixle",
            batch_size=40,
            on_batch=lambda *call: calls.append(call),
        )
        assert model.training
    finally:
        model.eval()
    assert list(results) == ["PGD-10 linf 1/255", "Pixle-5"]
    assert calls == [(name, done, 100) for name in results for done in (40, 80, 100)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(
        np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True)
    )


def test_evaluate_is_deterministic_given_the_seed(digits):
    model, images, labels = digits
    specs = [
        AttackSpec(attack="autoattack", norm="l2", eps=0.5, steps=5, options={"n_queries": 100}),
        AttackSpec(attack="pgd", eps=0.05),
        AttackSpec(attack="pixle", options={"restarts": 2}),
    ]
    first = run(model, images, labels, *specs, seed=5)
    torch.manual_seed(123)  # the global state before the call must not matter
    np.random.seed(123)
    assert run(model, images, labels, *specs, seed=5) == first


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("l2", 0.5)])
def test_autoattack_agrees_with_the_official_implementation(digits, norm, eps):
    """samat's composition against pyautoattack (fra31/auto-attack) on the same model and inputs.

    Both with 10 iterations and 500 Square queries instead of 100 and 5000, to stay fast.
    """
    import pyautoattack  # in the dev extras: a missing reference is a failure, not a skip

    model, images, labels = digits
    steps, queries = 10, 500
    spec = AttackSpec(
        attack="autoattack", norm=norm, eps=eps, steps=steps, options={"n_queries": queries}
    )
    ours = run(model, images, labels, spec, batch_size=100)[label(spec)]

    official = pyautoattack.AutoAttack(
        model,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        eps=eps,
        seed=0,
        version="standard",
        device="cpu",
    )
    for apgd in (official.apgd, official.apgd_targeted):
        # its step-size checkpoints are set from n_iter in the constructor
        apgd.n_iter = steps
        apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1)
        apgd.size_decr = max(int(0.03 * steps), 1)
    official.fab.n_iter = steps
    official.square.n_queries = queries
    adversarial, _ = official.run_standard_evaluation(images, labels, batch_size=100)
    reference = clean_accuracy(model, adversarial, labels)

    assert reference < clean_accuracy(model, images, labels) - 0.2
    assert abs(ours - reference) <= 0.02
