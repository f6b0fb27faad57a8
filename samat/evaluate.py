"""One run's evaluation: every requested evaluation that has no stored record, each stored on its
own the moment it finishes; batches of an attack in progress are stored as they finish too, so a
killed or requeued task resumes at the next missing batch.

Records (`evals/<key>.json`) are keyed by what determines the number: the attack's canonical spec
(label excluded), the images (n_examples, subset_seed), the attack seed and the checkpoint (last
or best). Clean accuracy is recorded twice: on the whole test set ("Natural") and on the attacked
subset, so a table can put the subset's clean accuracy beside the robust columns.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
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


# The authors' CIFAR-10 statistics (SAM_AT utils.py:6-7), with which their eval_cifar100.py:33
# classifies CIFAR-100's attacked images (eval.scoring_stats: cifar10).
AUTHORS_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


@contextlib.contextmanager
def normalized_as(
    model: nn.Module, mean: Sequence[float], std: Sequence[float]
) -> Iterator[nn.Module]:
    """The model with its Normalize layer's mean and std replaced while inside; restored after."""
    from samat.models.normalize import Normalize

    layers = [m for m in model.modules() if isinstance(m, Normalize)]
    if len(layers) != 1:
        raise ValueError(f"expected one Normalize layer in the model, found {len(layers)}")
    (layer,) = layers
    saved = layer.mean.clone(), layer.std.clone()
    with torch.no_grad():
        layer.mean.copy_(torch.tensor(mean).view_as(layer.mean))
        layer.std.copy_(torch.tensor(std).view_as(layer.std))
    try:
        yield model
    finally:
        with torch.no_grad():
            layer.mean.copy_(saved[0])
            layer.std.copy_(saved[1])


def scoring(model: nn.Module, config: RunConfig) -> contextlib.AbstractContextManager[Any]:
    """How the attacked images are classified: with the model's own statistics, or (scoring_stats
    cifar10) with the authors' CIFAR-10 mean and std, the attack itself unchanged."""
    if config.eval.scoring_stats == "cifar10":
        return normalized_as(model, *AUTHORS_CIFAR10_STATS)
    return contextlib.nullcontext(model)


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
        lambda: _scored_clean(model, loader(subset), config),
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


def _scored_clean(model: nn.Module, loader: DeviceLoader, config: RunConfig) -> tuple[int, int]:
    with scoring(model, config):
        return clean_accuracy(model, loader)


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
            with scoring(model, config):
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
