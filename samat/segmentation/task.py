"""Semantic segmentation as a samat task (see `samat.tasks`): DeepLabv3 on Stanford Background or
VOC2012, trained by any method, evaluated by mIoU on the whole test split and under PGD.

Evaluation records (`evals/<key>.json`, keys from `samat.store.record_keys`) hold the mIoU as
"accuracy" (what tables show) and again as "miou", with "pixel_accuracy", per-class IoU and the
confusion matrix. An attack runs over the attacked subset batch by batch; after each batch the
confusion so far is stored as progress, so a killed or requeued task resumes at the next batch,
and each batch's random start comes from its own seed, so the resumed numbers equal an
uninterrupted evaluation's.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samat import attacks
from samat.config import AttackSpec, ConfigError, RunConfig
from samat.segmentation.attacks import SegAttack, batch_confusion, eval_mode
from samat.segmentation.data import SegSplit, load_segmentation
from samat.segmentation.generate import generate_stanford, generate_voc
from samat.segmentation.loader import SegLoader
from samat.segmentation.metrics import class_iou, miou, pixel_accuracy
from samat.segmentation.models import create_model

log = logging.getLogger("samat.segmentation")

# Each released layout lives in one folder under data.root; generating writes that folder.
LAYOUT_FOLDERS = {"stanford_background": "iccv09Data", "voc2012": "VOCdevkit"}
# Of the generated images, this fraction is VOC's val list (Stanford splits its own, 80/20).
GENERATED_VAL_FRACTION = 0.2


@dataclass(frozen=True, eq=False)
class SegmentationData:
    """What the run loop needs of a data set: the splits and the class count."""

    train: SegSplit
    test: SegSplit
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    validation: None = None


def has_data(name: str, root: Path) -> bool:
    """Whether `root` holds the data set in one of the layouts its loader reads."""
    if name == "stanford_background":
        return any(any((base / "images").glob("*.jpg")) for base in (root, root / "iccv09Data"))
    lists = Path("ImageSets") / "Segmentation" / "train.txt"
    return any(
        (base / lists).is_file() for base in (root, root / "VOC2012", root / "VOCdevkit/VOC2012")
    )


def ensure_generated(name: str, root: Path, n_examples: int, size: int, seed: int) -> bool:
    """Write the tiny look-alike of `name` into `root` unless it holds the data set already;
    True when this call wrote it.

    The layout's folder is generated in a temp folder inside `root` and renamed into place, so a
    reader never sees half a data set; when a concurrent run renamed its copy first, that one is
    kept (both are the same bytes: same generator, same seed)."""
    if has_data(name, root):
        return False
    root.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=root, prefix=".samat-generate-"))
    try:
        if name == "stanford_background":
            generate_stanford(temp, n_examples, size, seed)
        else:
            n_val = max(1, round(GENERATED_VAL_FRACTION * n_examples))
            generate_voc(temp, n_examples - n_val, n_val, size, seed)
        folder = LAYOUT_FOLDERS[name]
        try:
            os.rename(temp / folder, root / folder)
        except OSError:
            # another run got there first (the target exists and is not empty)
            if not has_data(name, root):
                raise
            return False
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.info("generated a tiny %s (%d images of %d px) in %s", name, n_examples, size, root)
    return True


def _first(split: SegSplit, n: int | None) -> SegSplit:
    return split if n is None else SegSplit(split.images[:n], split.masks[:n])


def seg_attacks(config: RunConfig) -> list[AttackSpec]:
    """eval.attacks resolved; each must be PGD (the only attack implemented on masks). The run
    config refuses other kinds already; this guards a request that bypassed it."""
    specs = attacks.resolve(config.eval.attacks)
    for spec in specs:
        name = attacks.label(spec)
        if spec.attack != "pgd":
            raise ConfigError(
                f"attack {name!r}: {spec.attack} does not apply to segmentation; use "
                "{attack: pgd, norm: linf | l2, eps, steps} in eval.attacks"
            )
        if spec.options:
            raise ConfigError(
                f"attack {name!r}: segmentation's PGD takes no options; remove "
                f"{sorted(spec.options)}"
            )
    return specs


def _seg_attack(spec: AttackSpec) -> SegAttack:
    return SegAttack(attacks.label(spec), spec.norm, spec.eps, attacks.steps(spec), spec.alpha)


def batch_seed(seed: int, index: int) -> int:
    """Batch `index` of an attack starts its random start from this seed (as image attacks)."""
    return seed + 1_000_003 * index


def _metrics(confusion: torch.Tensor) -> dict[str, Any]:
    value = miou(confusion)
    return {
        "accuracy": value,
        "miou": value,
        "pixel_accuracy": pixel_accuracy(confusion),
        "class_iou": [None if math.isnan(v) else v for v in class_iou(confusion).tolist()],
        "confusion": confusion.cpu().tolist(),
    }


class SegmentationTask:
    """Semantic segmentation: samat.segmentation's data, models, loader, mIoU and PGD."""

    def build(self, config: RunConfig, device: torch.device) -> tuple[SegmentationData, nn.Module]:
        data_cfg = config.data
        seg_attacks(config)  # a bad attack fails now, not after training
        assert data_cfg.root is not None  # the config requires it for these data sets
        root = Path(data_cfg.root)
        if data_cfg.generate is not None:
            generate = data_cfg.generate
            ensure_generated(data_cfg.name, root, generate.n_examples, generate.size, generate.seed)
        data = load_segmentation(data_cfg.name, root, size=data_cfg.size)
        dataset = SegmentationData(
            train=_first(data.train, data_cfg.train_size),
            test=_first(data.test, data_cfg.test_size),
            num_classes=data.num_classes,
            class_names=data.class_names,
            mean=data.mean,
            std=data.std,
        )
        model = create_model(
            config.model.name,
            data.num_classes,
            mean=data.mean,
            std=data.std,
            pretrained=config.model.pretrained,
        ).to(device)
        if config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return dataset, model

    def loader(self, config: RunConfig, dataset: SegmentationData, device: torch.device) -> Any:
        data_cfg = config.data
        return SegLoader(
            dataset.train,
            config.train.batch_size,
            device=device,
            shuffle=True,
            seed=config.seed,
            scale_range=data_cfg.scale_range,
            crop_size=data_cfg.crop_size,
            flip=bool(data_cfg.flip),
            # the common segmentation recipe; a split smaller than a batch still gives one
            drop_last=len(dataset.train.masks) >= config.train.batch_size,
            channels_last=config.train.channels_last,
        )

    def evaluate(
        self,
        run: Any,
        config: RunConfig,
        model: nn.Module,
        dataset: SegmentationData,
        *,
        checkpoint: str,
        stop: Any,
    ) -> dict[str, dict[str, Any]]:
        return evaluate_run(run, config, model, dataset, checkpoint=checkpoint, stop=stop)

    def summary(self, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from samat.tasks import accuracy_summary

        return {
            **accuracy_summary(records, metric="miou"),
            "pixel_accuracy": {label: r["pixel_accuracy"] for label, r in records.items()},
        }


def evaluate_run(
    run: Any,
    config: RunConfig,
    model: nn.Module,
    dataset: SegmentationData,
    *,
    checkpoint: str,
    stop: Any = None,
) -> dict[str, dict[str, Any]]:
    """What `config.eval` asks for and has no record yet, each record stored as it finishes;
    the records by label ("natural", "natural_subset", then each attack's label)."""
    from samat.evaluate import subset_indices
    from samat.store import images_key, record_keys

    request = config.eval
    specs = seg_attacks(config)
    keys = record_keys(config)
    test = dataset.test
    index = subset_indices(len(test.masks), request.n_examples, request.subset_seed)
    subset = SegSplit(test.images[index], test.masks[index])
    images = images_key(config, checkpoint)
    records: dict[str, dict[str, Any]] = {}
    num_classes = dataset.num_classes
    with eval_mode(model):
        key = keys["natural"]
        records["natural"] = run.eval_record(key) or _clean(
            run,
            key,
            "Natural",
            {"kind": "clean", "images": "all", "checkpoint": checkpoint},
            model,
            test,
            request.batch_size,
            num_classes,
        )
        key = keys["natural_subset"]
        records["natural_subset"] = run.eval_record(key) or _clean(
            run,
            key,
            "Natural (attacked images)",
            {"kind": "clean", **images},
            model,
            subset,
            request.batch_size,
            num_classes,
        )
        for spec in specs:
            label = attacks.label(spec)
            key = keys[label]
            record = run.eval_record(key)
            if record is None:
                if stop is not None:
                    stop.check()
                record = _attack(run, key, spec, images, model, subset, config, num_classes, stop)
            records[label] = {**record, "label": label}
    return records


def _clean(
    run: Any,
    key: str,
    label: str,
    fields: dict[str, Any],
    model: nn.Module,
    split: SegSplit,
    batch_size: int,
    num_classes: int,
) -> dict[str, Any]:
    began = time.perf_counter()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for start in range(0, len(split.masks), batch_size):
        confusion += batch_confusion(
            model,
            split.images[start : start + batch_size],
            split.masks[start : start + batch_size],
            None,
            num_classes=num_classes,
        )
    record = {
        "key": key,
        "label": label,
        **fields,
        **_metrics(confusion),
        "total": len(split.masks),
        "seconds": time.perf_counter() - began,
        "finished": time.time(),
    }
    run.write_eval_record(record)
    log.info("mIoU %s: %.4f", label, record["miou"])
    return record


def _attack(
    run: Any,
    key: str,
    spec: AttackSpec,
    images_key: dict[str, Any],
    model: nn.Module,
    subset: SegSplit,
    config: RunConfig,
    num_classes: int,
    stop: Any,
) -> dict[str, Any]:
    """One PGD over the subset, batch by batch; the confusion so far is stored after each."""
    label = attacks.label(spec)
    attack = _seg_attack(spec)
    device = next(model.parameters()).device
    batch = config.eval.batch_size
    batches = range(0, len(subset.masks), batch)
    progress = run.eval_progress(key)
    done = int(progress.get("batches_done", 0)) if progress.get("key") == key else 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    seconds = 0.0
    if done:
        confusion += torch.tensor(progress["confusion"], dtype=torch.int64, device=device)
        seconds = float(progress.get("seconds", 0.0))
        log.info("attack %s: resuming at %d of %d batches", label, done, len(batches))
    for number, start in enumerate(batches):
        if number < done:
            continue
        began = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(batch_seed(config.seed, number))
        confusion += batch_confusion(
            model,
            subset.images[start : start + batch],
            subset.masks[start : start + batch],
            attack,
            num_classes=num_classes,
            generator=generator,
        )
        seconds += time.perf_counter() - began
        run.save_eval_progress(
            key,
            {
                "key": key,
                "batches_done": number + 1,
                "confusion": confusion.cpu().tolist(),
                "seconds": seconds,
            },
        )
        n = len(subset.masks)
        log.info("attack %s: %d/%d", label, min(start + batch, n), n)
        if stop is not None and number + 1 < len(batches):
            stop.check()
    record = {
        "key": key,
        "label": label,
        "kind": "attack",
        "attack": attacks.canonical(spec),
        **images_key,
        **_metrics(confusion),
        "total": len(subset.masks),
        "seconds": seconds,
        "finished": time.time(),
    }
    run.write_eval_record(record)
    log.info("mIoU under %s: %.4f", label, record["miou"])
    return record


TASK = SegmentationTask()

__all__ = ["TASK", "SegmentationData", "SegmentationTask", "ensure_generated", "has_data"]
