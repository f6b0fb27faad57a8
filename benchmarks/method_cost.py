"""Training cost of each method relative to plain SGD, measured in one run (the papers: SAM ~2x,
PGD-10 AT ~11x). Prints images/s per method and the ratio to SGD.

    python benchmarks/method_cost.py [--model small_cnn] [--data digits] [--steps 30] [--device cpu]
    python benchmarks/method_cost.py --model preact_resnet18 --data synthetic --image-size 32 \
        --amp --channels-last
"""

from __future__ import annotations

import argparse
import time

import torch

from samat import methods, models
from samat.config import DataConfig, validate_run
from samat.data import DeviceLoader, load_dataset
from samat.train import make_optimizer

METHODS = {
    "SGD": {"name": "standard"},
    "SAM": {"name": "sam", "rho": 0.1},
    "FGSM-AT": {"name": "fgsm_at", "eps": 8 / 255},
    "PGD-10 AT": {"name": "pgd_at", "eps": 8 / 255, "steps": 10},
}


def images_per_second(method_cfg: dict, args: argparse.Namespace, device: torch.device) -> float:
    data = DataConfig(
        name=args.data, image_size=args.image_size, channels=3 if args.data == "synthetic" else 1
    )
    dataset = load_dataset(data)
    config = validate_run(
        {
            "method": method_cfg,
            "model": {"name": args.model},
            "train": {"amp": args.amp, "channels_last": args.channels_last},
        }
    )
    images = dataset.train.images
    model = models.create(
        args.model,
        dataset.num_classes,
        in_channels=images.shape[1],
        image_size=images.shape[-1],
        mean=dataset.mean,
        std=dataset.std,
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config.train.optimizer, model)
    method = methods.create(config.method, optimizer, amp=args.amp)
    loader = DeviceLoader(
        dataset.train,
        args.batch_size,
        device=device,
        shuffle=True,
        drop_last=True,
        channels_last=args.channels_last,
    )
    model.train()
    batches = [b for _, b in zip(range(args.steps + 3), _cycle(loader), strict=False)]
    for images, labels in batches[:3]:  # warm-up
        method.step(model, images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for images, labels in batches[3:]:
        method.step(model, images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - began)


def _cycle(loader: DeviceLoader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    speeds = {name: images_per_second(cfg, args, device) for name, cfg in METHODS.items()}
    print(
        f"{args.model} on {args.data}, batch {args.batch_size}, {device}, amp={args.amp}, "
        f"channels_last={args.channels_last}"
    )
    for name, speed in speeds.items():
        print(f"{name:10s} {speed:10.0f} img/s   cost x{speeds['SGD'] / speed:5.2f} of SGD")


if __name__ == "__main__":
    main()
