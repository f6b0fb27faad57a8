"""Common corruptions (Hendrycks & Dietterich 2019): CIFAR-10-C / CIFAR-100-C accuracy.

Two sources. The released files, when a root holds them: `labels.npy` and one `<name>.npy` per
corruption, each 5 severities x 10,000 test images stacked (severity s in rows (s-1)*10,000 ..
s*10,000, uint8 [rows, 32, 32, 3]); only the rows of the evaluated test indices are read (memory
map). Otherwise the corruptions are generated here from the clean test images, batched in torch,
with the CIFAR parameters of the reference script (hendrycks/robustness,
ImageNet-C/create_c/make_cifar_c.py).

Generated corruptions are deterministic: the random draws of image i come from a generator keyed
by (seed, corruption, i), so an image's corruption is the same in any subset, batch or order, and
a severity changes only the parameters (the same noise, angle or crop at every severity, where
the reference draws afresh for each severity; each severity's distribution is the same). They
follow the reference's arithmetic operation for operation (float64, or float32 where it uses
float32, then `np.uint8(clip(x, 0, 1) * 255)`, which truncates; JPEG and pixelate through Pillow
as there), quirks included: glass blur's "swap" copies (a numpy view swap) and its offsets are -1
or 0 (`randint(-1, 1)`); zoom blur's `np.arange` gives 7, 12, 16, 21, 26 factors; elastic
transform at severity 1 is the affine part alone. Fed the same random numbers, the output equals
the reference code's (run with numpy 2, scipy, scikit-image 0.26, OpenCV 5, Pillow 13 and
ImageMagick 6.9.11 Q16 through Wand) byte for byte on 200 images at every severity for all but:
glass blur (0.1% of values off by 1 at severities 3 and 5) and elastic transform (< 0.5% off by
1), floating-point summation order; shot noise draws its Poisson counts with torch (same formula,
not compared); frost (below). The 2018 release ran older versions of those libraries. Where it
differs:

- random numbers come from torch generators, not numpy's global state, so no generated image is
  the released one pixel for pixel: the same distribution, other samples;
- motion blur (and the snow streaks): ImageMagick's MotionBlurImage re-implemented (one-sided
  Gaussian-weighted line of 2*ceil(radius)+1 taps at rounded offsets, edge pixels repeated,
  rounded to 16 bits then truncated to 8) instead of calling ImageMagick through Wand;
- frost: the reference blends crops of five frost photographs that this package does not ship;
  here five synthetic textures (ice needles over a smooth haze, made once from a fixed seed) with
  the per-channel mean and std of those photos after the reference's 0.2 resize. The blend
  weights are the reference's, but frost accuracy is not comparable with the released frost.npy.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from samat.attacks.kinds import CORRUPTION_NAMES
from samat.config import ConfigError

CORRUPTIONS: tuple[str, ...] = CORRUPTION_NAMES
SEVERITIES = (1, 2, 3, 4, 5)
# Folder names of the released archives, by the data set names of samat.config.DataConfig.
RELEASED_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
# Rows per severity in the released files (the 10,000 test images).
RELEASED_PER_SEVERITY = 10_000

_F64 = torch.float64
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Public API


def corrupt(
    images: torch.Tensor | np.ndarray,
    name: str,
    severity: int,
    *,
    seed: int,
    indices: Sequence[int] | torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Corrupt images [N, 3, H, W] (uint8, or float in [0, 1]) with `name` at `severity` (1-5).

    Returns the same dtype, shape and device. Float images are read on the 8-bit grid (rounded
    to k/255, as the corruptions are defined on 8-bit images) and come back as uint8 result / 255.
    `indices` (default 0..N-1) key each image's random draws, with `seed`: the same (seed, index)
    gives the same corruption whatever else is in the batch.
    """
    _check_name(name)
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity {severity!r} is not one of 1..5; use 1 to 5")
    x = torch.as_tensor(images)
    u8 = _uint8_grid(x)
    keys = _keys(seed, name, _index_list(indices, len(u8)))
    out = _generate(u8, name, [severity], keys)[severity] if len(u8) else u8.clone()
    if x.dtype == torch.uint8:
        return out.to(x.device)
    return (out.to(x.dtype) / 255).to(x.device)


def corruption_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    indices: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    root: str | Path | None = None,
    dataset: str | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    seed: int = 0,
    on_batch: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Accuracy (a fraction) under each corruption and severity, and their mean.

    `images` [N, 3, H, W] and `labels` [N] are the clean test images that are evaluated, and
    `indices` their positions in the full test set (default 0..N-1). With `root`, the released
    files are read (root is the CIFAR-10-C / CIFAR-100-C folder or its parent; `dataset`,
    'cifar10' or 'cifar100', picks the folder when the parent holds both) and their labels must
    match `labels`; without, the corruptions are generated from `images` with `seed`.
    Returns {"accuracy": mean over all (corruption, severity), "per_corruption":
    {name: {severity: accuracy}}, "source": "released" | "generated"}. The model runs in eval
    mode without gradients and gets its mode back; `on_batch(label, done, total)` reports
    progress, label as 'gaussian_noise s3'.
    """
    labels = torch.as_tensor(labels)
    if len(labels) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0), got {len(images)}, {len(labels)}")
    for name in corruptions:
        _check_name(name)
    for severity in severities:
        if severity not in SEVERITIES:
            raise ConfigError(f"corruption severity {severity!r} is not one of 1..5; use 1 to 5")
    if not corruptions or not severities:
        raise ValueError("need at least one corruption and one severity")
    index = np.asarray(_index_list(indices, len(labels)), dtype=np.int64)
    source = None if root is None else _Released(Path(root), dataset, list(corruptions))
    if source is not None:
        source.check(index, labels, tuple(images.shape[-2:]))
    device = _device(model)
    was_training = model.training
    model.eval()
    total = len(labels)
    table: dict[str, dict[int, float]] = {}
    try:
        with torch.no_grad():
            for name in corruptions:
                correct = dict.fromkeys(severities, 0)
                for start in range(0, total, batch_size):
                    stop = min(start + batch_size, total)
                    if source is not None:
                        batches = {s: source.rows(name, s, index[start:stop]) for s in severities}
                    else:
                        u8 = _uint8_grid(torch.as_tensor(images[start:stop]))
                        keys = _keys(seed, name, index[start:stop].tolist())
                        batches = _generate(u8, name, severities, keys)
                    y = labels[start:stop].to(device)
                    for severity, batch in batches.items():
                        x = (batch.float() / 255).to(device)
                        correct[severity] += (model(x).argmax(1) == y).sum().item()
                        if on_batch is not None:
                            on_batch(f"{name} s{severity}", stop, total)
                table[name] = {s: correct[s] / total for s in severities}
    finally:
        model.train(was_training)
    values = [acc for row in table.values() for acc in row.values()]
    return {
        "accuracy": sum(values) / len(values),
        "per_corruption": table,
        "source": "generated" if source is None else "released",
    }


# ---------------------------------------------------------------------------------------------
# Released files


class _Released:
    """The released .npy files of one data set, memory-mapped."""

    def __init__(self, root: Path, dataset: str | None, names: list[str]) -> None:
        self.base = _released_base(root, dataset)
        self.labels = np.load(self.base / "labels.npy", mmap_mode="r")
        rows = len(self.labels)
        if rows == 0 or rows % len(SEVERITIES):
            raise ConfigError(
                f"{self.base / 'labels.npy'} has {rows} labels, not 5 severities x the test set "
                f"({len(SEVERITIES) * RELEASED_PER_SEVERITY} in the release); download it again"
            )
        self.per_severity = rows // len(SEVERITIES)
        self.arrays: dict[str, np.ndarray] = {}
        for name in names:
            path = self.base / f"{name}.npy"
            if not path.is_file():
                raise ConfigError(
                    f"corruption root {self.base}: missing {path.name}; extract the full "
                    f"{self.base.name} archive there or fix the corruption root"
                )
            array = np.load(path, mmap_mode="r")
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ConfigError(
                    f"{path} holds {array.dtype} {list(array.shape)}, not uint8 [rows, H, W, 3]; "
                    "download it again"
                )
            if len(array) != rows:
                raise ConfigError(
                    f"{path} has {len(array)} rows but labels.npy has {rows}; "
                    "both must come from the same archive"
                )
            self.arrays[name] = array

    def check(self, index: np.ndarray, labels: torch.Tensor, size: tuple[int, int]) -> None:
        if index.min() < 0 or index.max() >= self.per_severity:
            raise ConfigError(
                f"test index {int(index.max())} is beyond the {self.per_severity} images per "
                f"severity in {self.base}; evaluate a subset of the same test set"
            )
        for name, array in self.arrays.items():
            if tuple(array.shape[1:3]) != size:
                raise ConfigError(
                    f"{self.base / name}.npy holds {array.shape[1]}x{array.shape[2]} images but "
                    f"the model's are {size[0]}x{size[1]}; point the root at this data set's files"
                )
        expected = labels.cpu().numpy().astype(np.int64)
        for severity in SEVERITIES:
            rows = (severity - 1) * self.per_severity + index
            found = np.asarray(self.labels[rows], dtype=np.int64)
            wrong = int((found != expected).sum())
            if wrong:
                raise ConfigError(
                    f"{self.base / 'labels.npy'} disagrees with the test labels at {wrong} of "
                    f"{len(index)} images (severity {severity}); the root holds another data "
                    "set's corruptions: point it at the matching CIFAR-10-C / CIFAR-100-C folder"
                )

    def rows(self, name: str, severity: int, index: np.ndarray) -> torch.Tensor:
        rows = (severity - 1) * self.per_severity + index
        order = np.argsort(rows, kind="stable")
        block = np.empty((len(rows), *self.arrays[name].shape[1:]), dtype=np.uint8)
        block[order] = self.arrays[name][rows[order]]  # sorted reads from the memory map
        return torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()


def _released_base(root: Path, dataset: str | None) -> Path:
    if dataset is not None and dataset not in RELEASED_FOLDERS:
        raise ConfigError(
            f"no released corruptions for data set {dataset!r}; known: "
            f"{', '.join(RELEASED_FOLDERS)} (or leave the root unset to generate them)"
        )
    if (root / "labels.npy").is_file():
        return root
    folders = [RELEASED_FOLDERS[dataset]] if dataset else list(RELEASED_FOLDERS.values())
    found = [root / f for f in folders if (root / f / "labels.npy").is_file()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(
            f"corruption root {root} holds both {' and '.join(folders)}; name the data set "
            "(cifar10 or cifar100) or point the root at one folder"
        )
    expected = " or ".join(str(root / f / "labels.npy") for f in ["", *folders])
    raise ConfigError(
        f"corruption root {root}: missing labels.npy (expected {expected}); extract "
        f"{'/'.join(folders)} there, fix the root, or leave it unset to generate the corruptions"
    )


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")


def _index_list(indices, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    values = torch.as_tensor(indices).flatten().tolist()
    if len(values) != n:
        raise ValueError(f"need one index per image: {len(values)} indices for {n} images")
    return [int(v) for v in values]


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter((*model.parameters(), *model.buffers())), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """uint8 images on the CPU; float images in [0, 1] rounded to the 8-bit grid."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] RGB, got {list(x.shape)}")
    if x.dtype == torch.uint8:
        return x.detach().cpu()
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError("float images must lie in [0, 1]")
    return (x.detach().cpu().double() * 255).round().to(torch.uint8)


def _splitmix(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _keys(seed: int, name: str, indices: list[int]) -> list[int]:
    base = _splitmix(_splitmix(seed & _MASK64) ^ (CORRUPTIONS.index(name) + 1))
    return [_splitmix(base ^ (i & _MASK64)) >> 1 for i in indices]  # 63 bits: manual_seed's range


def _draw(keys: list[int], make: Callable[[torch.Generator], tuple]) -> list[torch.Tensor]:
    """Per-image random draws, each from a generator seeded with the image's key, stacked."""
    generator = torch.Generator()
    parts = []
    for key in keys:
        generator.manual_seed(key)
        parts.append(make(generator))
    return [torch.stack(column) for column in zip(*parts, strict=True)]


def _generate(
    u8: torch.Tensor, name: str, severities: Sequence[int], keys: list[int]
) -> dict[int, torch.Tensor]:
    """One corruption at several severities; the random draws are made once and shared."""
    draw, apply = _CORRUPTIONS[name]
    draws = [] if draw is None else _draw(keys, lambda g: draw(g, tuple(u8.shape[1:])))
    return {severity: apply(u8, severity, *draws) for severity in severities}


def _unit(u8: torch.Tensor) -> torch.Tensor:
    return u8.to(_F64) / 255.0


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    """The reference's `np.uint8(np.clip(x, 0, 1) * 255)`: truncation, not rounding."""
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def _reflect(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer positions i on an axis of length n into 0..n-1.

    nearest: edge repeated (aaa|abcd|ddd); symmetric: scipy's 'reflect' (cba|abcd|dcb);
    mirror: OpenCV's REFLECT_101 and torch's 'reflect' (dcb|abcd|cba).
    """
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        i = i % (2 * n)
        return torch.where(i < n, i, 2 * n - 1 - i)
    i = i % (2 * n - 2)
    return torch.where(i < n, i, 2 * n - 2 - i)


def _pad_index(n: int, before: int, after: int, mode: str) -> torch.Tensor:
    return _reflect(torch.arange(-before, n + after), n, mode)


def _filter1d(x: torch.Tensor, weights: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """Correlate the last-but-one (dim=-2) or last (dim=-1) axis with odd-length weights."""
    r = (len(weights) - 1) // 2
    n = x.shape[dim]
    padded = x.index_select(dim, _pad_index(n, r, r, mode))
    out = torch.zeros_like(x)
    for k, w in enumerate(weights.tolist()):
        out += w * padded.narrow(dim, k, n)
    return out


def _gaussian_weights(sigma: float, truncate: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter1d's kernel (skimage.filters.gaussian uses it)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=_F64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _gaussian(x: torch.Tensor, sigma: float, mode: str, truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian over the two last axes (scipy: nearest = 'nearest')."""
    if sigma <= 1e-15:
        return x
    w = _gaussian_weights(sigma, truncate)
    return _filter1d(_filter1d(x, w, -2, mode), w, -1, mode)


def _bilinear(
    image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str
) -> torch.Tensor:
    """Sample image [N, C, H, W] at float coordinates rows/cols [N, H', W'] (bilinear).

    Each of the four neighbours' integer index is mapped into the image by `mode`, as OpenCV's
    remap (mirror = REFLECT_101) and scipy's map_coordinates (order 1, symmetric = 'reflect') do.
    """
    n, c, h, w = image.shape
    r0, c0 = rows.floor(), cols.floor()
    fr = (rows - r0).unsqueeze(1).to(image.dtype)
    fc = (cols - c0).unsqueeze(1).to(image.dtype)
    r0, c0 = r0.long(), c0.long()
    flat = image.reshape(n, c, h * w)
    row_index = [_reflect(r0 + k, h, mode) * w for k in (0, 1)]
    col_index = [_reflect(c0 + k, w, mode) for k in (0, 1)]

    def at(dr: int, dc: int) -> torch.Tensor:
        idx = (row_index[dr] + col_index[dc]).reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, idx).reshape(n, c, *rows.shape[1:])

    top = at(0, 0) * (1 - fc) + at(0, 1) * fc
    bottom = at(1, 0) * (1 - fc) + at(1, 1) * fc
    return top * (1 - fr) + bottom * fr


def _zoom_align_corners(x: torch.Tensor, size: int) -> torch.Tensor:
    """scipy.ndimage.zoom(order=1) of the two last axes to size x size (grid_mode=False).

    scipy interpolates in float64 whatever the input type, and returns the input's type.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    zoomed = F.interpolate(x.to(_F64), size=(size, size), mode="bilinear", align_corners=True)
    return zoomed.to(x.dtype)


def _clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The reference's clipped_zoom on [N, C, H, H]: zoom the centre crop, trim to H."""
    h = x.shape[-1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    zoomed = _zoom_align_corners(x[..., top : top + ch, top : top + ch], round(ch * factor))
    trim = (zoomed.shape[-1] - h) // 2
    return zoomed[..., trim : trim + h, trim : trim + h]


def _motion_kernel(radius: float, sigma: float) -> torch.Tensor:
    """ImageMagick's MotionBlurImage weights: a one-sided Gaussian over 2*ceil(radius)+1 taps."""
    width = int(2 * math.ceil(radius) + 1)
    i = torch.arange(width, dtype=_F64)
    w = torch.exp(-(i * i) / (2 * sigma * sigma))
    return w / w.sum()


def _motion_blur_u8(u8: torch.Tensor, radius: float, sigma: float, angle: torch.Tensor):
    """ImageMagick's MotionBlurImage on uint8 [N, C, H, W], angle in degrees [N].

    Tap i reads the pixel at (x + round(i cos a), y + round(i sin a)) (ceil(v - 0.5) rounding),
    beyond the border the edge pixel (ImageMagick's default virtual pixels); the sum is rounded
    to 16 bits (Q16), then truncated to 8 bits, as ImageMagick 6.9.11's PNG round trip does.
    """
    weights = _motion_kernel(radius, sigma)
    n, c, h, w = u8.shape
    image = u8.to(_F64)
    rad = torch.deg2rad(angle.to(_F64))
    taps = torch.arange(len(weights), dtype=_F64)
    dx = torch.ceil(taps[None] * torch.cos(rad)[:, None] - 0.5).long()  # [N, taps]
    dy = torch.ceil(taps[None] * torch.sin(rad)[:, None] - 0.5).long()
    ys, xs = torch.arange(h), torch.arange(w)
    flat = image.reshape(n, c, h * w)
    total = torch.zeros_like(image)
    for k, weight in enumerate(weights.tolist()):
        yy = (ys[None, :] + dy[:, k : k + 1]).clamp(0, h - 1)  # [N, H]
        xx = (xs[None, :] + dx[:, k : k + 1]).clamp(0, w - 1)  # [N, W]
        idx = (yy[:, :, None] * w + xx[:, None, :]).reshape(n, 1, -1).expand(n, c, -1)
        total += weight * flat.gather(2, idx).reshape(n, c, h, w)
    quantum = torch.floor(total * 257 + 0.5).clamp(0, 65535)
    return torch.floor(quantum / 257).to(torch.uint8)


def _correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate each channel of x [N, C, H, W] with an odd square kernel (cv2.filter2D)."""
    r = (kernel.shape[0] - 1) // 2
    h, w = x.shape[-2:]
    padded = x[..., _pad_index(h, r, r, mode), :][..., _pad_index(w, r, r, mode)]
    out = torch.zeros_like(x)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            if kernel[i, j] != 0:
                out += kernel[i, j].item() * padded[..., i : i + h, j : j + w]
    return out


# ---------------------------------------------------------------------------------------------
# The corruptions. Each is (draw, apply): draw(generator, (C, H, W)) -> one image's random
# draws (None: deterministic); apply(u8 [N, 3, H, W], severity, *stacked draws) -> uint8.
# Parameters per severity are those of make_cifar_c.py.


def _gaussian_noise_draw(g, shape):
    return (torch.randn(shape, generator=g),)


def _gaussian_noise(u8, severity, noise):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return _to_u8(_unit(u8) + noise.to(_F64) * c)


def _shot_noise_draw(g, shape):
    return (torch.randint(0, 2**62, (), generator=g),)


def _shot_noise(u8, severity, seeds):
    c = [500, 250, 100, 75, 50][severity - 1]
    generator = torch.Generator()
    counts = []
    for rate, key in zip(_unit(u8) * c, seeds.tolist(), strict=True):
        generator.manual_seed(key)
        counts.append(torch.poisson(rate, generator=generator))
    return _to_u8(torch.stack(counts) / c)


def _impulse_noise_draw(g, shape):
    return (torch.rand((2, *shape), generator=g),)


def _impulse_noise(u8, severity, u):
    # skimage.util.random_noise(mode='s&p', amount=c): each value flips with probability c, to 1
    # or to 0 with probability 1/2 each.
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    x = _unit(u8)
    flipped = u[:, 0] < c
    salt = u[:, 1] < 0.5
    x = torch.where(flipped & salt, torch.ones_like(x), x)
    x = torch.where(flipped & ~salt, torch.zeros_like(x), x)
    return _to_u8(x)


@lru_cache(maxsize=8)
def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The reference's disk(): an aliased disk on a 17x17 grid, blurred by a 3x3 Gaussian.

    In float32 as there (cv2.GaussianBlur on a float32 array, border REFLECT_101), which
    decides whether the kernel sums to just under or just over 1.
    """
    half = 8  # the reference's grid for radius <= 8 (all CIFAR severities)
    grid = torch.arange(-half, half + 1, dtype=_F64)
    disk = ((grid[None, :] ** 2 + grid[:, None] ** 2) <= radius**2).to(torch.float32)
    disk = disk / disk.sum()
    taps = torch.tensor([-1.0, 0.0, 1.0], dtype=_F64)
    g = torch.exp(-(taps**2) / (2 * alias_blur**2))
    g = (g * (1 / g.sum())).to(torch.float32)  # cv2.getGaussianKernel(3, alias_blur)
    kernel = _filter1d(_filter1d(disk, g, -1, "mirror"), g, -2, "mirror").to(_F64)
    # Crop the all-zero margin (it adds nothing to a correlation).
    used = kernel.abs().sum(0).nonzero()
    r = int(max(half - used.min().item(), used.max().item() - half))
    return kernel[half - r : half + r + 1, half - r : half + r + 1]


def _defocus_blur(u8, severity):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    # cv2.filter2D on each channel, border REFLECT_101
    return _to_u8(_correlate2d(_unit(u8), _disk(radius, alias), "mirror"))


def _glass_blur_draw(g, shape):
    # np.random.randint(-1, 1, size=2) per position: dx, dy in {-1, 0}; two iterations' worth
    # (severities 4 and 5 run two), shared by all severities.
    _, h, w = shape
    return (torch.randint(-1, 1, (2, h - 2, w - 2, 2), generator=g),)


def _glass_blur(u8, severity, shifts):
    sigma, iterations = [(0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2)][severity - 1]
    return _glass_from_shifts(u8, sigma, shifts[:, :iterations])


def _glass_from_shifts(u8: torch.Tensor, sigma: float, shifts: torch.Tensor) -> torch.Tensor:
    """Glass blur (max_delta 1) with shifts [N, iterations, H - 2, W - 2, (dx, dy)] in {-1, 0}.

    The reference loops h, w from size - 1 down to 2 and runs `x[h, w], x[h', w'] = x[h', w'],
    x[h, w]` on numpy views, which copies x[h', w'] into x[h, w] (it does not swap). As the
    shifts are -1 or 0 and the loops descend, every read is of a pixel not yet written, so an
    iteration is one gather: x[h, w] <- x[h + dy, w + dx] for h, w in 2 .. size - 1.
    """
    n, _, h, w = u8.shape
    x = _to_u8(_gaussian(_unit(u8), sigma, "nearest"))
    rows = torch.arange(2, h)[None, :, None]
    cols = torch.arange(2, w)[None, None, :]
    batch = torch.arange(n)[:, None, None]
    for it in range(shifts.shape[1]):
        dx, dy = shifts[:, it, ..., 0], shifts[:, it, ..., 1]
        source = x[batch, :, rows + dy, cols + dx]  # [N, H - 2, W - 2, C]
        x = x.clone()
        x[batch, :, rows.expand_as(dy), cols.expand_as(dx)] = source
    return _to_u8(_gaussian(_unit(x), sigma, "nearest"))


def _angle_draw(low: float):
    return lambda g, shape: (low + 90 * torch.rand((), generator=g, dtype=_F64),)


def _motion_blur(u8, severity, angle):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    return _motion_blur_u8(u8, radius, sigma, angle)


@lru_cache(maxsize=8)
def _zoom_factors(severity: int) -> tuple[float, ...]:
    stop = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    # np.arange as there: 7, 12, 16, 21, 26 factors (rounding puts the stop into the first two)
    return tuple(np.arange(1, stop, 0.01).tolist())


def _zoom_blur(u8, severity):
    x = _unit(u8).float()  # float32 throughout there
    out = torch.zeros_like(x)
    factors = _zoom_factors(severity)
    for factor in factors:
        out += _clipped_zoom(x, factor)
    return _to_u8((x + out) / (len(factors) + 1))


def _snow_draw(g, shape):
    _, h, w = shape
    return torch.randn((1, h, w), generator=g), -135 + 90 * torch.rand((), generator=g, dtype=_F64)


def _snow(u8, severity, normal, angle):
    loc, scale, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][severity - 1]
    layer = _clipped_zoom(normal.to(_F64) * scale + loc, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = _motion_blur_u8(_to_u8(layer), radius, sigma, angle).to(_F64) / 255
    x = u8.float() / 255  # float32 there
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # cv2 RGB2GRAY
    x = blend * x + (1 - blend) * torch.maximum(x, gray * 1.5 + 0.5)
    return _to_u8(x.to(_F64) + layer + layer.flip(-1, -2))  # np.rot90(layer, k=2)


# Per-channel (RGB) mean and std, 0..255, of the reference's frost1..frost5 after its 0.2 resize
# (frost3 is the same photograph as frost2; the CIFAR script never picks frost6).
_FROST_STATS = (
    ((77.5, 149.0, 165.7), (26.8, 16.4, 15.3)),
    ((200.8, 205.4, 214.5), (21.4, 22.1, 22.6)),
    ((200.8, 205.4, 214.5), (21.4, 22.1, 22.6)),
    ((137.7, 152.9, 165.3), (27.8, 27.8, 29.2)),
    ((112.3, 123.3, 134.7), (44.3, 43.2, 41.6)),
)
_FROST_SEED = 20190328


@lru_cache(maxsize=4)
def _frost_textures(h: int, w: int) -> torch.Tensor:
    """Five synthetic frost textures, uint8 [5, 3, 3h, 4w], the same on every call.

    Each: short bright needles (ice crystals) at orientations that vary smoothly over the
    texture, drawn with anti-aliasing, over a smooth haze; then scaled per channel to the mean
    and std of the matching frost photograph. Their pixel-scale roughness (mean absolute
    neighbour difference / std, 0.5-0.7) is about that of the resized photographs.
    """
    rng = np.random.default_rng(_FROST_SEED)
    th, tw = 3 * h, 4 * w
    textures = []
    for mean, std in _FROST_STATS:
        haze = _smooth_noise(rng, th, tw, 6.0)
        orientation = np.pi * _smooth_noise(rng, th, tw, 10.0)
        count = th * tw // 3
        cy, cx = rng.uniform(0, th, count), rng.uniform(0, tw, count)
        angle = orientation[cy.astype(int), cx.astype(int)] + rng.normal(0, 0.5, count)
        length = rng.exponential(3.0, count) + 1.0
        bright = rng.uniform(0.3, 1.0, count)
        needles = np.zeros((th, tw))
        for t in np.linspace(-0.5, 0.5, 9):
            y = cy + t * length * np.sin(angle)
            x = cx + t * length * np.cos(angle)
            y0, x0 = np.floor(y), np.floor(x)
            fy, fx = y - y0, x - x0
            corners = ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx))
            corners += ((1, 0, fy * (1 - fx)), (1, 1, fy * fx))
            for oy, ox, weight in corners:
                at = ((y0 + oy).astype(int) % th, (x0 + ox).astype(int) % tw)
                np.add.at(needles, at, weight * bright)
        pattern = _standard(_standard(np.minimum(needles, 2.0)) + 0.6 * haze)
        rgb = np.stack([m + s * pattern for m, s in zip(mean, std, strict=True)])
        textures.append(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(textures))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    noise = torch.from_numpy(rng.standard_normal((h, w)))
    return _standard(_gaussian(noise, sigma, "symmetric").numpy())


def _standard(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-12)


def _frost_draw(g, shape):
    return (torch.rand(3, generator=g, dtype=_F64),)


def _frost(u8, severity, u):
    c0, c1 = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    h, w = u8.shape[-2:]
    textures = _frost_textures(h, w)
    th, tw = textures.shape[-2:]
    # np.random.randint(5) picks the texture, then randint(0, size - 32) the crop's corner.
    pick = (u[:, 0] * len(textures)).long()
    top = (u[:, 1] * (th - h)).long()
    left = (u[:, 2] * (tw - w)).long()
    rows = (top[:, None] + torch.arange(h)[None])[:, :, None]
    cols = (left[:, None] + torch.arange(w)[None])[:, None, :]
    crops = textures[pick[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [N, 3, h, w]
    return (c0 * u8.to(_F64) + c1 * crops.to(_F64)).clamp(0, 255).to(torch.uint8)


def _plasma_size(h: int, w: int) -> int:
    return max(2, 1 << (max(h, w) - 1).bit_length())  # 32 for CIFAR, as there


def _plasma_draws(mapsize: int) -> int:
    total, step = 0, mapsize
    while step >= 2:
        total += 3 * (mapsize // step) ** 2
        step //= 2
    return total


def _plasma_fractal(uniform: torch.Tensor, mapsize: int, decay: float) -> torch.Tensor:
    """The reference's plasma_fractal (diamond-square), batched: uniform [N, draws] in [0, 1)."""
    n = len(uniform)
    a = torch.zeros(n, mapsize, mapsize, dtype=_F64)
    step, wibble, used = mapsize, 100.0, 0

    def wibbled(values: torch.Tensor) -> torch.Tensor:
        nonlocal used
        k = values[0].numel()
        u = uniform[:, used : used + k].reshape(values.shape).to(_F64)
        used += k
        # array / 4 + wibble * np.random.uniform(-wibble, wibble, shape)
        return values / 4 + wibble * (-wibble + 2 * wibble * u)

    while step >= 2:
        half = step // 2
        corner = a[:, 0::step, 0::step]
        square = corner + corner.roll(-1, 1)
        square = square + square.roll(-1, 2)
        a[:, half::step, half::step] = wibbled(square)
        dr = a[:, half::step, half::step]
        ul = a[:, 0::step, 0::step]
        a[:, 0::step, half::step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        a[:, half::step, 0::step] = wibbled(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    a = a - a.amin((1, 2), keepdim=True)
    return a / a.amax((1, 2), keepdim=True)


def _fog_draw(g, shape):
    _, h, w = shape
    return (torch.rand(_plasma_draws(_plasma_size(h, w)), generator=g),)


def _fog(u8, severity, uniform):
    c0, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    h, w = u8.shape[-2:]
    fractal = _plasma_fractal(uniform, _plasma_size(h, w), decay)[:, None, :h, :w]
    x = _unit(u8)
    top = x.amax((1, 2, 3), keepdim=True)
    return _to_u8((x + c0 * fractal) * top / (top + c0))


def _brightness(u8, severity):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    h, s, v = _rgb_to_hsv(_unit(u8))
    return _to_u8(_hsv_to_rgb(h, s, (v + c).clamp(0, 1)))


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """skimage.color.rgb2hsv on [N, 3, H, W], operation for operation."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(1)
    delta = v - x.amin(1)
    s = torch.where(v == 0, torch.zeros_like(v), delta / torch.where(v == 0, 1, v))
    safe = torch.where(delta == 0, 1, delta)
    h = torch.where(b == v, 4 + (r - g) / safe, torch.zeros_like(v))
    h = torch.where(g == v, 2 + (b - r) / safe, h)
    h = torch.where(r == v, (g - b) / safe, h)
    h = torch.remainder(h / 6, 1.0)
    return torch.where(delta == 0, torch.zeros_like(h), h), s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """skimage.color.hsv2rgb, from [N, H, W] planes to [N, 3, H, W]."""
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = sector.long() % 6
    options = torch.stack(
        [
            torch.stack(rgb, 1)
            for rgb in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
        ]
    )  # [6, N, 3, H, W]
    index = sector[None, :, None].expand(1, -1, 3, -1, -1)
    return options.gather(0, index)[0]


def _contrast(u8, severity):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    x = _unit(u8)
    means = x.mean((2, 3), keepdim=True)
    return _to_u8((x - means) * c + means)


def _elastic_draw(g, shape):
    _, h, w = shape
    return torch.rand((3, 2), generator=g, dtype=_F64), torch.rand((2, h, w), generator=g)


def _elastic_transform(u8, severity, affine_u, field_u):
    size = min(u8.shape[-2:])  # IMSIZE there (32)
    amplitude, smooth, jitter = [
        (size * 0, size * 0, size * 0.08),
        (size * 0.05, size * 0.2, size * 0.07),
        (size * 0.08, size * 0.06, size * 0.06),
        (size * 0.1, size * 0.04, size * 0.05),
        (size * 0.1, size * 0.03, size * 0.03),
    ][severity - 1]
    return _elastic_from_draws(u8, amplitude, smooth, jitter, affine_u, field_u)


def _elastic_from_draws(u8, amplitude, smooth, jitter, affine_u, field_u):
    """Elastic transform from uniform draws in [0, 1): affine_u [N, 3, 2], field_u [N, 2, H, W]."""
    n, _, h, w = u8.shape
    # Three points (x, y) moved by uniform(-jitter, jitter) (float32 there) define the affine map.
    center = torch.tensor([w // 2, h // 2], dtype=_F64)
    square = min(h, w) // 3
    corner = torch.stack([center[0] + square, center[1] - square])
    src = torch.stack([center + square, corner, center - square])
    shift = (-jitter + 2 * jitter * affine_u).to(torch.float32)
    dst = (src.to(torch.float32) + shift).to(_F64)
    # cv2.warpAffine reads the source at M^-1 (x, y): solve dst -> src directly.
    ones = torch.ones(n, 3, 1, dtype=_F64)
    inverse = torch.linalg.solve(torch.cat([dst, ones], 2), src.expand(n, 3, 2))  # [N, 3, 2]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=_F64), torch.arange(w, dtype=_F64), indexing="ij")
    grid = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(-1, 3)
    coords = grid @ inverse
    sx, sy = coords[..., 0].reshape(n, h, w), coords[..., 1].reshape(n, h, w)
    x = _bilinear(u8.float() / 255, sy, sx, "mirror")  # float32 there
    # gaussian(uniform(-1, 1), smooth, mode='reflect', truncate=3) * amplitude, float32 there
    field = _gaussian(field_u.to(_F64) * 2 - 1, smooth, "symmetric", truncate=3.0) * amplitude
    field = field.to(torch.float32).to(_F64)
    x = _bilinear(x, yy + field[:, 1], xx + field[:, 0], "symmetric")  # (row + dy, col + dx)
    return _to_u8(x)


def _per_image_pil(u8: torch.Tensor, apply: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    arrays = u8.permute(0, 2, 3, 1).contiguous().numpy()
    out = np.stack([np.asarray(apply(Image.fromarray(a)), dtype=np.uint8) for a in arrays])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _pixelate(u8, severity):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = u8.shape[-2:]
    small = (int(w * c), int(h * c))
    return _per_image_pil(u8, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def _jpeg_compression(u8, severity):
    quality = [80, 65, 58, 50, 40][severity - 1]

    def apply(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer).convert("RGB")

    return _per_image_pil(u8, apply)


_CORRUPTIONS: dict[str, tuple[Callable | None, Callable]] = {
    "gaussian_noise": (_gaussian_noise_draw, _gaussian_noise),
    "shot_noise": (_shot_noise_draw, _shot_noise),
    "impulse_noise": (_impulse_noise_draw, _impulse_noise),
    "defocus_blur": (None, _defocus_blur),
    "glass_blur": (_glass_blur_draw, _glass_blur),
    "motion_blur": (_angle_draw(-45), _motion_blur),
    "zoom_blur": (None, _zoom_blur),
    "snow": (_snow_draw, _snow),
    "frost": (_frost_draw, _frost),
    "fog": (_fog_draw, _fog),
    "brightness": (None, _brightness),
    "contrast": (None, _contrast),
    "elastic_transform": (_elastic_draw, _elastic_transform),
    "pixelate": (None, _pixelate),
    "jpeg_compression": (None, _jpeg_compression),
}
