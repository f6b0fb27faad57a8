"""One run's evaluation: every requested evaluation that has no stored record, each stored on its
own the moment it finishes; batches of an attack in progress are stored as they finish too, so a
killed or requeued task resumes at the next missing batch.

Records (`evals/<key>.json`) are keyed by what determines the number: the attack's canonical spec
(label excluded), the images (n_examples, subset_seed), the attack seed and the checkpoint (last
or best). Clean accuracy is recorded twice: on the whole test set ("Natural") and on the attacked
subset, so a table can put the subset's clean accuracy beside the robust columns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from samat import attacks
from samat.config import AttackSpec, RunConfig
from samat.data import DeviceLoader, Split
from samat.store import RunDir, images_key, record_keys

log = logging.getLogger("samat.evaluate")


class Interrupted(BaseException):
    """A stop was requested (time limit, preemption): progress is stored, the task may end."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopFlag:
    """Set from a signal handler; training and evaluation look at it between steps / batches."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int, frame: Any = None) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def clean_accuracy(model: nn.Module, loader: DeviceLoader) -> tuple[int, int]:
    """(correct, total) of the model in eval mode over a whole split; the mode is restored."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=loader.images.device)
    total = 0
    with torch.no_grad():
        for images, labels in loader.epoch(0):
            correct += (model(images).argmax(1) == labels).sum()
            total += labels.numel()
    model.train(was_training)
    return int(correct), total


def subset_indices(n_test: int, n_examples: int, subset_seed: int | None) -> torch.Tensor:
    """The attacked test images: the first n, or n drawn with `subset_seed`."""
    n = min(n_examples, n_test)
    if subset_seed is None:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(subset_seed)
    return torch.randperm(n_test, generator=generator)[:n].sort().values


def evaluate_run(
    run: RunDir,
    config: RunConfig,
    model: nn.Module,
    test: Split,
    *,
    num_classes: int,
    checkpoint: str,
    stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Evaluate what `config.eval` asks for and has no record yet; return the records by label
    ("natural", "natural_subset", and each attack's label), in the request's order."""
    request = config.eval
    device = next(model.parameters()).device
    index = subset_indices(len(test.labels), request.n_examples, request.subset_seed)
    keys = record_keys(config)
    images = images_key(config, checkpoint)
    records: dict[str, dict[str, Any]] = {}

    def loader(split: Split) -> DeviceLoader:
        return DeviceLoader(split, request.batch_size, device=device, shuffle=False)

    key = keys["natural"]
    records["natural"] = run.eval_record(key) or store_clean(
        run,
        key,
        "Natural",
        {"kind": "clean", "images": "all", "checkpoint": checkpoint},
        lambda: clean_accuracy(model, loader(test)),
    )
    subset = Split(test.images[index], test.labels[index])
    key = keys["natural_subset"]
    records["natural_subset"] = run.eval_record(key) or store_clean(
        run,
        key,
        "Natural (attacked images)",
        {"kind": "clean", **images},
        lambda: clean_accuracy(model, loader(subset)),
    )
    for spec in attacks.resolve(request.attacks):
        key = keys[attacks.label(spec)]
        record = run.eval_record(key)
        if record is None:
            if stop is not None:
                stop.check()
            record = _attack(
                run, key, spec, images, model, subset, index, config, num_classes, stop
            )
        records[attacks.label(spec)] = {**record, "label": attacks.label(spec)}
    return records


def store_clean(
    run: RunDir,
    key: str,
    label: str,
    fields: dict[str, Any],
    compute: Callable[[], tuple[int, int]],
) -> dict[str, Any]:
    """Time `compute` (correct, total), store its record at once and return it (the text task
    stores its clean accuracies so too)."""
    began = time.perf_counter()
    correct, total = compute()
    record = {
        "key": key,
        "label": label,
        **fields,
        "correct": correct,
        "total": total,
        "accuracy": correct / total,
        "seconds": time.perf_counter() - began,
        "finished": time.time(),
    }
    run.write_eval_record(record)
    return record


def _attack(
    run: RunDir,
    key: str,
    spec: AttackSpec,
    images_key: dict[str, Any],
    model: nn.Module,
    subset: Split,
    index: torch.Tensor,
    config: RunConfig,
    num_classes: int,
    stop: StopFlag | None,
) -> dict[str, Any]:
    """One attack over the subset, batch by batch, each finished batch stored at once."""
    label = attacks.label(spec)
    fields = {"kind": "attack", "attack": attacks.canonical(spec), **images_key}
    images = subset.images.float().div(255)
    labels = subset.labels
    if not attacks.kind(spec).per_batch:
        return _whole_subset(run, key, spec, fields, model, images, labels, index, config)
    from samat.attacks import runner

    batch = config.eval.batch_size
    progress = run.eval_progress(key)
    done: dict[str, int] = progress.get("batches", {}) if progress.get("key") == key else {}
    seconds = float(progress.get("seconds", 0.0)) if done else 0.0
    batches = range(0, len(labels), batch)
    if done:
        log.info("attack %s: resuming at %d of %d batches", label, len(done), len(batches))
    with runner.attack_mode(model):
        attack = runner.build(spec, model, num_classes=num_classes, seed=config.seed)
        for number, start in enumerate(batches):
            if str(number) in done:
                continue
            began = time.perf_counter()
            x, y = runner.batch_on(model, images, labels, start, batch)
            adversarial = runner.run_batch(attack, spec, x, y, seed=config.seed, index=number)
            done[str(number)] = runner.count_correct(model, adversarial, y)
            seconds += time.perf_counter() - began
            run.save_eval_progress(key, {"key": key, "batches": done, "seconds": seconds})
            log.info("attack %s: %d/%d", label, min(start + batch, len(labels)), len(labels))
            if stop is not None and number + 1 < len(batches):
                stop.check()
    correct = sum(done.values())
    record = {
        "key": key,
        "label": label,
        **fields,
        "correct": correct,
        "total": len(labels),
        "accuracy": correct / len(labels),
        "seconds": seconds,
        "finished": time.time(),
    }
    run.write_eval_record(record)
    log.info("robust accuracy %s: %.4f", label, record["accuracy"])
    return record


def _whole_subset(
    run: RunDir,
    key: str,
    spec: AttackSpec,
    fields: dict[str, Any],
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor,
    config: RunConfig,
) -> dict[str, Any]:
    """Corruption robustness: released CIFAR-10-C rows for these test indices (positions in the
    whole test set, so a staged root needs data.test_size unset), or generated corruptions."""
    from samat.attacks import corruptions

    began = time.perf_counter()
    options = dict(spec.options)
    outcome = corruptions.corruption_accuracy(
        model,
        images,
        labels,
        indices=index.tolist(),
        batch_size=config.eval.batch_size,
        seed=config.seed,
        **options,
    )
    record = {
        "key": key,
        "label": attacks.label(spec),
        **fields,
        "accuracy": outcome["accuracy"],
        "total": len(labels),
        "details": outcome,
        "seconds": time.perf_counter() - began,
        "finished": time.time(),
    }
    run.write_eval_record(record)
    return record
