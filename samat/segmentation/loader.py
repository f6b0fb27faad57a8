"""Batches of a segmentation split kept on the device, augmented per batch with one warp.

Scale, crop and flip are one affine map per example, so a batch is augmented by a single
`grid_sample` for the images (bilinear) and one for the masks (nearest), with the same grid:
image and mask stay aligned exactly, and whatever falls outside the source is black in the image
and ignored (255) in the mask.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from samat.segmentation.data import SegSplit
from samat.segmentation.loss import IGNORE_INDEX


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    crop_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each example by `scales[i]`, crop `crop_size` square at `offsets[i]`, maybe flip.

    images: float [B, C, H, W]; masks: uint8 or int64 [B, H, W]; scales [B]; offsets [B, 2]
    (row, column) of the crop's top-left corner in the scaled image's pixels, negative where the
    scaled image is smaller than the crop; flips bool [B] mirrors the crop left-right.
    Returns float images [B, C, T, T] and int64 masks [B, T, T].
    """
    b, _, h, w = images.shape
    t = crop_size
    theta = torch.zeros(b, 2, 3, dtype=torch.float32)
    # Output pixel j of the crop comes from scaled-image pixel offset + j, i.e. source pixel
    # (offset + j + 0.5) / scale - 0.5; written in grid_sample's [-1, 1] units (align_corners off).
    theta[:, 0, 0] = t / (scales * w) * torch.where(flips, -1.0, 1.0)
    theta[:, 0, 2] = (2 * offsets[:, 1] + t) / (scales * w) - 1
    theta[:, 1, 1] = t / (scales * h)
    theta[:, 1, 2] = (2 * offsets[:, 0] + t) / (scales * h) - 1
    grid = F.affine_grid(theta.to(images.device), [b, 1, t, t], align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", align_corners=False).clamp_(0, 1)
    # Masks shifted by one, so that the zeros grid_sample writes outside the source read as -1.
    shifted = masks[:, None].float() + 1
    sampled = F.grid_sample(shifted, grid, mode="nearest", align_corners=False)[:, 0].long() - 1
    return warped, torch.where(sampled < 0, IGNORE_INDEX, sampled)


class SegLoader:
    """Batches of one split kept on the device as uint8 tensors, like samat.data.DeviceLoader.

    With `scale_range`, `crop_size` or `flip` set, each training batch is warped: scale drawn
    uniformly from `scale_range`, a `crop_size` square at a uniform position (the scaled image
    placed at a uniform position inside the crop when smaller), left-right flip with
    probability 1/2. Order and augmentation depend only on (seed, epoch), drawn on the CPU, so
    a resumed run replays exactly the batches it would have seen, whatever the device.
    """

    def __init__(
        self,
        split: SegSplit,
        batch_size: int,
        *,
        device: torch.device | str,
        shuffle: bool,
        scale_range: tuple[float, float] | None = None,
        crop_size: int | None = None,
        flip: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.images = split.images.to(device)
        self.masks = split.masks.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.scale_range = scale_range
        self.crop_size = crop_size
        self.flip = flip
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last

    def __len__(self) -> int:
        n = len(self.masks)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def augments(self) -> bool:
        """Whether batches are warped (any of scale, crop or flip set)."""
        return self.scale_range is not None or self.crop_size is not None or self.flip

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float32 images in [0, 1] [B, 3, T, T], int64 masks [B, T, T]) for one epoch,
        from batch `start` on: a run resumed mid-epoch gets exactly the batches it had not seen.

        The batches before `start` still make their random draws (order, scale, offset, flip),
        so batch `start` onwards is bit-identical to an uninterrupted epoch; only their warp and
        copy are skipped.
        """
        key = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        n = len(self.masks)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for step, begin in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            index = order[begin : begin + self.batch_size]
            draws = self._draws(len(index), gen) if self.augments else None
            if step < start:
                continue
            images = self.images[index].float().div_(255)
            masks = self.masks[index]
            if draws is not None:
                images, masks = augment(images, masks, **draws)
            else:
                masks = masks.long()
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, masks

    def _draws(self, b: int, gen: torch.Generator) -> dict[str, torch.Tensor | int]:
        """One batch's scales, crop offsets and flips for `augment`, drawn in a fixed order.

        They depend only on the generator and the split's (fixed) image size, never on the
        images, so skipped batches can draw them without being read.
        """
        h, w = self.images.shape[-2:]
        crop = self.crop_size or h
        low, high = self.scale_range or (1.0, 1.0)
        scales = low + (high - low) * torch.rand(b, generator=gen)
        # Whole-pixel offsets in the scaled image; negative when it is smaller than the crop.
        extent = torch.stack([scales * h, scales * w], dim=1) - crop
        offsets = (torch.rand(b, 2, generator=gen) * extent).round()
        flips = torch.rand(b, generator=gen) < 0.5 if self.flip else torch.zeros(b, dtype=bool)
        return {"scales": scales, "offsets": offsets, "flips": flips, "crop_size": crop}
