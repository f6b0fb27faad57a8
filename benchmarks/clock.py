"""Synchronised wall-clock timing on CPU or CUDA, and the benchmarks' random CIFAR-shaped data."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from samat.data import Split

# The normalisation every benchmark model gets: random pixels have no data-set statistics.
MEAN, STD = 0.5, 0.25


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds that `work()` takes, the device synchronised before and after."""
    sync(device)
    began = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - began


def median(values: Sequence[float]) -> float:
    """The median; raises on an empty sequence, which would be a benchmark bug."""
    return statistics.median(values)


def random_split(
    count: int, *, channels: int = 3, size: int = 32, classes: int = 10, seed: int = 0
) -> Split:
    """`count` uint8 images of uniform noise with uniform labels (CIFAR-10's shape by default)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (count,), generator=gen)
    return Split(images, labels)


def random_batches(
    count: int,
    batch_size: int,
    *,
    device: torch.device,
    channels: int = 3,
    size: int = 32,
    classes: int = 10,
    channels_last: bool = False,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` float batches in [0, 1] on the device, as a training step receives them."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.rand(batch_size, channels, size, size, generator=gen).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, classes, (batch_size,), generator=gen).to(device)
        batches.append((images, labels))
    return batches
