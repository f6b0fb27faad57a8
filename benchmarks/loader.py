"""samat's DeviceLoader against torchvision's per-image pipeline, images/s for one pass each.

Both produce the same batches: float images in [0, 1] on the device after RandomCrop(padding 4)
and a random horizontal flip. DeviceLoader keeps the uint8 split on the device and augments whole
batches there (copying the split to the device once is not timed); the DataLoader crops and flips
each image in Python, in 0 or more worker processes (their start-up is part of the one pass), and
copies each batch over.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from benchmarks.clock import random_split, timed
from benchmarks.figures import Figure, Printer, at_least
from samat.data import DeviceLoader, Split


class AugmentedTensors(TensorDataset):
    """A TensorDataset of uint8 images and labels, each image through a transform when read."""

    def __init__(self, split: Split, transform: Any) -> None:
        super().__init__(split.images, split.labels)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = super().__getitem__(index)
        return self.transform(image), label


def device_loader_pass(split: Split, device: torch.device, batch_size: int) -> float:
    """Seconds for one shuffled, augmented pass of DeviceLoader (after a two-batch warm-up)."""
    loader = DeviceLoader(
        split, batch_size, device=device, shuffle=True, crop_padding=4, flip=True, seed=0
    )
    for _, _ in zip(range(2), loader.epoch(1), strict=False):
        pass

    def one_pass() -> None:
        for _ in loader.epoch(0):
            pass

    return timed(one_pass, device)


def dataloader_pass(split: Split, device: torch.device, batch_size: int, workers: int) -> float:
    """Seconds for one pass of torchvision's RandomCrop + RandomHorizontalFlip in a DataLoader."""
    size = split.images.shape[-1]
    augment = transforms.Compose(
        [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()]
    )
    loader = DataLoader(
        AugmentedTensors(split, augment),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )

    def one_pass() -> None:
        for images, labels in loader:
            images = images.to(device, non_blocking=True).float().div_(255)
            labels = labels.to(device, non_blocking=True)

    return timed(one_pass, device)


def run(
    device: torch.device,
    printer: Printer,
    *,
    count: int = 10_000,
    batch_size: int = 128,
    workers: tuple[int, ...] = (0, 2),
) -> dict[str, Any]:
    """Images/s of each loader over `count` CIFAR-shaped images; printed as ratios too."""
    split = random_split(count)
    printer.line(
        f"loaders: one pass over {count} random 3x32x32 uint8 images, batch {batch_size}, "
        f"crop (padding 4) + flip, to {device}"
    )
    speeds = {"DeviceLoader": count / device_loader_pass(split, device, batch_size)}
    for n in workers:
        speeds[f"DataLoader w={n}"] = count / dataloader_pass(split, device, batch_size, n)
    ours = speeds["DeviceLoader"]
    for name, speed in speeds.items():
        ratio = "" if name == "DeviceLoader" else f"   DeviceLoader is x{ours / speed:.1f}"
        printer.line(f"  {name:16s} {speed:12,.0f} img/s{ratio}")
    return {"images": count, "batch_size": batch_size, "images_per_second": speeds}


def figures(result: dict[str, Any]) -> list[Figure]:
    """DeviceLoader's speed over each DataLoader's (target >= 1)."""
    speeds = result["images_per_second"]
    ours = speeds["DeviceLoader"]
    return [
        at_least(f"DeviceLoader / {name} img/s", ours / speed, 1.0, f"x{ours / speed:.1f}")
        for name, speed in speeds.items()
        if name != "DeviceLoader"
    ]
