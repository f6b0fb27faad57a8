"""Tests for samat.attacks.corruptions: generated CIFAR-10-C corruptions and the released files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from samat.attacks import corruptions as C
from samat.attacks.corruptions import CORRUPTIONS, corrupt, corruption_accuracy
from samat.config import ConfigError

RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
}


def natural_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, 32, 32]: smooth colour fields with a few hard-edged shapes and fine texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 180 + 40
    field = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=True)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(n):
        for _ in range(3):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([32, 32, 8]) + 3).tolist()
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            field[i][:, inside] = (torch.rand(3, 1, generator=g) * 235 + 10).expand(-1, 1)
    texture = torch.randn(n, 3, 32, 32, generator=g) * 6
    return (field + texture).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return natural_images(6)


def mean_change(out: torch.Tensor, clean: torch.Tensor) -> float:
    return (out.double() - clean.double()).abs().mean().item()


# --- generated corruptions -------------------------------------------------------------------


def test_the_fifteen_corruptions_of_cifar10c():
    assert CORRUPTIONS == (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
        "elastic_transform",
        "pixelate",
        "jpeg_compression",
    )
    assert set(C._CORRUPTIONS) == set(CORRUPTIONS)


def test_every_corruption_and_severity_keeps_shape_dtype_range_and_changes_the_image(images):
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            out = corrupt(images, name, severity, seed=0)
            assert out.shape == images.shape and out.dtype == torch.uint8, (name, severity)
            changed = (out != images).flatten(1).any(1)
            assert changed.all(), f"{name} s{severity} left an image unchanged"


def test_float_images_come_back_as_float_in_0_1_equal_to_the_uint8_result(images):
    as_float = images.float() / 255
    for name in CORRUPTIONS:
        out = corrupt(as_float, name, 3, seed=1)
        assert out.dtype == torch.float32 and out.shape == images.shape
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, corrupt(images, name, 3, seed=1).float() / 255), name


def test_same_seed_same_bytes_other_seed_differs_for_the_random_ones(images):
    for name in CORRUPTIONS:
        first = corrupt(images, name, 5, seed=3)
        assert torch.equal(first, corrupt(images, name, 5, seed=3)), name
        other = corrupt(images, name, 5, seed=4)
        assert torch.equal(first, other) != (name in RANDOM), name


def test_an_images_corruption_depends_on_its_index_not_on_the_batch(images):
    for name in sorted(RANDOM):
        whole = corrupt(images, name, 4, seed=0)
        part = corrupt(images[[4, 1]], name, 4, seed=0, indices=[4, 1])
        assert torch.equal(part, whole[[4, 1]]), name
        shifted = corrupt(images[[4, 1]], name, 4, seed=0, indices=[5, 1])
        assert not torch.equal(shifted[0], whole[4]) and torch.equal(shifted[1], whole[1])


def test_severity_increases_the_distortion(images):
    changes = {
        name: [mean_change(corrupt(images, name, s, seed=0), images) for s in range(1, 6)]
        for name in CORRUPTIONS
    }
    # The parameters grow with severity: more noise, blur, zoom, brightness, lost contrast,
    # fewer pixels and lower JPEG quality, a thicker fog.
    for name in (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "zoom_blur",
        "fog",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
    ):
        assert changes[name] == sorted(changes[name]), (name, changes[name])
        assert len(set(changes[name])) == 5, (name, changes[name])
    # Motion blur: severities 3 and 4 differ only in taps of weight < 1e-9 (sigma 2 both).
    motion = changes["motion_blur"]
    assert motion[0] < motion[1] < motion[2] < motion[4]
    assert motion[3] == pytest.approx(motion[2], abs=0.01)
    # Glass blur: the pixel copies dominate; severities 4 and 5 run them twice.
    glass = changes["glass_blur"]
    assert min(glass[3:]) > max(glass[:3]) + 2
    # Snow: a denser, longer-streaked layer over a whiter image.
    assert changes["snow"] == sorted(changes["snow"]) and len(set(changes["snow"])) == 5
    # Frost: the texture weight grows .2, .3, .4, .4, .45 while the image's falls 1, 1, .9, .85,
    # .75, so the distance to the clean image peaks at severity 3.
    frost = changes["frost"]
    assert frost[0] < frost[1] < frost[2] and frost[2] > frost[3] > frost[0]
    # Elastic: the reference's affine jitter shrinks with severity (2.56 px at 1, 0.96 at 5).
    assert changes["elastic_transform"][0] > changes["elastic_transform"][4] > 0


def test_random_draws_have_the_references_ranges():
    keys = C._keys(0, "glass_blur", list(range(200)))
    (shifts,) = C._draw(keys, lambda g: C._glass_blur_draw(g, (3, 32, 32)))
    assert shifts.shape == (200, 2, 30, 30, 2)  # np.random.randint(-1, 1): -1 or 0
    assert set(shifts.unique().tolist()) == {-1, 0}
    (angle,) = C._draw(keys, lambda g: C._CORRUPTIONS["motion_blur"][0](g, (3, 32, 32)))
    assert -45 <= angle.min() < -40 and 40 < angle.max() < 45  # uniform(-45, 45)
    _, snow_angle = C._draw(keys, lambda g: C._snow_draw(g, (3, 32, 32)))
    assert -135 <= snow_angle.min() < -130 and -50 < snow_angle.max() < -45  # (-135, -45)
    (frost,) = C._draw(keys, lambda g: C._frost_draw(g, (3, 32, 32)))
    black = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    crops = C._frost(black, 5, frost).double()
    # one of the five textures, from a crop anywhere in it (randint(5), randint(0, size - 32))
    picked = [
        min(range(5), key=lambda t: abs(c.mean() / 0.45 - C._FROST_STATS[t][0][0]))
        for c in crops[:, 0]
    ]
    assert set(picked) >= {0, 3, 4}


def test_noise_strength_follows_the_reference_parameters():
    gray = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    for severity, c in zip(range(1, 6), [0.04, 0.06, 0.08, 0.09, 0.10], strict=True):
        noise = (corrupt(gray, "gaussian_noise", severity, seed=0).double() - 128) / 255
        assert noise.std().item() == pytest.approx(c, rel=0.05)
    for severity, c in zip(range(1, 6), [500, 250, 100, 75, 50], strict=True):
        shot = corrupt(gray, "shot_noise", severity, seed=0).double() / 255
        assert shot.std().item() == pytest.approx((128 / 255 / c) ** 0.5, rel=0.08)
    for severity, c in zip(range(1, 6), [0.01, 0.02, 0.03, 0.05, 0.07], strict=True):
        out = corrupt(
            torch.full((16, 3, 32, 32), 128, dtype=torch.uint8), "impulse_noise", severity, seed=0
        )
        salt, pepper = (out == 255).double().mean().item(), (out == 0).double().mean().item()
        assert salt + pepper == pytest.approx(c, rel=0.1)
        assert salt == pytest.approx(pepper, rel=0.25)
        assert ((out == 0) | (out == 255) | (out == 128)).all()


# --- the reference's arithmetic, piece by piece ------------------------------------------------


def reference_u8(x: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(x, 0, 1) * 255)


def test_contrast_is_the_reference_formula_bit_for_bit(images):
    hwc = images.permute(0, 2, 3, 1).numpy() / 255.0
    for severity, c in zip(range(1, 6), [0.75, 0.5, 0.4, 0.3, 0.15], strict=True):
        means = hwc.mean(axis=(1, 2), keepdims=True)
        expected = reference_u8((hwc - means) * c + means)
        out = corrupt(images, "contrast", severity, seed=0).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(out, expected)


def test_brightness_adds_to_the_hsv_value():
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    pixels = natural_images(2, seed=5)
    pixels[0, :, 0, :4] = 0  # black pixels: hue and saturation 0
    pixels[0, :, 1, :4] = 200  # grey pixels
    h, s, v = C._rgb_to_hsv(pixels.double() / 255)
    hsv = rgb_to_hsv(pixels.permute(0, 2, 3, 1).numpy() / 255.0)
    np.testing.assert_allclose(torch.stack([h, s, v], -1).numpy(), hsv, atol=1e-12)
    for severity, c in zip(range(1, 6), [0.05, 0.1, 0.15, 0.2, 0.3], strict=True):
        shifted = hsv.copy()
        shifted[..., 2] = np.clip(shifted[..., 2] + c, 0, 1)
        expected = reference_u8(hsv_to_rgb(shifted)).astype(int)
        out = corrupt(pixels, "brightness", severity, seed=0).permute(0, 2, 3, 1).numpy()
        assert np.abs(out - expected).max() <= 1  # matplotlib rounds differently from skimage
        assert (out == expected).mean() > 0.97


def test_pixelate_and_jpeg_are_pillows(images):
    image = Image.fromarray(images[2].permute(1, 2, 0).numpy())
    for severity, (c, quality) in enumerate(
        zip([0.95, 0.9, 0.85, 0.75, 0.65], [80, 65, 58, 50, 40], strict=True), start=1
    ):
        small = image.resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
        out = corrupt(images[2:3], "pixelate", severity, seed=0)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(out, np.asarray(small))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        out = corrupt(images[2:3], "jpeg_compression", severity, seed=0)[0].permute(1, 2, 0)
        np.testing.assert_array_equal(out.numpy(), np.asarray(Image.open(buffer)))


def test_zoom_blur_averages_scipy_zooms_of_the_centre(images):
    x = (images[:2].permute(0, 2, 3, 1).numpy() / 255.0).astype(np.float32)
    factors = np.arange(1, 1.16, 0.01)  # severity 3: 16 factors from 1.00 to 1.15
    assert len(factors) == 16 and len(C._zoom_factors(3)) == 16 and len(C._zoom_factors(1)) == 7
    total = np.zeros_like(x)
    for z in factors:
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        zoomed = ndimage.zoom(x[:, top : top + ch, top : top + ch], (1, z, z, 1), order=1)
        trim = (zoomed.shape[1] - 32) // 2
        total += zoomed[:, trim : trim + 32, trim : trim + 32]
    expected = reference_u8((x + total) / (len(factors) + 1))
    out = corrupt(images[:2], "zoom_blur", 3, seed=0).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, expected)


def test_defocus_kernel_is_the_references_float32_disk():
    # radius 1.5: the 9 pixels of a 3x3 square, barely blurred (alias_blur 0.1)
    box = C._disk(1.5, 0.1)
    r = box.shape[0] // 2
    np.testing.assert_allclose(box[r - 1 : r + 2, r - 1 : r + 2].numpy(), 1 / 9, rtol=1e-6)
    assert box.sum().item() == pytest.approx(1, abs=1e-7)
    # radius 0.3: the centre alone, blurred by a 3x3 Gaussian of sigma 0.4; cv2's float32 sum is
    # 1.0000000013969839 (a float64 kernel would sum to 0.99999998 and floor flat areas 1 lower)
    centre = C._disk(0.3, 0.4)
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    np.testing.assert_allclose(centre.numpy(), np.outer(g, g) / g.sum() ** 2, rtol=1e-6)
    assert centre.sum().item() == 1.0000000013969839
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    assert (corrupt(flat, "defocus_blur", 1, seed=0) == 77).all()


def test_glass_blur_copies_like_the_references_numpy_view_swap(images):
    shifts = torch.randint(-1, 1, (2, 2, 30, 30, 2), generator=torch.Generator().manual_seed(2))
    for sigma, iterations in ((0.25, 2), (0.05, 1)):
        out = C._glass_from_shifts(images[:2], sigma, shifts[:, :iterations])
        for i in range(2):
            x = images[i].permute(1, 2, 0).numpy() / 255.0
            x = np.uint8(ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest") * 255)
            for it in range(iterations):
                for h in range(31, 1, -1):
                    for w in range(31, 1, -1):
                        dx, dy = shifts[i, it, h - 2, w - 2].tolist()
                        x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
            blurred = ndimage.gaussian_filter(x / 255.0, (sigma, sigma, 0), mode="nearest")
            np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), reference_u8(blurred))


# ImageMagick 6.9.11 Q16 MotionBlurImage through Wand and a PNG round trip (the reference's
# path) on a 12x12 image with pixel (5, 4) = (255, 200, 100) and (0, 11) = 90 grey: every
# non-zero output pixel, (row, col) -> RGB.
IMAGEMAGICK_MOTION = {
    (30.0, 6, 2): {
        (0, 10): 26,
        (0, 11): 56,
        (3, 0): (3, 2, 1),
        (3, 1): (11, 9, 4),
        (4, 1): (27, 21, 10),
        (4, 2): (51, 40, 20),
        (5, 3): (74, 58, 29),
        (5, 4): (84, 66, 33),
    },
    (-40.0, 9, 2.5): {
        **{(r, c): v for r in range(4) for c, v in zip(range(6, 9), (2, 5, 12), strict=True)},
        (0, 9): 42,
        (0, 10): 65,
        (0, 11): 90,
        (1, 9): 42,
        (1, 10): 65,
        (1, 11): 65,
        (2, 9): 24,
        (2, 10): 24,
        (2, 11): 24,
        (3, 9): 12,
        (3, 10): 12,
        (3, 11): 12,
        **{(4, c): 2 for c in range(6, 12)},
        (5, 4): (70, 55, 27),
        (6, 2): (50, 39, 19),
        (6, 3): (64, 50, 25),
        (7, 2): (34, 26, 13),
        (8, 0): (9, 7, 3),
        (8, 1): (19, 15, 7),
    },
}


def test_motion_blur_matches_imagemagick():
    image = torch.zeros(1, 3, 12, 12, dtype=torch.uint8)
    image[0, :, 5, 4] = torch.tensor([255, 200, 100])
    image[0, :, 0, 11] = 90
    for (angle, radius, sigma), pixels in IMAGEMAGICK_MOTION.items():
        out = C._motion_blur_u8(image, radius, sigma, torch.tensor([angle], dtype=torch.float64))
        expected = torch.zeros(12, 12, 3, dtype=torch.uint8)
        for (r, c), value in pixels.items():
            expected[r, c] = torch.tensor(value if isinstance(value, tuple) else (value,) * 3)
        assert torch.equal(out[0].permute(1, 2, 0), expected), (angle, radius, sigma)


def test_bilinear_sampling_matches_scipy_map_coordinates_with_its_borders():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 7, 9, generator=g, dtype=torch.float64)
    rows = torch.rand(1, 20, 20, generator=g, dtype=torch.float64) * 14 - 4
    cols = torch.rand(1, 20, 20, generator=g, dtype=torch.float64) * 16 - 4
    for ours, scipy_mode in (("symmetric", "reflect"), ("mirror", "mirror")):
        expected = ndimage.map_coordinates(
            image[0, 0].numpy(), [rows[0].numpy(), cols[0].numpy()], order=1, mode=scipy_mode
        )
        out = C._bilinear(image, rows, cols, ours)[0, 0].numpy()
        np.testing.assert_allclose(out, expected, atol=1e-12)


def test_elastic_affine_part_is_an_opencv_warp_with_reflect_101_borders(images):
    # Moving all three points by (+1, 0) makes the affine map a translation: warpAffine reads
    # the source at x - 1, and column -1 mirrors to column 1 (BORDER_REFLECT_101).
    jitter = 32 * 0.08
    move = torch.tensor([(1 + jitter) / (2 * jitter), 0.5], dtype=torch.float64)
    affine_u = move.expand(2, 3, 2)
    field_u = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    out = C._elastic_from_draws(images[:2], 0.0, 0.0, jitter, affine_u, field_u)
    assert torch.equal(out[..., 1:], images[:2, ..., :-1])
    assert torch.equal(out[..., 0], images[:2, ..., 1])
    # At severity 1 the displacement field is zero: with no affine move the image is unchanged.
    still = C._elastic_from_draws(images[:2], 0.0, 0.0, jitter, torch.full((2, 3, 2), 0.5), field_u)
    assert torch.equal(still, images[:2])


def reference_plasma(uniform: np.ndarray, mapsize: int, decay: float) -> np.ndarray:
    """make_cifar_c.py's plasma_fractal with np.random.uniform replaced by the given draws."""
    a = np.zeros((mapsize, mapsize))
    step, wibble, used = mapsize, 100.0, 0

    def wibbled(array):
        nonlocal used
        u = uniform[used : used + array.size].reshape(array.shape)
        used += array.size
        return array / 4 + wibble * (-wibble + 2 * wibble * u)

    while step >= 2:
        half = step // 2
        corner = a[0::step, 0::step]
        square = corner + np.roll(corner, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        a[half::step, half::step] = wibbled(square)
        dr, ul = a[half::step, half::step], a[0::step, 0::step]
        a[0::step, half::step] = wibbled(dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1))
        a[half::step, 0::step] = wibbled(dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0))
        step //= 2
        wibble /= decay
    a -= a.min()
    return a / a.max()


def test_fog_is_the_references_diamond_square_fractal():
    assert C._plasma_draws(32) == 3 * (1 + 4 + 16 + 64 + 256)
    uniform = torch.rand(2, C._plasma_draws(32), generator=torch.Generator().manual_seed(1))
    out = C._plasma_fractal(uniform, 32, 2.5)
    for i in range(2):
        expected = reference_plasma(uniform[i].double().numpy(), 32, 2.5)
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-12)


def test_frost_textures_are_fixed_and_have_the_photographs_statistics():
    textures = C._frost_textures(32, 32)
    C._frost_textures.cache_clear()
    assert torch.equal(textures, C._frost_textures(32, 32))
    assert textures.shape == (5, 3, 96, 128) and textures.dtype == torch.uint8
    for texture, (mean, std) in zip(textures.double(), C._FROST_STATS, strict=True):
        assert texture.mean((1, 2)).tolist() == pytest.approx(mean, abs=1.0)
        assert texture.std((1, 2)).tolist() == pytest.approx(std, abs=1.0)
    # severity 1: the image plus 0.2 x a texture crop, truncated at 255
    black = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    added = corrupt(black, "frost", 1, seed=0).double().mean((0, 2, 3)) / 0.2
    texture_means = torch.tensor([m for m, _ in C._FROST_STATS], dtype=torch.float64).mean(0)
    assert added.tolist() == pytest.approx(texture_means.tolist(), abs=12)


def test_unknown_corruption_or_severity_is_a_config_error(images):
    with pytest.raises(ConfigError, match="unknown corruption 'rain'"):
        corrupt(images, "rain", 1, seed=0)
    with pytest.raises(ConfigError, match="severity 6"):
        corrupt(images, "fog", 6, seed=0)


# --- corruption_accuracy -------------------------------------------------------------------------


class Brightness(nn.Module):
    """Class 1 when an image's mean is above 0.5, else 0; records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        bright = (x.flatten(1).mean(1) * self.scale > 0.5).float()
        return torch.stack([1 - bright, bright], 1)


N_STAGED = 6  # images per severity in the staged files (the real ones have 10,000)
LABELS = np.array([1, 0, 1, 1, 0, 1])
STAGED = ("fog", "motion_blur")


def bright_row(name: str, severity: int, image: int) -> bool:
    return (image + severity + STAGED.index(name)) % 3 == 0


def stage(folder: Path, names=STAGED) -> Path:
    """Released files in the real layout: labels.npy and <name>.npy of 5 x N_STAGED rows."""
    folder.mkdir(parents=True)
    np.save(folder / "labels.npy", np.tile(LABELS, 5).astype(np.uint8))
    for name in names:
        rows = np.zeros((5 * N_STAGED, 32, 32, 3), dtype=np.uint8)
        for severity in range(1, 6):
            for i in range(N_STAGED):
                rows[(severity - 1) * N_STAGED + i] = 220 if bright_row(name, severity, i) else 20
        np.save(folder / f"{name}.npy", rows)
    return folder


def test_released_files_give_the_accuracy_of_the_rows_of_the_evaluated_indices(tmp_path):
    stage(tmp_path / "CIFAR-10-C")
    indices = [5, 0, 3, 2]
    labels = torch.tensor(LABELS[indices])
    model = Brightness()
    clean = torch.zeros(len(indices), 3, 32, 32)  # not read for released files
    for root in (tmp_path, tmp_path / "CIFAR-10-C"):
        result = corruption_accuracy(
            model, clean, labels, indices=indices, root=root, corruptions=STAGED, batch_size=3
        )
        assert result["source"] == "released"
        for name in STAGED:
            for severity in range(1, 6):
                predicted = [int(bright_row(name, severity, i)) for i in indices]
                expected = np.mean(np.array(predicted) == LABELS[indices])
                assert result["per_corruption"][name][severity] == expected, (name, severity)
        table = [a for row in result["per_corruption"].values() for a in row.values()]
        assert len(table) == 10
        assert result["accuracy"] == pytest.approx(np.mean(table))
        assert 0 < result["accuracy"] < 1


def test_released_files_are_memory_mapped(tmp_path, monkeypatch):
    stage(tmp_path / "CIFAR-10-C")
    modes = []
    real_load = np.load

    def load(path, *args, **kwargs):
        modes.append((Path(path).name, kwargs.get("mmap_mode")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(C.np, "load", load)
    corruption_accuracy(
        Brightness(),
        torch.zeros(2, 3, 32, 32),
        torch.tensor([1, 0]),
        root=tmp_path,
        corruptions=STAGED,
    )
    assert sorted(modes) == [("fog.npy", "r"), ("labels.npy", "r"), ("motion_blur.npy", "r")]


def test_a_parent_with_both_data_sets_needs_the_data_set_named(tmp_path):
    stage(tmp_path / "CIFAR-10-C")
    stage(tmp_path / "CIFAR-100-C", names=("fog",))
    args = (Brightness(), torch.zeros(2, 3, 32, 32), torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match="holds both CIFAR-10-C and CIFAR-100-C"):
        corruption_accuracy(*args, root=tmp_path, corruptions=("fog",))
    result = corruption_accuracy(*args, root=tmp_path, dataset="cifar100", corruptions=("fog",))
    assert result["source"] == "released"
    with pytest.raises(ConfigError, match="missing motion_blur.npy"):
        corruption_accuracy(*args, root=tmp_path, dataset="cifar100", corruptions=STAGED)


def test_missing_or_mismatched_files_are_one_line_config_errors(tmp_path):
    folder = stage(tmp_path / "CIFAR-10-C")
    args = (Brightness(), torch.zeros(2, 3, 32, 32), torch.tensor([1, 0]))
    (folder / "motion_blur.npy").unlink()
    with pytest.raises(ConfigError) as error:
        corruption_accuracy(*args, root=tmp_path, corruptions=STAGED)
    message = str(error.value)
    assert "\n" not in message and "motion_blur.npy" in message and str(folder) in message
    assert "extract the full CIFAR-10-C archive there" in message
    with pytest.raises(ConfigError, match="missing labels.npy") as error:
        corruption_accuracy(*args, root=tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="disagrees with the test labels at 2 of 2"):
        corruption_accuracy(*args[:2], torch.tensor([0, 1]), root=tmp_path, corruptions=("fog",))
    with pytest.raises(ConfigError, match="test index 6 is beyond the 6 images"):
        corruption_accuracy(*args, indices=[6, 0], root=tmp_path, corruptions=("fog",))


def test_generated_accuracy_of_a_constant_model_is_the_share_of_its_class(images):
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 0.0, 1.0]).expand(len(x), 3)

    labels = torch.tensor([2, 0, 2, 1, 2, 2])
    result = corruption_accuracy(
        Constant(), images, labels, corruptions=("gaussian_noise", "pixelate"), severities=(2, 5)
    )
    assert result["source"] == "generated"
    assert result["per_corruption"] == {
        "gaussian_noise": {2: 4 / 6, 5: 4 / 6},
        "pixelate": {2: 4 / 6, 5: 4 / 6},
    }
    assert result["accuracy"] == pytest.approx(4 / 6)


def test_generated_accuracy_uses_the_test_indices_and_no_gradients(images):
    model = Brightness().train()
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    subset = [4, 1, 5]
    progress = []
    result = corruption_accuracy(
        model,
        images[subset].float() / 255,
        labels[subset],
        indices=subset,
        corruptions=("brightness", "fog"),
        batch_size=2,
        seed=7,
        on_batch=lambda tag, done, total: progress.append((tag, done, total)),
    )
    assert model.training and model.calls and set(model.calls) == {(False, False)}
    for name in ("brightness", "fog"):
        for severity in range(1, 6):
            corrupted = corrupt(images, name, severity, seed=7)[subset].float() / 255
            predicted = (corrupted.flatten(1).mean(1) > 0.5).long()
            expected = (predicted == labels[subset]).double().mean().item()
            assert result["per_corruption"][name][severity] == pytest.approx(expected)
    table = [a for row in result["per_corruption"].values() for a in row.values()]
    assert result["accuracy"] == pytest.approx(sum(table) / 10)
    assert len(set(table)) > 1
    assert progress.count(("fog s3", 3, 3)) == 1 and ("brightness s1", 2, 3) in progress
