"""Training throughput of PreActResNet-18 on CIFAR-10-shaped data: fp32, bf16, channels_last,
torch.compile, through DeviceLoader (crop + flip) and samat's standard training step.

Each variant is timed over `repeats` stretches of `steps` steps after a warm-up; images/s is the
median stretch's, and the epoch time is extrapolated from it unless the stretches cover an epoch.
Peak memory is torch.cuda.max_memory_allocated over the variant, the resident data set included.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.clock import MEAN, STD, median, random_split, timed
from benchmarks.figures import Figure, Printer
from samat import methods, models
from samat.config import validate_run
from samat.data import DeviceLoader, Split
from samat.train import make_optimizer


@dataclass(frozen=True)
class Variant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool


VARIANTS = (
    Variant("fp32", amp=False, channels_last=False, compile=False),
    Variant("bf16", amp=True, channels_last=False, compile=False),
    Variant("bf16+channels_last", amp=True, channels_last=True, compile=False),
    Variant("bf16+channels_last+compile", amp=True, channels_last=True, compile=True),
)


@dataclass
class EpochSetup:
    device: torch.device
    model: str = "preact_resnet18"
    width: int | None = None
    images: int = 50_000
    image_size: int = 32
    channels: int = 3
    batch_size: int = 128
    warmup: int = 10
    steps: int = 50
    repeats: int = 3
    compile: bool = True


def _endless(loader: DeviceLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def measure(variant: Variant, split: Split, setup: EpochSetup) -> dict[str, Any]:
    """Images/s, extrapolated epoch seconds, compile seconds and peak memory of one variant."""
    device = setup.device
    cuda = device.type == "cuda"
    gc.collect()  # the previous variant's model and data set
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = models.create(
        setup.model,
        10,
        in_channels=setup.channels,
        image_size=setup.image_size,
        mean=(MEAN,) * setup.channels,
        std=(STD,) * setup.channels,
        width=setup.width,
    ).to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = validate_run({"method": {"name": "standard"}})
    method = methods.create(
        config.method, make_optimizer(config.train.optimizer, model), amp=variant.amp
    )
    stepped = torch.compile(model) if variant.compile else model
    loader = DeviceLoader(
        split,
        setup.batch_size,
        device=device,
        shuffle=True,
        crop_padding=4,
        flip=True,
        drop_last=True,
        channels_last=variant.channels_last,
    )
    batches = _endless(loader)
    model.train()

    def steps(count: int) -> None:
        for _ in range(count):
            method.step(stepped, *next(batches))

    first = timed(lambda: steps(1), device)
    timed(lambda: steps(max(setup.warmup - 1, 0)), device)
    stretches = [timed(lambda: steps(setup.steps), device) for _ in range(setup.repeats)]
    per_second = setup.steps * setup.batch_size / median(stretches)
    epoch_images = len(loader) * setup.batch_size
    out = {
        "images_per_second": per_second,
        "epoch_seconds": epoch_images / per_second,
        "epoch_extrapolated": setup.steps * setup.repeats < len(loader),
        "first_step_seconds": first,
        "compile_seconds": first if variant.compile else None,
        "stretch_seconds": stretches,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    return out


def run(setup: EpochSetup, printer: Printer) -> dict[str, Any]:
    """Every variant (compile where asked), printed as img/s, ratio to fp32, epoch s, memory."""
    if setup.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as samat's training outside deterministic mode
    split = random_split(setup.images, channels=setup.channels, size=setup.image_size)
    steps_per_epoch = setup.images // setup.batch_size
    printer.line(
        f"epoch: {setup.model} on {setup.images} random {setup.channels}x{setup.image_size}x"
        f"{setup.image_size} uint8 images through DeviceLoader (crop + flip), batch "
        f"{setup.batch_size}, standard training step, {setup.device}; {setup.warmup} warm-up "
        f"steps, then median of {setup.repeats} x {setup.steps} steps"
        + (
            f" (epoch time extrapolated from them: an epoch is {steps_per_epoch} steps)"
            if setup.steps * setup.repeats < steps_per_epoch
            else ""
        )
    )
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        if variant.compile and not setup.compile:
            results[variant.name] = {"skipped": "compile not asked for (--no-compile)"}
            printer.line(f"  {variant.name:28s} skipped (--no-compile)")
            continue
        try:
            row = measure(variant, split, setup)
        except Exception as error:  # a broken compile must not lose the other figures
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            results[variant.name] = {"error": f"{type(error).__name__}: {reason}"[:300]}
            printer.line(f"  {variant.name:28s} FAILED: {results[variant.name]['error']}")
            continue
        results[variant.name] = row
        base = results.get("fp32", {}).get("images_per_second")
        ratio = f"x{row['images_per_second'] / base:.2f} of fp32" if base else ""
        memory = row["peak_memory_bytes"]
        printer.line(
            f"  {variant.name:28s} {row['images_per_second']:10,.0f} img/s  {ratio:14s} epoch "
            f"{row['epoch_seconds']:7.2f} s"
            + (f"  peak {memory / 2**30:.2f} GiB" if memory is not None else "")
            + (
                f"  first step (compile) {row['compile_seconds']:.1f} s"
                if row["compile_seconds"] is not None
                else ""
            )
        )
    return {
        "setup": {k: str(v) for k, v in vars(setup).items()},
        "steps_per_epoch": steps_per_epoch,
        "variants": results,
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    """Per variant: images/s as a ratio to fp32, epoch seconds, peak memory, compile seconds."""
    rows = result["variants"]
    base = rows.get("fp32", {}).get("images_per_second")
    out = []
    for name, row in rows.items():
        if "images_per_second" not in row:
            failed = "error" in row
            text = "FAILED" if failed else "skipped"
            out.append(Figure(f"epoch {name}", None, text, "-", False if failed else None))
            continue
        speed = row["images_per_second"]
        if base and name != "fp32":
            out.append(Figure(f"epoch {name} img/s vs fp32", speed / base, f"x{speed / base:.2f}"))
        extrapolated = " (extrap.)" if row["epoch_extrapolated"] else ""
        out.append(
            Figure(
                f"epoch {name} s{extrapolated}",
                row["epoch_seconds"],
                f"{row['epoch_seconds']:.2f} ({speed:,.0f} img/s)",
            )
        )
        if row["peak_memory_bytes"] is not None:
            gib = row["peak_memory_bytes"] / 2**30
            out.append(Figure(f"epoch {name} peak memory GiB", gib, f"{gib:.2f}"))
        if row["compile_seconds"] is not None:
            compile_s = row["compile_seconds"]
            out.append(Figure(f"epoch {name} compile s", compile_s, f"{compile_s:.1f}"))
    return out
