"""Tests for samat.segmentation: data layouts and cache, augmentation, models, loss, mIoU, PGD."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file

import samat.methods
import samat.methods.base
import samat.segmentation.attacks
from samat.config import AdversarialMethod, ConfigError, SAMMethod
from samat.models.normalize import Normalize
from samat.segmentation import (
    IGNORE_INDEX,
    SegLoader,
    SegSplit,
    augment,
    class_iou,
    confusion_matrix,
    create_model,
    evaluate_segmentation,
    generate_stanford,
    generate_voc,
    load_segmentation,
    load_stanford_background,
    load_voc2012,
    miou,
    pgd_segmentation,
    pixel_accuracy,
    pixel_cross_entropy,
    segmentation_loss,
    stanford_split,
)
from samat.segmentation.models import mobilenetv2_features

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- metrics and loss ----------------------------------------------------------------------------


def test_confusion_and_miou_match_a_hand_computation() -> None:
    # 4 classes; class 3 is neither present nor predicted; one pixel ignored.
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 1, IGNORE_INDEX]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 3]]])
    confusion = confusion_matrix(predicted, target, 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion, expected)
    # IoU = hits / (row + column - hits): 1/3, 2/4, 1/3; class 3 has none.
    iou = class_iou(confusion)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert math.isnan(iou[3])
    assert miou(confusion) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert pixel_accuracy(confusion) == pytest.approx(4 / 7)


def test_miou_counts_a_predicted_but_absent_class_as_zero() -> None:
    # Class 2 never occurs but is predicted once: IoU 0, and it counts in the mean.
    confusion = torch.tensor([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    assert miou(confusion) == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert math.isnan(miou(torch.zeros(3, 3, dtype=torch.int64)))
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.int64), torch.tensor([[0, 3]]), 3)


def test_pixel_cross_entropy_averages_over_non_ignored_pixels() -> None:
    logits = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    masks = torch.tensor([[[0, 1], [2, IGNORE_INDEX]], [[IGNORE_INDEX] * 2, [1, IGNORE_INDEX]]])
    logp = logits.log_softmax(1)
    kept = [(0, 0, 0, 0), (0, 1, 0, 1), (0, 2, 1, 0), (1, 1, 1, 0)]  # (n, class, row, col)
    terms = [-logp[n, c, i, j] for n, c, i, j in kept]
    assert pixel_cross_entropy(logits, masks) == pytest.approx(sum(terms).item() / 4)
    assert pixel_cross_entropy(logits, masks, reduction="sum") == pytest.approx(sum(terms).item())
    per_example = pixel_cross_entropy(logits, masks, reduction="none")
    assert per_example.tolist() == pytest.approx([sum(terms[:3]).item() / 3, terms[3].item()])
    # All pixels ignored: 0, not the NaN that F.cross_entropy's mean gives.
    assert pixel_cross_entropy(logits, torch.full_like(masks, IGNORE_INDEX)).item() == 0.0


# -- data ----------------------------------------------------------------------------------------


def test_stanford_split_is_a_fixed_572_143_split() -> None:
    stems = [f"{i:07d}" for i in range(715)]
    train, test = stanford_split(stems[::-1])
    assert (len(train), len(test)) == (572, 143)
    assert sorted(train + test) == stems and train == sorted(train) and test == sorted(test)
    assert stanford_split(stems) == (train, test)
    # Pinned: a changed seed or rule would silently move images between the splits.
    assert test[:3] == ["0000004", "0000023", "0000028"]


def test_stanford_layout_loads_padded_with_unknown_ignored_and_cached(tmp_path: Path) -> None:
    base = generate_stanford(tmp_path, n_images=10, size=32, seed=0)
    assert base == tmp_path / "iccv09Data"
    assert len(list((base / "images").glob("*.jpg"))) == 10
    regions = (base / "labels" / "0001000.regions.txt").read_text().splitlines()
    values = np.array([line.split() for line in regions], dtype=np.int64)
    assert values.shape == (24, 32) and values.min() == -1 and values.max() <= 7

    data = load_stanford_background(tmp_path, size=40)
    assert (len(data.train.images), len(data.test.images)) == (8, 2)
    assert data.train.images.shape[1:] == (3, 40, 40) and data.train.masks.dtype == torch.uint8
    assert data.num_classes == 8 and data.mean == MEAN
    train_names, _ = stanford_split([p.stem for p in (base / "images").glob("*.jpg")])
    first = np.loadtxt(base / "labels" / f"{train_names[0]}.regions.txt", dtype=np.int64)
    h, w = first.shape
    expected = np.where(first < 0, IGNORE_INDEX, first)
    assert np.array_equal(data.train.masks[0, :h, :w].numpy(), expected)
    assert (data.train.masks[0, h:] == IGNORE_INDEX).all()
    assert (data.train.masks[0, :, w:] == IGNORE_INDEX).all()
    assert (data.train.images[0, :, h:] == 0).all()

    cache = base / "samat-cache-stanford-40.safetensors"
    assert cache.is_file() and not list(base.glob(".samat-cache-*"))
    # The data set directory itself is a root too, and a cached load reads no image.
    for image in (base / "images").glob("*.jpg"):
        image.write_bytes(b"")
    again = load_stanford_background(base, size=40)
    assert torch.equal(again.test.images, data.test.images)
    assert torch.equal(again.train.masks, data.train.masks)


def test_larger_images_are_scaled_down_to_fit(tmp_path: Path) -> None:
    generate_stanford(tmp_path, n_images=5, size=32, seed=1)
    data = load_stanford_background(tmp_path, size=16)
    # 32x24 (or 24x32) -> 16x12 (12x16) at the top left; class ids kept (nearest), rest ignored.
    masks = torch.cat([data.train.masks, data.test.masks])
    assert set(masks.unique().tolist()) <= {*range(8), IGNORE_INDEX}
    shapes = []
    for mask in masks != IGNORE_INDEX:
        rows, cols = int(mask.any(1).sum()), int(mask.any(0).sum())
        assert mask[:rows, :cols].float().mean() > 0.7 and not mask[rows:].any()
        shapes.append((rows, cols))
    assert sorted(shapes) == [(12, 16)] * 4 + [(16, 12)]
    # A changed file list (a sixth image) is decoded again rather than read from the cache.
    generate_stanford(tmp_path, n_images=6, size=32, seed=1)
    assert len(load_stanford_background(tmp_path, size=16).train.images) == 5


def test_voc_layout_loads_listed_images_with_void(tmp_path: Path) -> None:
    base = generate_voc(tmp_path, n_train=4, n_val=3, size=24, seed=0)
    png = sorted((base / "SegmentationClass").glob("*.png"))[0]
    with Image.open(png) as image:
        assert image.mode == "P"
        ids = np.asarray(image)
    assert set(np.unique(ids).tolist()) <= {*range(21), 255} and (ids == 255).any()
    # The parent of VOCdevkit, VOCdevkit and VOC2012 are all accepted as the root.
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        data = load_voc2012(root, size=32)
        assert (len(data.train.images), len(data.test.images)) == (4, 3)
    assert data.num_classes == 21 and data.train.images.shape[2:] == (32, 32)
    first = (base / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    with Image.open(base / "SegmentationClass" / f"{first}.png") as image:
        labels = torch.from_numpy(np.asarray(image).copy())
    h, w = labels.shape
    assert torch.equal(data.train.masks[0, :h, :w], labels)
    assert load_segmentation("voc2012", tmp_path, size=32).test.masks.shape == (3, 32, 32)


def test_missing_or_wrong_files_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"iccv09Data/images/\*\.jpg") as error:
        load_stanford_background(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"VOCdevkit/VOC2012/ImageSets/Segmentation/train\.txt"):
        load_voc2012(tmp_path)
    with pytest.raises(ConfigError, match="data.name 'cityscapes' is unknown"):
        load_segmentation("cityscapes", tmp_path)

    base = generate_stanford(tmp_path / "s", n_images=3, size=16, seed=0)
    (base / "labels" / "0002000.regions.txt").unlink()
    with pytest.raises(ConfigError, match=r"0002000\.regions\.txt: listed in the data set"):
        load_stanford_background(base)

    voc = generate_voc(tmp_path / "v", n_train=2, n_val=1, size=16, seed=0)
    png = voc / "SegmentationClass" / "2008_000001.png"
    with Image.open(png) as image:
        image.convert("RGB").save(png)
    with pytest.raises(ConfigError, match="not a palette PNG") as error:
        load_voc2012(tmp_path / "v")
    assert "\n" not in str(error.value)


# -- augmentation and loader ---------------------------------------------------------------------


def _batch(n: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=gen)
    masks = torch.randint(0, 5, (n, size, size), generator=gen, dtype=torch.uint8)
    return images, masks


def test_augment_identity_flip_and_crop_are_exact() -> None:
    images, masks = _batch()
    ones, zero = torch.ones(3), torch.zeros(3, 2)
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    x, y = augment(images, masks, scales=ones, offsets=zero, flips=no, crop_size=8)
    assert torch.allclose(x, images, atol=1e-5) and torch.equal(y, masks.long())
    x, y = augment(images, masks, scales=ones, offsets=zero, flips=yes, crop_size=8)
    assert torch.allclose(x, images.flip(3), atol=1e-5) and torch.equal(y, masks.long().flip(2))
    # A 4x4 crop at (row 1, col 3): exactly that window; past the edge is ignore and black.
    offsets = torch.tensor([[1.0, 3.0]] * 3)
    x, y = augment(images, masks, scales=ones, offsets=offsets, flips=no, crop_size=4)
    assert torch.allclose(x, images[:, :, 1:5, 3:7], atol=1e-5)
    assert torch.equal(y, masks[:, 1:5, 3:7].long())
    offsets = torch.tensor([[6.0, 5.0]] * 3)
    x, y = augment(images, masks, scales=ones, offsets=offsets, flips=no, crop_size=4)
    assert torch.equal(y[:, :2, :3], masks[:, 6:, 5:].long())
    assert (y[:, 2:] == IGNORE_INDEX).all() and (y[:, :, 3:] == IGNORE_INDEX).all()
    assert (x[:, :, 2:] == 0).all() and (x[:, :, :, 3:] == 0).all()


def test_augment_scales_masks_with_nearest_and_pads_with_ignore() -> None:
    images, masks = _batch()
    # Scale 2 (crop at the origin): every source pixel becomes a 2x2 block.
    x, y = augment(
        images,
        masks,
        scales=torch.full((3,), 2.0),
        offsets=torch.zeros(3, 2),
        flips=torch.zeros(3, dtype=torch.bool),
        crop_size=8,
    )
    assert torch.equal(y, masks[:, :4, :4].long().repeat_interleave(2, 1).repeat_interleave(2, 2))
    # Scale 1/2 inside an 8x8 crop: a 4x4 image, the rest ignored and black.
    x, y = augment(
        images,
        masks,
        scales=torch.full((3,), 0.5),
        offsets=torch.zeros(3, 2),
        flips=torch.zeros(3, dtype=torch.bool),
        crop_size=8,
    )
    assert (y[:, :4, :4] != IGNORE_INDEX).all() and (y[:, 4:] == IGNORE_INDEX).all()
    assert (y[:, :, 4:] == IGNORE_INDEX).all() and (x[:, :, 4:] == 0).all()
    assert torch.allclose(x[:, :, :4, :4], F.avg_pool2d(images, 2), atol=1e-5)


def test_seg_loader_is_deterministic_per_seed_and_epoch() -> None:
    images, masks = _batch(n=10, size=12)
    split = SegSplit((images * 255).round().to(torch.uint8), masks)
    options = {"scale_range": (0.5, 2.0), "crop_size": 10, "flip": True, "drop_last": True}
    loader = SegLoader(split, 4, device="cpu", shuffle=True, seed=3, **options)
    assert len(loader) == 2
    first = list(loader.epoch(0))
    x, y = first[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 10, 10) and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.int64 and y.shape == (4, 10, 10)
    assert set(y.unique().tolist()) <= {*range(5), IGNORE_INDEX}
    again = list(SegLoader(split, 4, device="cpu", shuffle=True, seed=3, **options).epoch(0))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    other = next(iter(loader.epoch(1)))
    assert not torch.equal(other[1], y)
    plain = SegLoader(split, 4, device="cpu", shuffle=False)
    x, y = next(iter(plain.epoch(0)))
    assert torch.equal(y, masks[:4].long()) and torch.allclose(x * 255, split.images[:4].float())
    assert len(plain) == 3


# -- models --------------------------------------------------------------------------------------


def test_models_return_logits_at_input_size_behind_normalize(tmp_path: Path) -> None:
    tiny = create_model("seg_tiny", 5, mean=MEAN, std=STD).eval()
    assert isinstance(tiny[0], Normalize)
    assert tiny(torch.rand(2, 3, 20, 28)).shape == (2, 5, 20, 28)
    # MobileNetV2 at output stride 16 (8 and 32 on request), 320 channels.
    assert mobilenetv2_features(16)(torch.rand(1, 3, 64, 64)).shape == (1, 320, 4, 4)
    assert mobilenetv2_features(8)(torch.rand(1, 3, 64, 64)).shape == (1, 320, 8, 8)
    # VainF's rule at stride 16: block 14 (first 160) stride 1 at dilation 1, then dilation 2.
    depthwise = [block.conv[1][0] for block in mobilenetv2_features(16)[14:18]]
    assert [(c.stride, c.dilation, c.padding) for c in depthwise] == [
        ((1, 1), (1, 1), (1, 1)),
        *[((1, 1), (2, 2), (2, 2))] * 3,
    ]
    mobile = create_model("deeplabv3_mobilenetv2", 21, mean=MEAN, std=STD).eval()
    with torch.no_grad():
        assert mobile(torch.rand(1, 3, 33, 47)).shape == (1, 21, 33, 47)
    # ResNet-50 trains from scratch in the paper; staged ImageNet weights load into its backbone.
    imagenet = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(imagenet, tmp_path / "resnet50.pth")
    resnet = create_model(
        "deeplabv3_resnet50", 8, mean=MEAN, std=STD, pretrained=tmp_path / "resnet50.pth"
    ).eval()
    assert isinstance(resnet[0], Normalize)
    backbone = resnet[1].net.backbone.state_dict()
    assert torch.equal(backbone["layer4.2.conv3.weight"], imagenet["layer4.2.conv3.weight"])
    with torch.no_grad():
        assert resnet(torch.rand(1, 3, 32, 32)).shape == (1, 8, 32, 32)
    with pytest.raises(ConfigError, match="model.name 'unet' is unknown"):
        create_model("unet", 8, mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match="seg_tiny has no pretrained weights"):
        create_model("seg_tiny", 8, mean=MEAN, std=STD, pretrained="x.pth")


class _Payload:
    pass


def test_mobilenet_backbone_loads_staged_weights_without_unpickling(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(imagenet, tmp_path / "mobilenet_v2.pth")
    save_file(imagenet, str(tmp_path / "mobilenet_v2.safetensors"))
    for name in ("mobilenet_v2.pth", "mobilenet_v2.safetensors"):
        model = create_model(
            "deeplabv3_mobilenetv2", 21, mean=MEAN, std=STD, pretrained=tmp_path / name
        )
        backbone = model[1].net.backbone.state_dict()
        assert torch.equal(backbone["17.conv.2.weight"], imagenet["features.17.conv.2.weight"])
        assert torch.equal(backbone["0.1.running_var"], imagenet["features.0.1.running_var"])

    with pytest.raises(ConfigError, match="no such file") as error:
        create_model("deeplabv3_mobilenetv2", 21, mean=MEAN, std=STD, pretrained=tmp_path / "no")
    assert "\n" not in str(error.value)
    with (tmp_path / "code.pth").open("wb") as f:
        pickle.dump({"x": _Payload()}, f, protocol=2)
    with pytest.raises(ConfigError, match="not a plain state dict"):
        create_model("deeplabv3_mobilenetv2", 21, mean=MEAN, std=STD, pretrained=f.name)
    del imagenet["features.3.conv.1.0.weight"]
    torch.save(imagenet, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"lacks features\.3\.conv\.1\.0\.weight"):
        create_model(
            "deeplabv3_mobilenetv2", 21, mean=MEAN, std=STD, pretrained=tmp_path / "partial.pth"
        )


# -- training and attacks on a tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """seg_tiny trained for ~4 s on generated Stanford-layout data: (model, data set)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("stanford")
    generate_stanford(root, n_images=60, size=32, seed=0)
    data = load_stanford_background(root, size=32)
    model = create_model("seg_tiny", data.num_classes, mean=data.mean, std=data.std)
    loader = SegLoader(
        data.train, 16, device="cpu", shuffle=True, scale_range=(0.75, 1.5), flip=True,
        drop_last=True, seed=0,
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(16):
        for images, masks in loader.epoch(epoch):
            loss, _ = segmentation_loss(model, images, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, data


@pytest.mark.parametrize(("norm", "eps"), [("linf", 8 / 255), ("l2", 1.0)])
def test_pgd_stays_in_budget_and_raises_the_loss(trained, norm: str, eps: float) -> None:
    model, data = trained
    model.eval()
    images = data.test.images[:6].float() / 255
    masks = data.test.masks[:6].long()
    gen = torch.Generator().manual_seed(0)
    adv = pgd_segmentation(model, images, masks, norm=norm, eps=eps, steps=5, generator=gen)
    delta = (adv - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5) and size.min() > 0.5 * eps
    assert adv.min() >= 0 and adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        clean, attacked = (pixel_cross_entropy(model(x), masks) for x in (images, adv))
    assert attacked > clean * 1.25


def test_evaluate_segmentation_pgd_lowers_miou_reproducibly(trained) -> None:
    model, data = trained
    model.train()
    attacks = [("PGD-linf", "linf", 8 / 255, 10, None), ("PGD-l2", "l2", 1.0, 10, None)]
    run = {"batch_size": 8, "num_classes": data.num_classes, "seed": 0}
    result = evaluate_segmentation(model, data.test.images, data.test.masks, attacks, **run)
    assert set(result) == {"natural", "PGD-linf", "PGD-l2"}
    natural = result["natural"]
    assert natural["pixel_accuracy"] > 0.8 and natural["miou"] > 0.4
    for label in ("PGD-linf", "PGD-l2"):
        assert result[label]["miou"] < natural["miou"] - 0.05
        assert result[label]["pixel_accuracy"] < natural["pixel_accuracy"]
    # The model gets its mode and gradient flags back, and the numbers repeat exactly.
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        predictions = model(data.test.images.float() / 255).argmax(1)
    confusion = confusion_matrix(predictions, data.test.masks, data.num_classes)
    assert natural["miou"] == pytest.approx(miou(confusion), abs=1e-12)
    assert evaluate_segmentation(model, data.test.images, data.test.masks, attacks, **run) == result
    other = evaluate_segmentation(
        model, data.test.images, data.test.masks, attacks[:1], **{**run, "seed": 1}
    )
    assert other["PGD-linf"] != result["PGD-linf"]


def test_evaluate_segmentation_refuses_an_attack_beyond_its_budget(monkeypatch, trained) -> None:
    model, data = trained

    def overshoot(model, images, masks, *, eps, **_):
        return (images + 2 * eps).clamp(0, 1)

    monkeypatch.setattr(samat.segmentation.attacks, "pgd_segmentation", overshoot)
    images, masks = data.test.images[:2], data.test.masks[:2]
    with pytest.raises(RuntimeError, match="went beyond its budget"):
        evaluate_segmentation(
            model, images, masks, [("x", "linf", 0.01)], batch_size=2, num_classes=8
        )


@pytest.mark.parametrize(
    "method",
    [SAMMethod(name="sam", rho=0.05), AdversarialMethod(name="pgd_at", eps=2 / 255, steps=3)],
    ids=["sam", "pgd_at"],
)
def test_samat_methods_train_a_segmentation_model(trained, method) -> None:
    _, data = trained
    images = data.train.images[:8].float() / 255
    masks = data.train.masks[:8].long()
    assert (masks == IGNORE_INDEX).any()
    torch.manual_seed(0)
    model = create_model("seg_tiny", data.num_classes, mean=data.mean, std=data.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = samat.methods.create(method, optimizer, generator=torch.Generator().manual_seed(0))
    losses = [trainer.step(model, images, masks).loss.item() for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    # the methods' loss is the per-pixel loss with ignored pixels left out
    loss, logits = samat.methods.base.classification_loss(model, images, masks)
    assert loss.item() == pytest.approx(pixel_cross_entropy(logits, masks).item(), rel=1e-6)
    flipped = masks.clone()
    flipped[masks == IGNORE_INDEX] = 0  # ignored pixels given a label would change the loss
    assert samat.methods.base.classification_loss(model, images, flipped)[0].item() != (
        pytest.approx(loss.item(), rel=1e-4)
    )
