"""One run, top to bottom: data, model, method, epochs with checkpoints, evaluation, result.json."""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress, TimeElapsedColumn

from samat import __version__, attacks, methods, models
from samat.config import ConfigError, OptimizerConfig, RunConfig, ScheduleConfig
from samat.data import DeviceLoader, load_dataset
from samat.grid import run_id
from samat.store import (
    CHECKPOINT,
    LOG,
    RESULT,
    RunDir,
    read_checkpoint,
    write_checkpoint,
    write_json,
)

log = logging.getLogger("samat.train")


class TrainingError(ConfigError):
    """Training cannot go on (e.g. the loss became NaN); the message names a fix."""


def lr_factor(schedule: ScheduleConfig, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for a 0-based epoch: warmup, then multistep / cosine / constant."""
    if epoch < schedule.warmup_epochs:
        return (epoch + 1) / (schedule.warmup_epochs + 1)
    if schedule.name == "multistep":
        return schedule.gamma ** sum(epoch >= m * epochs for m in schedule.milestones)
    if schedule.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return 1.0


def make_optimizer(config: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam from the config."""
    params = model.parameters()
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _set_determinism(config: RunConfig) -> None:
    # Small CPU models run fastest on one thread each, several runs side by side (see launch.py).
    threads = int(os.environ.get("SAMAT_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build(config: RunConfig, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """The data set and the model (normalization first, on the device) for a run config."""
    dataset = load_dataset(config.data)
    images = dataset.train.images
    model = models.create(
        config.model.name,
        dataset.num_classes,
        in_channels=images.shape[1],
        image_size=images.shape[-1],
        mean=dataset.mean,
        std=dataset.std,
        width=config.model.width,
    ).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return dataset, model


# -- checkpoints ---------------------------------------------------------------------------------


def checkpoint_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model, optimizer state and RNG states as flat tensors + JSON-able metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors, {"param_groups": state["param_groups"], "optim_scalars": scalars}


def restore_checkpoint(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Inverse of checkpoint_tensors."""
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value.to(device)
    for index, values in meta["optim_scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _resume(
    run: RunDir, config: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    path = run.file(CHECKPOINT)
    if not path.exists():
        return 0, {}
    tensors, meta = read_checkpoint(path)
    if meta.get("run_id") != run_id(config):
        raise ConfigError(
            f"checkpoint {path} belongs to another config (run {meta.get('run_id')}); "
            "delete it or use a fresh output directory"
        )
    restore_checkpoint(tensors, meta, model, optimizer)
    log.info("resumed from epoch %d (checkpoint %s)", meta["epoch"], path)
    return meta["epoch"], meta.get("totals", {})


# -- the run -------------------------------------------------------------------------------------


def accuracy(model: torch.nn.Module, loader: DeviceLoader) -> float:
    """Clean top-1 accuracy over a whole split."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader.epoch(0):
            correct += (model(images).argmax(1) == labels).sum().item()
            total += labels.numel()
    model.train(was_training)
    return correct / total


def _slurm_job_id() -> dict[str, str]:
    """The job id as squeue/sacct name it ('12_3' for an array task), when running under SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return {"job_id": f"{array}_{task}"}
    job = os.environ.get("SLURM_JOB_ID")
    return {"job_id": job} if job else {}


def _progress_bar() -> Progress | None:
    """A live bar on a terminal; None in batch jobs, whose logs get one line per epoch instead."""
    if not sys.stdout.isatty():
        return None
    bar = Progress(*Progress.get_default_columns(), TimeElapsedColumn(), transient=True)
    bar.start()
    return bar


def execute(run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one run from its directory; write result.json and return it."""
    run = RunDir(run_dir)
    config = run.config()
    handler = logging.FileHandler(run.file(LOG))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("samat")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # the run's log file always gets the epoch lines
    attempts = run.state()["attempts"] + 1
    run.update_state(
        state="running", attempts=attempts, error=None, host=socket.gethostname(), **_slurm_job_id()
    )
    try:
        result = _train_and_evaluate(run, config)
    except BaseException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, Exception):
            run.update_state(state="failed", error=message)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
    run.update_state(state="done", error=None)
    return result


def _train_and_evaluate(run: RunDir, config: RunConfig) -> dict[str, Any]:
    device = pick_device()
    _set_determinism(config)
    dataset, model = build(config, device)
    specs = attacks.resolve(config.eval.attacks)
    train = config.train
    optimizer = make_optimizer(train.optimizer, model)
    method = methods.create(config.method, optimizer, amp=train.amp)
    start, totals = _resume(run, config, model, optimizer)
    loader = DeviceLoader(
        dataset.train,
        train.batch_size,
        device=device,
        shuffle=True,
        seed=config.seed,
        crop_padding=dataset.crop_padding,
        flip=dataset.flip,
        channels_last=train.channels_last,
    )
    totals = {"train_seconds": 0.0, "images": 0, "steps": 0, **totals}
    log.info(
        "run %s: %s on %s, %d epochs from epoch %d, device %s",
        run.run_id,
        config.method.name,
        config.data.name,
        train.epochs,
        start,
        device,
    )
    bar = _progress_bar()
    task = (
        bar.add_task(
            f"{config.method.name} seed {config.seed}", total=(train.epochs - start) * len(loader)
        )
        if bar
        else None
    )
    for epoch in range(start, train.epochs):
        lr = train.optimizer.lr * lr_factor(train.schedule, epoch, train.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        began, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for step, (images, labels) in enumerate(loader.epoch(epoch)):
            out = method.step(model, images, labels)
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss} at epoch {epoch + 1} step {step + 1}; "
                    "lower train.optimizer.lr (or method.rho / eps) and resubmit"
                )
            loss_sum += loss * labels.numel()
            correct += (out.logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            if bar:
                bar.update(
                    task,
                    advance=1,
                    description=f"epoch {epoch + 1}/{train.epochs} loss {loss_sum / seen:.3f}",
                )
        seconds = time.perf_counter() - began
        totals["train_seconds"] += seconds
        totals["images"] += seen
        totals["steps"] += len(loader)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "seconds": seconds,
            "images_per_second": seen / seconds,
        }
        run.append_metrics(record)
        tensors, meta = checkpoint_tensors(model, optimizer)
        write_checkpoint(
            run.file(CHECKPOINT),
            tensors,
            {
                **meta,
                "epoch": epoch + 1,
                "run_id": run_id(config),
                "samat": __version__,
                "totals": totals,
            },
        )
        log.info(
            "epoch %d/%d loss %.4f train-acc %.4f lr %.4g %.1fs (%.0f img/s)",
            epoch + 1,
            train.epochs,
            record["loss"],
            record["train_accuracy"],
            lr,
            seconds,
            record["images_per_second"],
        )

    if bar:
        bar.stop()
    began = time.perf_counter()
    test = DeviceLoader(dataset.test, config.eval.batch_size, device=device, shuffle=False)
    natural = accuracy(model, test)
    n = min(config.eval.n_examples, len(dataset.test.labels))
    images = dataset.test.images[:n].to(device).float().div(255)
    labels = dataset.test.labels[:n].to(device)
    robust = (
        attacks.evaluate(
            model,
            images,
            labels,
            specs,
            batch_size=config.eval.batch_size,
            num_classes=dataset.num_classes,
            seed=config.seed,
            on_batch=lambda label, done, total: log.info("attack %s: %d/%d", label, done, total),
        )
        if specs
        else {}
    )
    eval_seconds = time.perf_counter() - began
    for label, value in robust.items():
        log.info("robust accuracy %s: %.4f", label, value)
    result = {
        "run_id": run.run_id,
        "seed": config.seed,
        "method": config.method.name,
        "natural": natural,
        "robust": robust,
        "average_robust": sum(robust.values()) / len(robust) if robust else None,
        "robust_examples": n if specs else 0,
        "train_seconds": totals["train_seconds"],
        "eval_seconds": eval_seconds,
        "images_per_second": totals["images"] / max(totals["train_seconds"], 1e-9),
        "forward_backward_passes": totals["steps"] * method.passes_per_step,
        "passes_per_step": method.passes_per_step,
        "epochs": train.epochs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "samat": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    write_json(run.file(RESULT), result)
    log.info(
        "natural accuracy %.4f; done in %.1fs train + %.1fs eval",
        natural,
        totals["train_seconds"],
        eval_seconds,
    )
    return result
