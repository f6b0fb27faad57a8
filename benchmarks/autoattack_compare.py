"""samat's AutoAttack (torchattacks' parts in the official composition) against the official code.

A small CNN trained briefly with PGD-AT on scikit-learn's digits (robust enough that every stage
of AutoAttack has examples left to attack), the same test images, l_inf 0.1: the time of each and
both robust accuracies, which should be identical.
"""

from __future__ import annotations

import importlib
import time
from types import ModuleType
from typing import Any

import torch
from torch import nn

from benchmarks.clock import sync
from benchmarks.figures import Figure, Printer, at_most
from samat import attacks, methods, models
from samat.config import AttackSpec, validate_run
from samat.data import DeviceLoader, load_dataset
from samat.train import make_optimizer

TIME_TARGET = 1.05  # samat's AutoAttack time over the official implementation's


def official_module() -> ModuleType | None:
    """The official AutoAttack: PyPI's pyautoattack (the dev extra), or a checkout's autoattack."""
    for name in ("pyautoattack", "autoattack"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "AutoAttack"):
            return module
    return None


def train_digits_model(device: torch.device, epochs: int) -> tuple[nn.Module, Any]:
    """small_cnn (width 16) after `epochs` of PGD-AT (3 steps, l_inf 0.1) on digits; eval mode."""
    config = validate_run(
        {
            "data": {"name": "digits"},
            "model": {"name": "small_cnn", "width": 16},
            "method": {"name": "pgd_at", "eps": 0.1, "steps": 3, "alpha": 0.05},
            "train": {"batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05}},
        }
    )
    dataset = load_dataset(config.data)
    torch.manual_seed(0)
    model = models.create(
        "small_cnn",
        dataset.num_classes,
        in_channels=dataset.train.images.shape[1],
        image_size=dataset.train.images.shape[-1],
        mean=dataset.mean,
        std=dataset.std,
        width=16,
    ).to(device)
    method = methods.create(config.method, make_optimizer(config.train.optimizer, model))
    loader = DeviceLoader(dataset.train, 64, device=device, shuffle=True, seed=0)
    model.train()
    for epoch in range(epochs):
        for images, labels in loader.epoch(epoch):
            method.step(model, images, labels)
    return model.eval(), dataset


def _official_robust(
    module: ModuleType,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int,
    queries: int,
) -> float:
    official = module.AutoAttack(
        model, norm="Linf", eps=eps, seed=0, version="standard", device=images.device
    )
    official.verbose = False
    for apgd in (official.apgd, official.apgd_targeted):
        # the step-size checkpoints are set from n_iter in the constructor: set them again
        apgd.n_iter = steps
        apgd.n_iter_2, apgd.n_iter_min = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1)
        apgd.size_decr = max(int(0.03 * steps), 1)
    official.fab.n_iter = steps
    official.square.n_queries = queries
    adversarial = official.run_standard_evaluation(images, labels, batch_size=len(images))
    if isinstance(adversarial, tuple):  # pyautoattack returns (x_adv, y_adv)
        adversarial = adversarial[0]
    with torch.no_grad():
        # counted as samat counts (correct / total in float64), so equal counts compare equal
        return (model(adversarial).argmax(1) == labels).sum().item() / len(labels)


def run(
    device: torch.device,
    printer: Printer,
    *,
    count: int = 200,
    eps: float = 0.1,
    steps: int = 100,
    queries: int = 5000,
    epochs: int = 5,
) -> dict[str, Any]:
    """Time both implementations on the same model and images; print time ratio and accuracies."""
    module = official_module()
    if module is None:
        note = "skipped: the official AutoAttack (pyautoattack / autoattack) is not installed"
        printer.line(f"autoattack: {note}")
        return {"skipped": note}
    printer.line(
        f"autoattack: small_cnn after {epochs} epochs of PGD-AT on digits, {count} test images, "
        f"l_inf {eps:g}, {steps} iterations, {queries} Square queries, {device}"
    )
    model, dataset = train_digits_model(device, epochs)
    images = dataset.test.images[:count].to(device).float().div(255)
    labels = dataset.test.labels[:count].to(device)
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).sum().item() / count
    spec = AttackSpec(
        attack="autoattack", norm="linf", eps=eps, steps=steps, options={"n_queries": queries}
    )
    sync(device)
    began = time.perf_counter()
    (ours,) = attacks.evaluate(
        model, images, labels, [spec], batch_size=count, num_classes=10, seed=0
    ).values()
    sync(device)
    ours_s = time.perf_counter() - began
    official = _official_robust(
        module, model, images, labels, eps=eps, steps=steps, queries=queries
    )
    sync(device)
    official_s = time.perf_counter() - began - ours_s
    printer.line(
        f"  clean {clean:.4f}; robust: samat {ours:.4f}, official {official:.4f} "
        f"({'identical' if ours == official else 'DIFFERENT'}); "
        f"time samat {ours_s:.1f} s, official {official_s:.1f} s, ratio x{ours_s / official_s:.2f}"
    )
    return {
        "official_module": module.__name__,
        "images": count,
        "eps": eps,
        "steps": steps,
        "queries": queries,
        "epochs": epochs,
        "clean": clean,
        "samat_robust": ours,
        "official_robust": official,
        "samat_seconds": ours_s,
        "official_seconds": official_s,
        "time_ratio": ours_s / official_s,
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    """Time ratio samat / official, and the two accuracies (target: identical)."""
    if "skipped" in result:
        return [Figure("AutoAttack samat vs official", None, "skipped", "-", None)]
    ours, official = result["samat_robust"], result["official_robust"]
    return [
        at_most(
            "AutoAttack time samat/official",
            result["time_ratio"],
            TIME_TARGET,
            f"x{result['time_ratio']:.2f}",
        ),
        Figure(
            "AutoAttack robust acc samat | official",
            ours - official,
            f"{ours:.4f} | {official:.4f}",
            "identical",
            ours == official,
        ),
    ]
