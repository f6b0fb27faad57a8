"""fp32 against bf16 autocast on a small real run: accuracy difference and cost ratio.

The paper grids train in fp32, as the authors did; `train.amp: bf16` is a choice to measure, not a
default. This trains small_cnn (width 16) on scikit-learn's digits with SAM (rho 0.05) in both
precisions for the same seeds, and reports clean and PGD-10 accuracy (l_inf 0.1) per precision,
their difference, and bf16's training time over fp32's (docs/fidelity.md quotes one run).

    python -m benchmarks.precision                # 3 seeds, 10 epochs, CPU, one thread
    python -m benchmarks.precision --epochs 2 --seeds 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.clock import sync
from samat import attacks, methods, models
from samat.config import AttackSpec, validate_run
from samat.data import DeviceLoader, load_dataset
from samat.evaluate import clean_accuracy
from samat.train import make_optimizer


def train_once(device: torch.device, amp: str, seed: int, epochs: int) -> dict[str, float]:
    """One SAM run on digits in `amp` ('off' or 'bf16'): seconds of training, clean and robust
    accuracy on the 360 test images (evaluated in fp32 either way)."""
    config = validate_run(
        {
            "data": {"name": "digits"},
            "model": {"name": "small_cnn", "width": 16},
            "method": {"name": "sam", "rho": 0.05},
            "train": {"batch_size": 64, "amp": amp, "optimizer": {"name": "sgd", "lr": 0.05}},
            "seed": seed,
        }
    )
    dataset = load_dataset(config.data)
    torch.manual_seed(seed)
    model = models.create(
        "small_cnn",
        dataset.num_classes,
        in_channels=dataset.train.images.shape[1],
        image_size=dataset.train.images.shape[-1],
        mean=dataset.mean,
        std=dataset.std,
        width=16,
    ).to(device)
    method = methods.create(
        config.method, make_optimizer(config.train.optimizer, model), amp=config.train.amp
    )
    loader = DeviceLoader(dataset.train, 64, device=device, shuffle=True, seed=seed)
    model.train()
    sync(device)
    began = time.perf_counter()
    for epoch in range(epochs):
        for images, labels in loader.epoch(epoch):
            method.step(model, images, labels)
    sync(device)
    seconds = time.perf_counter() - began
    model.eval()
    test = DeviceLoader(dataset.test, 360, device=device, shuffle=False)
    correct, total = clean_accuracy(model, test)
    spec = AttackSpec(attack="pgd", norm="linf", eps=0.1, steps=10)
    images = dataset.test.images.to(device).float().div(255)
    (robust,) = attacks.evaluate(
        model,
        images,
        dataset.test.labels.to(device),
        [spec],
        batch_size=360,
        num_classes=10,
        seed=0,
    ).values()
    return {"seconds": seconds, "clean": correct / total, "robust": robust}


def run(device: torch.device, *, seeds: int = 3, epochs: int = 10) -> dict[str, Any]:
    """Both precisions on seeds 0..seeds-1, interleaved so that load on the machine hits both."""
    runs: dict[str, list[dict[str, float]]] = {"off": [], "bf16": []}
    for seed in range(seeds):
        for amp in runs:
            runs[amp].append(train_once(device, amp, seed, epochs))

    def mean(amp: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[amp])

    return {
        "device": str(device),
        "seeds": seeds,
        "epochs": epochs,
        "runs": runs,
        **{f"{k}_{amp}": mean(amp, k) for amp in runs for k in ("clean", "robust", "seconds")},
        "clean_diff": mean("bf16", "clean") - mean("off", "clean"),
        "robust_diff": mean("bf16", "robust") - mean("off", "robust"),
        "cost_ratio": mean("bf16", "seconds") / mean("off", "seconds"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(torch.device(args.device), seeds=args.seeds, epochs=args.epochs)
    print(
        f"SAM rho 0.05, small_cnn/16, digits, {result['epochs']} epochs, {result['seeds']} seeds, "
        f"{result['device']}, torch {torch.__version__}"
    )
    for amp in ("off", "bf16"):
        per_seed = ", ".join(f"{r['clean']:.4f}/{r['robust']:.4f}" for r in result["runs"][amp])
        print(
            f"  {amp:>4}: clean {result[f'clean_{amp}']:.4f}, PGD-10 {result[f'robust_{amp}']:.4f}"
            f" (per seed {per_seed}), {result[f'seconds_{amp}']:.2f} s a run"
        )
    print(
        f"  bf16 - fp32: clean {100 * result['clean_diff']:+.2f} points, PGD-10 "
        f"{100 * result['robust_diff']:+.2f} points; cost bf16 / fp32 x{result['cost_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
