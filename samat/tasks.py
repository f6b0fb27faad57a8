"""The three tasks behind one run loop: image classification, semantic segmentation and text
classification. A run's task follows from its data set (`RunConfig.task`); everything about
SLURM, containers, checkpoints, requeue and collect is shared.

Each task is an object with four calls (see `Task`), implemented for images here and in
`samat.segmentation.task` and `samat.text.task`, imported on first use:

- `build(config, device) -> (dataset, model)`: the data (`.train`, `.test`, `.validation`,
  `.num_classes`) and the model on the device;
- `loader(config, dataset, device)`: the training batches, `len()` and `epoch(epoch, start)`
  yielding (inputs, targets) in an order that depends only on (seed, epoch);
- `evaluate(run, config, model, dataset, *, checkpoint, stop)`: the records of what `eval`
  asks for (one per evaluation, stored as each finishes), by label, "natural" and
  "natural_subset" first;
- `summary(records)`: result.json's numbers: `metric` (what the table shows), `natural`,
  `natural_subset`, `robust` (label -> number) and `average_robust` (None when an average
  means nothing, e.g. attack success rates).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from samat.config import TASK_DATA

# Model names per task, torch-free (a grid's preflight checks them).
SEGMENTATION_MODELS = ("deeplabv3_mobilenetv2", "deeplabv3_resnet50", "seg_tiny")
TEXT_MODELS = ("distilbert",)
# what the numbers in a task's table are, for collect's title
METRICS = {"accuracy": "accuracy %", "miou": "mIoU %", "success_rate": "attack success rate %"}


def model_names(task: str) -> tuple[str, ...]:
    if task == "segmentation":
        return SEGMENTATION_MODELS
    if task == "text":
        return TEXT_MODELS
    from samat import models

    return models.NAMES


class Task(Protocol):
    def build(self, config: Any, device: Any) -> tuple[Any, Any]: ...

    def loader(self, config: Any, dataset: Any, device: Any) -> Any: ...

    def evaluate(
        self, run: Any, config: Any, model: Any, dataset: Any, *, checkpoint: str, stop: Any
    ) -> dict[str, dict[str, Any]]: ...

    def summary(self, records: dict[str, dict[str, Any]]) -> dict[str, Any]: ...


class ImageTask:
    """Image classification: samat.data, samat.models and samat.evaluate."""

    def build(self, config: Any, device: Any) -> tuple[Any, Any]:
        from samat import train

        return train.build(config, device)

    def loader(self, config: Any, dataset: Any, device: Any) -> Any:
        from samat.data import DeviceLoader

        return DeviceLoader(
            dataset.train,
            config.train.batch_size,
            device=device,
            shuffle=True,
            seed=config.seed,
            crop_padding=dataset.crop_padding,
            flip=dataset.flip,
            channels_last=config.train.channels_last,
            padding_mode=dataset.crop_padding_mode,
        )

    def evaluate(
        self, run: Any, config: Any, model: Any, dataset: Any, *, checkpoint: str, stop: Any
    ) -> dict[str, dict[str, Any]]:
        from samat.evaluate import evaluate_run

        return evaluate_run(
            run,
            config,
            model,
            dataset.test,
            num_classes=dataset.num_classes,
            checkpoint=checkpoint,
            stop=stop,
        )

    def summary(self, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return accuracy_summary(records)


def accuracy_summary(records: dict[str, dict[str, Any]], metric: str = "accuracy") -> dict:
    """natural, natural_subset, robust and their average from records' "accuracy" fields."""
    robust = {
        label: r["accuracy"]
        for label, r in records.items()
        if label not in ("natural", "natural_subset")
    }
    return {
        "metric": metric,
        "natural": records["natural"]["accuracy"],
        "natural_subset": records["natural_subset"]["accuracy"],
        "robust": robust,
        "average_robust": sum(robust.values()) / len(robust) if robust else None,
        "robust_examples": records["natural_subset"]["total"] if robust else 0,
    }


def get(task: str) -> Task:
    """The task object for 'image', 'segmentation' or 'text'."""
    if task not in TASK_DATA:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASK_DATA)}")
    if task == "image":
        return ImageTask()
    return importlib.import_module(f"samat.{task}.task").TASK
