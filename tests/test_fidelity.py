"""The authors' protocol and its named alternatives (docs/fidelity.md), each against a hand-written
reference: ASAM's two variants, ESAM's subset size, the l_2 random start, the crop padding, the
CIFAR-100 evaluation statistics, and the paper grids' choices."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from samat import tasks
from samat.attacks.kinds import KINDS
from samat.config import (
    ConfigError,
    DataConfig,
    ESAMMethod,
    SAMMethod,
    load_grid,
    validate_run,
)
from samat.data import CIFAR10_STD, DeviceLoader, Split, load_dataset
from samat.evaluate import AUTHORS_CIFAR10_STATS, evaluate_run, normalized_as
from samat.grid import canonical_json, expand, run_id
from samat.methods import create, sam_perturbation
from samat.methods.adversarial import pgd, radial_start, uniform_in_ball
from samat.methods.esam import ESAMTraining, sds_count
from samat.models.normalize import Normalize
from samat.store import RunDir, images_key, record_keys

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
RHO, LR = 0.5, 0.1


# -- ASAM: the authors' variant and Kwon et al.'s -------------------------------------------------


def test_asam_variants_on_hand_numbers():
    # one weight w = 2 (gradient 3) and one bias b = 1 (gradient 4), rho 0.5
    params = [torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    grads = [torch.tensor([3.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)]
    # authors: T = |w| on both; e = rho T^2 g / ||T g|| = 0.5 [12, 4] / sqrt(36 + 16)
    authors = sam_perturbation(params, grads, RHO, True, 0.0)
    assert [float(e) for e in authors] == pytest.approx(
        [6 / math.sqrt(52), 2 / math.sqrt(52)], abs=1e-15
    )
    # Kwon: T = |w| + 0.01 on the weight, 1 on the bias: 0.5 [2.01^2 3, 4] / sqrt(6.03^2 + 16)
    kwon = sam_perturbation(params, grads, RHO, True, 0.01, [True, False])
    norm = math.sqrt(6.03**2 + 16)
    assert [float(e) for e in kwon] == pytest.approx(
        [0.5 * 2.01**2 * 3 / norm, 0.5 * 4 / norm], abs=1e-15
    )
    # samat's first ASAM (eta 0.01 on both) is neither
    legacy = sam_perturbation(params, grads, RHO, True, 0.01)
    assert float(legacy[1]) == pytest.approx(0.5 * 1.01**2 * 4 / math.hypot(6.03, 4.04))


def _layer_norm_model() -> nn.Module:
    torch.manual_seed(0)
    # LayerNorm's weight is 1-D like a bias: only its name tells Kwon's rule which it is
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()


def _reference_asam_step(model: nn.Module, x, y, *, eta: float, weights_only: bool) -> dict:
    """One ASAM step written out as the references do it: e = rho T^2 g / ||T g|| with T = |w| +
    eta (on '*weight*' parameters only when weights_only), then SGD with the gradient at w + e."""
    named = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))
    scale = {
        n: (p.detach().abs() + eta) if ("weight" in n or not weights_only) else torch.ones_like(p)
        for n, p in named.items()
    }
    norm = math.sqrt(sum(float(((scale[n] * grads[n]) ** 2).sum()) for n in named))
    saved = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        for n, p in named.items():
            p.add_(RHO * scale[n] ** 2 * grads[n] / norm)
    loss = nn.functional.cross_entropy(model(x), y)
    second = dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))
    return {n: saved[n] - LR * second[n] for n in named}


@pytest.mark.parametrize(
    ("variant", "eta", "weights_only"), [("authors", 0.0, False), ("kwon", 0.01, True)]
)
def test_asam_variant_step_matches_the_reference(variant, eta, weights_only):
    cfg = validate_run({"method": {"name": "asam", "rho": RHO, "variant": variant}}).method
    assert (cfg.eta, cfg.scaled) == (eta, "weights" if weights_only else "all")
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    reference = _reference_asam_step(_layer_norm_model(), x, y, eta=eta, weights_only=weights_only)
    model = _layer_norm_model()
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0))
    method.step(model, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=0, atol=1e-13)
    # the other variant's step is measurably different: the test tells them apart
    other = _reference_asam_step(
        _layer_norm_model(), x, y, eta=0.01 - eta, weights_only=not weights_only
    )
    assert max(float((other[n] - reference[n]).abs().max()) for n in reference) > 1e-6


def test_asam_variant_names_and_errors():
    method = validate_run({"method": {"name": "asam", "variant": "kwon"}}).method
    assert method.variant() == "kwon" and method.label() == "ASAM rho=0.05 (kwon)"
    assert SAMMethod(name="asam", eta=0.0).label() == "ASAM rho=0.05 (authors)"
    assert SAMMethod(name="asam").label() == "ASAM rho=0.05"  # samat's first ASAM, unchanged
    for bad, message in [
        ({"name": "sam", "variant": "authors"}, "use name asam"),
        ({"name": "asam", "variant": "foret"}, "choose one of authors, kwon"),
        ({"name": "asam", "variant": "authors", "eta": 0.01}, "remove method.eta"),
    ]:
        with pytest.raises(ConfigError, match=message) as error:
            validate_run({"method": bad})
        assert "\n" not in str(error.value)


def test_new_settings_leave_existing_run_ids_alone():
    # at their defaults the new keys are not in the identity; away from them they are
    for method in ({"name": "asam"}, {"name": "esam"}, {"name": "pgd_at", "norm": "l2"}):
        config = validate_run({"method": method})
        text = canonical_json(config)
        assert not any(key in text for key in ('"scaled"', '"subset"', '"l2_start"'))
    assert "crop_padding_mode" not in canonical_json(validate_run({}))
    assert run_id(validate_run({})) == "679a5ac673bc"
    changed = [
        {"method": {"name": "asam", "scaled": "weights"}},
        {"method": {"name": "esam", "subset": "official"}},
        {"method": {"name": "pgd_at", "norm": "l2", "l2_start": "radial"}},
        {"data": {"crop_padding_mode": "reflect"}},
    ]
    ids = {run_id(validate_run(c)) for c in changed}
    assert len(ids) == 4 and run_id(validate_run({})) not in ids


# -- ESAM: the sharpness-sensitive subset's size --------------------------------------------------


def _official_sds(rise: torch.Tensor, gamma: float) -> torch.Tensor:
    """Efficient_SAM utils/Esam.py:93-104 written out: the examples strictly above the
    int(B gamma)-th largest rise; the whole batch at gamma >= 0.99."""
    if gamma >= 0.99:
        return torch.arange(len(rise))
    cutoff = torch.topk(rise, int(len(rise) * gamma)).values[-1]
    return torch.nonzero(rise > cutoff).flatten()


def test_sds_count_official_and_ceil():
    assert sds_count(0.5, 128, "official") == 63 and sds_count(0.5, 128) == 64
    assert sds_count(0.99, 128, "official") == 128 and sds_count(0.99, 128) == 127
    # the official code's float product: int(100 * 0.29) is 28, so 27 are kept
    assert sds_count(0.29, 100, "official") == 27 and sds_count(0.29, 100) == 29
    rise = torch.randn(128, generator=torch.Generator().manual_seed(0))
    for gamma in (0.1, 0.29, 0.5, 0.75, 0.995):
        official = _official_sds(rise, gamma)
        assert sds_count(gamma, 128, "official") == len(official)
        kept = torch.topk(rise, len(official)).indices.sort().values
        assert torch.equal(kept, official)


@pytest.mark.parametrize(("subset", "second"), [("official", 9), ("ceil", 10)])
def test_esam_step_second_pass_size(subset, second):
    cfg = ESAMMethod(name="esam", beta=1.0, gamma=0.5, subset=subset)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    sizes: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    method = create(cfg, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(method, ESAMTraining) and method.subset == subset
    method.step(model, torch.randn(20, 12), torch.arange(20) % 3)
    assert sizes == [20, 20, second]  # clean pass, selection pass, second pass


# -- PGD l_2 random start ------------------------------------------------------------------------


def test_radial_start_equals_the_authors_draw():
    shape, eps = (5, 3, 4, 4), 0.5
    images = torch.zeros(shape)
    ours = radial_start(images, eps, torch.Generator().manual_seed(3))
    # SAM_AT utils.py:77-81 with the same generator: normal_, norm per example, uniform_(0, 1)
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(shape, generator=gen)
    n = delta.view(shape[0], -1).norm(p=2, dim=1).view(shape[0], 1, 1, 1)
    r = torch.zeros_like(n).uniform_(0, 1, generator=gen)
    torch.testing.assert_close(ours, delta * r / n * eps, rtol=0, atol=1e-7)


def test_radial_and_ball_radii():
    images = torch.zeros(4000, 3, 8, 8)
    radial = radial_start(images, 1.0, torch.Generator().manual_seed(0)).flatten(1).norm(dim=1)
    ball = uniform_in_ball(images, 1.0, "l2", torch.Generator().manual_seed(0)).flatten(1)
    ball = ball.norm(dim=1)
    # radial: eps U(0, 1), mean 1/2, sd 1/sqrt(12) -> standard error 0.0046
    assert float(radial.mean()) == pytest.approx(0.5, abs=0.02)
    assert float((radial < 0.25).float().mean()) == pytest.approx(0.25, abs=0.03)
    # uniform in the ball of d = 192: mean radius d / (d + 1)
    assert float(ball.mean()) == pytest.approx(192 / 193, abs=0.002)
    assert float(radial.max()) <= 1 and float(ball.max()) <= 1 + 1e-6


def test_pgd_and_the_method_use_the_chosen_start():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, labels = torch.full((6, 3, 2, 2), 0.5), torch.arange(6) % 3
    start = pgd(
        model,
        images,
        labels,
        eps=0.1,
        alpha=0.01,
        steps=0,
        norm="l2",
        random_start=True,
        generator=torch.Generator().manual_seed(5),
        l2_start="radial",
    )
    expected = 0.5 + radial_start(images, 0.1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(start, expected.clamp(0, 1))
    cfg = validate_run({"method": {"name": "pgd_at", "norm": "l2", "l2_start": "radial"}}).method
    assert create(cfg, torch.optim.SGD(model.parameters(), lr=0.1)).l2_start == "radial"
    assert cfg.label() == "PGD-AT l2 eps=8/255 start=radial"


# -- crop padding ---------------------------------------------------------------------------------


def _crops(mode: str, split: Split) -> torch.Tensor:
    loader = DeviceLoader(
        split, 8, device="cpu", shuffle=False, crop_padding=2, seed=3, padding_mode=mode
    )
    return torch.cat([images for images, _ in loader.epoch(0)]).mul(255).round().to(torch.uint8)


def test_reflect_padding_equals_torchvision():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 5, 6), generator=gen, dtype=torch.uint8)
    split = Split(images, torch.zeros(16, dtype=torch.int64))
    zeros, reflect = _crops("zeros", split), _crops("reflect", split)
    off_centre = 0
    for image, zero_crop, reflect_crop in zip(images, zeros, reflect, strict=True):
        # the offsets do not depend on the mode: find them from the zero-padded crop
        padded_zero = TF.pad(image, 2, padding_mode="constant")
        padded_reflect = TF.pad(image, 2, padding_mode="reflect")  # the authors' RandomCrop
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded_zero[:, dy : dy + 5, dx : dx + 6], zero_crop)
        ]
        assert len(found) == 1
        dy, dx = found[0]
        assert torch.equal(padded_reflect[:, dy : dy + 5, dx : dx + 6], reflect_crop)
        off_centre += (dy, dx) != (2, 2)
    assert off_centre >= 8  # padded pixels were compared, not only the image's own
    assert bool((reflect > 0).all()) and bool((zeros == 0).any())


def test_crop_padding_mode_reaches_the_training_loader():
    cfg = validate_run(
        {"data": {"name": "digits", "crop_padding": 2, "crop_padding_mode": "reflect"}}
    )
    dataset = load_dataset(cfg.data)
    assert dataset.crop_padding_mode == "reflect"
    loader = tasks.get("image").loader(cfg, dataset, "cpu")
    assert (loader.crop_padding, loader.padding_mode) == (2, "reflect")
    assert load_dataset(DataConfig(name="digits")).crop_padding_mode == "zeros"


# -- CIFAR-100 evaluation statistics --------------------------------------------------------------


def _cifar100_model() -> nn.Module:
    torch.manual_seed(0)
    from samat.data import CIFAR100_MEAN, CIFAR100_STD

    return nn.Sequential(
        Normalize(CIFAR100_MEAN, CIFAR100_STD), nn.Flatten(), nn.Linear(48, 10)
    ).eval()


def test_normalized_as_swaps_and_restores():
    model = _cifar100_model()
    before = model[0].mean.clone(), model[0].std.clone()
    with normalized_as(model, *AUTHORS_CIFAR10_STATS):
        assert model[0].mean.flatten().tolist() == pytest.approx(AUTHORS_CIFAR10_STATS[0])
        assert model[0].std.flatten().tolist() == pytest.approx(AUTHORS_CIFAR10_STATS[1])
    assert torch.equal(model[0].mean, before[0]) and torch.equal(model[0].std, before[1])


def test_authors_cifar100_scoring(tmp_path):
    gen = torch.Generator().manual_seed(1)
    test = Split(
        torch.randint(0, 256, (200, 3, 4, 4), generator=gen, dtype=torch.uint8),
        torch.randint(0, 10, (200,), generator=gen),
    )
    model = _cifar100_model()
    with torch.no_grad():
        model[2].weight.mul_(30)  # a model that cares about small input shifts
    # FGSM of budget 0: the attacked images are the test images, so the hand reference is the
    # clean accuracy of the same weights behind the authors' CIFAR-10 normalisation
    attack = {"attack": "fgsm", "eps": 0.0, "label": "FGSM-0"}
    assert "fgsm" in KINDS
    base = {"data": {"name": "cifar100", "root": "/nowhere"}, "eval": {"attacks": [attack]}}
    ours = validate_run(base)
    theirs = validate_run({**base, "eval": {**base["eval"], "scoring_stats": "cifar10"}})
    # the authors' CIFAR-10 std (utils.py:7) is not samat's (0.2470 in the first channel)
    assert AUTHORS_CIFAR10_STATS[1] != CIFAR10_STD
    reference = nn.Sequential(Normalize(*AUTHORS_CIFAR10_STATS), model[1], model[2]).eval()
    x = test.images.float().div(255)
    with torch.no_grad():
        want_theirs = int((reference(x).argmax(1) == test.labels).sum()) / 200
        want_ours = int((model(x).argmax(1) == test.labels).sum()) / 200
    assert want_theirs != want_ours  # the statistics change the answer on this model
    records = {}
    for name, cfg in (("ours", ours), ("theirs", theirs)):
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        records[name] = evaluate_run(run, cfg, model, test, num_classes=10, checkpoint="last")
    assert records["ours"]["FGSM-0"]["accuracy"] == want_ours
    assert records["theirs"]["FGSM-0"]["accuracy"] == want_theirs
    assert records["theirs"]["natural_subset"]["accuracy"] == want_theirs
    # the whole-test-set Natural column keeps the model's own statistics (the authors' train.py)
    assert records["theirs"]["natural"]["accuracy"] == want_ours
    # records keep their keys when the option is unset, and differ when it is set
    assert "scoring_stats" not in images_key(ours, "last")
    assert record_keys(ours)["FGSM-0"] != record_keys(theirs)["FGSM-0"]
    assert record_keys(ours)["natural"] == record_keys(theirs)["natural"]
    with pytest.raises(ConfigError, match="remove it for 'digits'"):
        validate_run({"eval": {"scoring_stats": "cifar10"}})


# -- the paper grids ------------------------------------------------------------------------------

IMAGE_GRIDS = [f"table{n}" for n in range(1, 8)]


def test_paper_grids_run_the_authors_protocol():
    for name in IMAGE_GRIDS:
        specs = expand(load_grid(PAPER / f"{name}.yaml"))
        for spec in specs:
            cfg, method = spec.config, spec.config.method
            assert cfg.train.amp == "off", name
            assert cfg.eval.n_examples == 10_000 and cfg.eval.scoring_stats == "data", name
            assert cfg.data.crop_padding_mode == "reflect", name
            if method.name == "pgd_at" and method.norm == "l2":
                assert method.l2_start == "radial", name
            if method.name == "asam":
                assert method.variant() == "authors", name
            if method.name == "esam":
                assert method.subset == "official", name
        assert any(s.config.method.name == "pgd_at" for s in specs) or name == "table5"
    table5 = {s.config.method.name for s in expand(load_grid(PAPER / "table5.yaml"))}
    assert {"asam", "esam"} <= table5
    for name in ("segmentation_stanford", "segmentation_voc"):
        assert {s.config.train.amp for s in expand(load_grid(PAPER / f"{name}.yaml"))} == {"off"}


def test_unstated_settings_are_written_beside_their_grids():
    for name in ("table6", "table7", "segmentation_stanford", "segmentation_voc"):
        text = (PAPER / f"{name}.yaml").read_text()
        assert "assumed" in text and ("does not state" in text or "Unstated" in text), name
    segmentation = (PAPER / "segmentation_voc.yaml").read_text()
    assert "--train_step 1" in segmentation and "--crop_size 513" in segmentation
