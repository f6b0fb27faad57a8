"""Tiny data sets written in the exact released layouts, for tests and the tiny example grid.

Each class has its own colour (plus noise), so a pixel's class is learnable from the pixel and
its neighbours: a background, a horizon or objects drawn as rectangles, and ignored pixels where
the real data sets have them (Stanford's unknown regions, VOC's void borders around objects).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from samat.segmentation.data import STANFORD_CLASSES, VOC_CLASSES
from samat.segmentation.loss import IGNORE_INDEX

# One saturated colour per Stanford class, far apart in RGB.
STANFORD_COLOURS = np.array(
    [
        [70, 130, 230],  # sky
        [20, 110, 30],  # tree
        [120, 120, 120],  # road
        [120, 220, 60],  # grass
        [20, 40, 140],  # water
        [200, 60, 40],  # building
        [140, 90, 50],  # mountain
        [240, 200, 20],  # foreground
    ],
    dtype=np.int64,
)
_NOISE = 12


def voc_palette() -> list[int]:
    """VOC's 256-entry colour map (the devkit's bit-interleaving), flattened to 768 values."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def generate_stanford(root: Path | str, n_images: int, size: int, seed: int) -> Path:
    """Write `root/iccv09Data/` (images/*.jpg, labels/*.{regions,surfaces}.txt); returns it.

    Images are `size` wide and 3/4 of it high (every third one portrait), like the real ones.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "iccv09Data"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "labels").mkdir(parents=True, exist_ok=True)
    objects = [c for c in range(len(STANFORD_CLASSES)) if c not in (0, 3)]
    for i in range(n_images):
        short = size * 3 // 4
        h, w = (size, short) if i % 3 == 2 else (short, size)
        labels = np.full((h, w), 3, dtype=np.int64)  # grass below ...
        labels[: int(rng.integers(h // 4, h // 2 + 1))] = 0  # ... sky above a horizon
        for _ in range(int(rng.integers(1, 3))):
            _rectangle(labels, rng, int(rng.choice(objects)))
        _rectangle(labels, rng, -1, scale=0.25)  # an unknown region
        colours = np.where(labels[..., None] >= 0, STANFORD_COLOURS[labels], 128)
        stem = f"{1000 * (i + 1):07d}"
        _jpeg(colours, rng, base / "images" / f"{stem}.jpg")
        np.savetxt(base / "labels" / f"{stem}.regions.txt", labels, fmt="%d", delimiter=" ")
        # The real labels folder also holds geometric labels, which must not be mistaken for these.
        np.savetxt(base / "labels" / f"{stem}.surfaces.txt", labels * 0, fmt="%d", delimiter=" ")
    return base


def generate_voc(root: Path | str, n_train: int, n_val: int, size: int, seed: int) -> Path:
    """Write `root/VOCdevkit/VOC2012/` (JPEGImages, SegmentationClass, ImageSets); returns it.

    Images are `size` wide and 3/4 of it high (every third one portrait); masks are palette PNGs
    whose indices are class ids, each object ringed by a 2-pixel void (255) border as in VOC.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    colours = np.array(palette, dtype=np.int64).reshape(256, 3)
    colours[0] = [40, 40, 40]  # VOC's background is black in the palette; give the image texture
    names = [f"2008_{i + 1:06d}" for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        short = size * 3 // 4
        h, w = (size, short) if i % 3 == 2 else (short, size)
        labels = np.zeros((h, w), dtype=np.int64)
        for _ in range(int(rng.integers(1, 3))):
            _rectangle(labels, rng, int(rng.integers(1, len(VOC_CLASSES))), border=2)
        pixels = np.where(labels[..., None] == IGNORE_INDEX, colours[0], colours[labels])
        _jpeg(pixels, rng, base / "JPEGImages" / f"{name}.jpg")
        mask = Image.frombytes("P", (w, h), labels.astype(np.uint8).tobytes())
        mask.putpalette(palette)
        mask.save(base / "SegmentationClass" / f"{name}.png")
    # JPEGImages also holds the detection-only images, which no segmentation list names.
    _jpeg(np.zeros((8, 8, 3), dtype=np.int64), rng, base / "JPEGImages" / "2008_999999.jpg")
    lists = base / "ImageSets" / "Segmentation"
    lists.joinpath("train.txt").write_text("".join(f"{n}\n" for n in names[:n_train]))
    lists.joinpath("val.txt").write_text("".join(f"{n}\n" for n in names[n_train:]))
    lists.joinpath("trainval.txt").write_text("".join(f"{n}\n" for n in names))
    return base


def _rectangle(
    labels: np.ndarray, rng: np.random.Generator, value: int, scale: float = 0.5, border: int = 0
) -> None:
    """Paint a random rectangle (up to `scale` of each side) with `value`, ringed by void."""
    h, w = labels.shape
    rh = int(rng.integers(max(2, h // 6), max(3, int(h * scale)) + 1))
    rw = int(rng.integers(max(2, w // 6), max(3, int(w * scale)) + 1))
    y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    if border:
        labels[max(0, y - border) : y + rh + border, max(0, x - border) : x + rw + border] = (
            IGNORE_INDEX
        )
    labels[y : y + rh, x : x + rw] = value


def _jpeg(colours: np.ndarray, rng: np.random.Generator, path: Path) -> None:
    noisy = colours + rng.integers(-_NOISE, _NOISE + 1, size=colours.shape)
    pixels = np.clip(noisy, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
