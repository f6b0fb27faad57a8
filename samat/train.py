"""One run, top to bottom: set up, train (epochs with checkpoints at step boundaries), evaluate
(the requested evaluations that have no record), result.json."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress, TimeElapsedColumn

from samat import __version__, attacks, methods, models, tasks, versions
from samat.claim import claim
from samat.config import (
    AdversarialMethod,
    AttackSpec,
    ConfigError,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
)
from samat.data import DeviceLoader, Split, load_dataset, split_validation
from samat.evaluate import Interrupted, StopFlag, clean_accuracy
from samat.grid import run_id
from samat.store import (
    CHECKPOINT,
    CHECKPOINT_BEST,
    LOG,
    RESULT,
    RunDir,
    open_append,
    read_checkpoint,
    write_checkpoint,
    write_json,
)
from samat.trackers import open_trackers

log = logging.getLogger("samat.train")


class TrainingError(ConfigError):
    """Training cannot go on (e.g. the loss became NaN); the message names a fix."""


PER_STEP = ("poly", "linear")  # schedules that set the lr before every step


def lr_factor(
    schedule: ScheduleConfig, epoch: int, epochs: int, step: int = 0, steps: int = 1
) -> float:
    """Learning-rate multiplier for a 0-based epoch (warmup, then multistep / cosine /
    constant), or for the 0-based optimizer `step` of `steps` in all (poly, linear)."""
    if schedule.name == "poly":
        return (1 - step / steps) ** schedule.power
    if schedule.name == "linear":
        warmup = round(schedule.warmup_ratio * steps)
        if step < warmup:
            return step / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
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
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def thread_count() -> int:
    """Threads for this run: SAMAT_NUM_THREADS (local runs side by side), else the SLURM
    allocation's CPUs (a task uses exactly what it was given), else torch's default (0)."""
    for name in ("SAMAT_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _set_determinism(config: RunConfig) -> None:
    threads = thread_count()
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        # a process that ran a deterministic run before (tests, a notebook) must not keep it on
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def build(config: RunConfig, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """The data set and the model (normalization first, on the device) for a run config; with a
    validation split, `dataset.train` is what is left of the training set after it."""
    dataset = load_dataset(config.data)
    if config.train.validation.size:
        train, validation = split_validation(dataset.train, config.train.validation.size)
        dataset = dataclasses.replace(dataset, train=train, validation=validation)
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
            # scalars such as Adam's `step` stay on the CPU, where PyTorch keeps them (on the GPU
            # every optimizer step would read them back: a sync per parameter)
            slots.setdefault(int(index), {})[name] = value.to(device) if value.dim() else value
    for index, values in meta["optim_scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _method_state(method: methods.Method) -> dict[str, torch.Tensor]:
    # methods with state between steps (LookSAM's stored gradient component) checkpoint it too
    state = method.state_dict() if hasattr(method, "state_dict") else {}
    return {f"method.{k}": v for k, v in state.items()}


def _restore_method(method: methods.Method, tensors: dict[str, torch.Tensor]) -> None:
    state = {k[7:]: v for k, v in tensors.items() if k.startswith("method.")}
    if state and hasattr(method, "load_state_dict"):
        method.load_state_dict(state)


@dataclasses.dataclass
class Position:
    """Where training stands: epochs done, batches done in the next one, and the running totals
    (kept in the checkpoint, so a resumed run reports what an uninterrupted one would)."""

    epoch: int = 0
    step: int = 0
    totals: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train_seconds": 0.0, "images": 0, "steps": 0}
    )
    # sums of the epoch in progress (loss, correct, seen, seconds), for a mid-epoch resume
    partial: dict[str, float] = dataclasses.field(default_factory=dict)
    best: dict[str, Any] = dataclasses.field(default_factory=dict)


def _resume(
    run: RunDir,
    config: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    method: methods.Method,
    epochs: int,
) -> Position:
    path = run.file(CHECKPOINT)
    if not path.exists():
        run.truncate_metrics(0)
        run.start_lineage()  # a new training: records of any earlier one are not its own
        return Position()
    tensors, meta = read_checkpoint(path)
    if meta.get("run_id") != run_id(config):
        raise ConfigError(
            f"checkpoint {path} belongs to another config (run {meta.get('run_id')}); "
            "delete it or use a fresh output directory"
        )
    if isinstance(meta.get("lineage"), str) and meta["lineage"] != run.lineage():
        run.start_lineage(meta["lineage"])  # the checkpoint says which training it continues
    restore_checkpoint(tensors, meta, model, optimizer)
    _restore_method(method, tensors)
    position = Position(
        epoch=meta["epoch"],
        step=meta.get("step", 0),
        totals={**Position().totals, **meta.get("totals", {})},
        partial=meta.get("partial", {}),
        best=meta.get("best", {}),
    )
    run.truncate_metrics(position.epoch)
    if position.epoch < epochs or position.step:
        where = f"epoch {position.epoch}" + (f" step {position.step}" if position.step else "")
        log.info("resumed from %s (checkpoint %s)", where, path)
    return position


def _save(
    run: RunDir,
    config: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    method: methods.Method,
    position: Position,
) -> None:
    tensors, meta = checkpoint_tensors(model, optimizer)
    tensors.update(_method_state(method))
    write_checkpoint(
        run.file(CHECKPOINT),
        tensors,
        {
            **meta,
            "epoch": position.epoch,
            "step": position.step,
            "run_id": run_id(config),
            "lineage": run.lineage(),
            "samat": __version__,
            "totals": position.totals,
            "partial": position.partial,
            "best": position.best,
        },
    )


# -- the run -------------------------------------------------------------------------------------


def accuracy(model: torch.nn.Module, loader: DeviceLoader) -> float:
    """Clean top-1 accuracy over a whole split, in eval mode (the mode is restored)."""
    correct, total = clean_accuracy(model, loader)
    return correct / total


def slurm_job_id() -> str | None:
    """The job id as squeue/sacct name it ('12_3' for an array task), inside a SLURM job."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


class RunLogHandler(logging.FileHandler):
    """The run's log file, opened through files.open_append: never through a link."""

    def _open(self) -> Any:
        return open_append(Path(self.baseFilename))


def _progress_bar() -> Progress | None:
    """A live bar on a terminal; None in batch jobs, whose logs get one line per epoch instead."""
    if not sys.stdout.isatty():
        return None
    bar = Progress(*Progress.get_default_columns(), TimeElapsedColumn(), transient=True)
    bar.start()
    return bar


def execute(
    run_dir: Path, *, job_id: str | None = None, stop: StopFlag | None = None
) -> dict[str, Any]:
    """Bring one run directory up to date: train if the checkpoint is not final, then evaluate
    the requested evaluations that have no record; write result.json and return it.

    `job_id` is the scheduler's id of the task doing this (None outside a launcher task). When
    `stop` is set (a time-limit or preemption signal), training checkpoints at the next step
    boundary and evaluation stores the batch in progress; then `Interrupted` is raised.

    The whole of it holds the run's claim (samat.claim): a run another live process trains or
    evaluates raises RunClaimed, with nothing of the run touched.
    """
    run = RunDir(run_dir)
    with claim(run.path, job_id):
        return _bring_up_to_date(run, job_id, stop)


def _bring_up_to_date(run: RunDir, job_id: str | None, stop: StopFlag | None) -> dict[str, Any]:
    config = run.config()
    handler = RunLogHandler(run.file(LOG))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("samat")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # the run's log file always gets the epoch lines
    run.clean_temp_files()
    run.mark_running(socket.gethostname(), job_id)
    try:
        device = pick_device()
        _set_determinism(config)
        task = tasks.get(config.task)
        dataset, model = task.build(config, device)
        loader = task.loader(config, dataset, device)
        totals, method = train(run, config, dataset, model, device, stop, loader=loader)
        checkpoint = _select_checkpoint(run, config, model)
        records = task.evaluate(run, config, model, dataset, checkpoint=checkpoint, stop=stop)
        summary = task.summary(records)
        result = _result(run, config, summary, records, totals, method, checkpoint, device)
    except Interrupted:
        log.info("stopped: progress is stored; the next attempt resumes from it")
        raise
    except BaseException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, Exception):
            run.mark_failed(message, deterministic=isinstance(error, ConfigError))
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
    run.mark_done()
    return result


def train(
    run: RunDir,
    config: RunConfig,
    dataset: Any,
    model: torch.nn.Module,
    device: torch.device,
    stop: StopFlag | None = None,
    *,
    loader: Any = None,
) -> tuple[dict[str, float], methods.Method]:
    """Epochs from the checkpoint's position to the last; the final checkpoint is left as it is
    when training was already complete (an eval-only task rewrites nothing). `loader`: the
    task's training batches (None = the image task's)."""
    train_cfg = config.train
    optimizer = make_optimizer(train_cfg.optimizer, model)
    method = methods.create(config.method, optimizer, amp=train_cfg.amp)
    if loader is None:
        loader = tasks.ImageTask().loader(config, dataset, device)
    epochs = train_cfg.total_epochs(len(loader))
    position = _resume(run, config, model, optimizer, method, epochs)
    position.totals["epochs"] = epochs
    if position.epoch >= epochs:
        if not run.state().trained:
            run.mark_trained()
        return position.totals, method
    log.info(
        "run %s: %s on %s, %d epochs from epoch %d, device %s, threads %d",
        run.run_id,
        config.method.name,
        config.data.name,
        epochs,
        position.epoch,
        device,
        torch.get_num_threads(),
    )
    bar = _progress_bar()
    task = (
        bar.add_task(
            f"{config.method.name} seed {config.seed}",
            total=train_cfg.total_steps(len(loader)) - position.epoch * len(loader) - position.step,
        )
        if bar
        else None
    )
    # compiled for the training steps only: checkpoints, validation and evaluation use the module
    # itself (a compiled module's state_dict keys carry an '_orig_mod.' prefix)
    stepped = torch.compile(model) if train_cfg.compile else model
    trackers = open_trackers(run, config, position.epoch)  # mirrors of metrics.jsonl
    try:
        while position.epoch < epochs:
            record = _epoch(
                run,
                config,
                model,
                optimizer,
                method,
                loader,
                position,
                stop,
                (bar, task),
                stepped=stepped,
            )
            record.update(_validate(run, config, dataset, model, position, loader))
            run.append_metrics(record)
            trackers.log(record)
            _save(run, config, model, optimizer, method, position)
            log.info(
                "epoch %d/%d loss %.4f train-acc %.4f lr %.4g %.1fs (%.0f img/s)%s",
                record["epoch"],
                epochs,
                record["loss"],
                record["train_accuracy"],
                record["lr"],
                record["seconds"],
                record["images_per_second"],
                "".join(f" {k} {v:.4f}" for k, v in record.items() if k.startswith("val_")),
            )
    finally:
        trackers.close()
        if bar:
            bar.stop()
    run.mark_trained()
    return position.totals, method


NAN_CHECK_EVERY = 8  # steps between two reads of the device-side NaN flag


def _epoch(
    run: RunDir,
    config: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    method: methods.Method,
    loader: DeviceLoader,
    position: Position,
    stop: StopFlag | None,
    progress: tuple[Progress | None, Any],
    *,
    stepped: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """One epoch from `position.step`; loss and accuracy summed on the device and read once.
    `stepped`: what the method steps (the compiled model under train.compile), else `model`.
    Accuracy counts pixels for segmentation (ignored ones left out), examples otherwise."""
    train_cfg = config.train
    per_epoch = len(loader)
    epochs, epoch = train_cfg.total_epochs(per_epoch), position.epoch
    all_steps = train_cfg.total_steps(per_epoch)
    # the last epoch of an iteration budget stops short
    n_steps = min(per_epoch, all_steps - epoch * per_epoch)
    schedule, base_lr = train_cfg.schedule, train_cfg.optimizer.lr

    def set_lr(step: int) -> float:
        lr = base_lr * lr_factor(schedule, epoch, epochs, epoch * per_epoch + step, all_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    # the epoch's first step's lr, also when the epoch resumes at a later step
    first_lr = base_lr * lr_factor(schedule, epoch, epochs, epoch * per_epoch, all_steps)
    lr = set_lr(position.step)
    per_step = schedule.name in PER_STEP
    model.train()
    device = next(model.parameters()).device
    partial = position.partial or {}
    loss_sum = torch.tensor(float(partial.get("loss", 0.0)), device=device, dtype=torch.float64)
    correct = torch.tensor(int(partial.get("correct", 0)), device=device)
    seen, spent = int(partial.get("seen", 0)), float(partial.get("seconds", 0.0))
    # accuracy's denominator: examples, or counted pixels (segmentation)
    counted = torch.tensor(int(partial.get("counted", seen)), device=device)
    first_bad = torch.tensor(-1, device=device)
    began = time.perf_counter()
    bar, task = progress
    step = position.step
    for step, (images, labels) in enumerate(loader.epoch(epoch, position.step), position.step):
        if step >= n_steps:
            break
        if per_step:
            lr = set_lr(step)
        out = method.step(model if stepped is None else stepped, images, labels)
        loss = out.loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss.double() * len(labels)
        hits = out.logits.argmax(1) == labels
        if labels.dim() > 1:
            valid = labels != methods.base.IGNORE_INDEX
            hits, n_counted = hits & valid, valid.sum()
        else:
            n_counted = labels.numel()
        correct += hits.sum()
        counted += n_counted
        seen += len(labels)
        if (step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == n_steps:
            _nan_guard(first_bad, epoch)
        if bar:
            bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs}")
        if stop is not None and stop.signum is not None and step + 1 < n_steps:
            _nan_guard(first_bad, epoch)
            position.step = step + 1
            position.partial = {
                "loss": float(loss_sum),
                "correct": int(correct),
                "seen": seen,
                "counted": int(counted),
                "seconds": spent + time.perf_counter() - began,
            }
            _save(run, config, model, optimizer, method, position)
            log.info("checkpointed at epoch %d step %d on signal %s", epoch, step + 1, stop.signum)
            raise Interrupted(stop.signum)
    seconds = spent + time.perf_counter() - began
    position.totals["train_seconds"] += seconds
    position.totals["images"] += seen
    position.totals["steps"] += n_steps
    position.epoch, position.step, position.partial = epoch + 1, 0, {}
    return {
        "epoch": epoch + 1,
        # the epoch's first step's lr (every step's under poly and linear schedules)
        "lr": first_lr,
        "last_lr": lr,
        "loss": float(loss_sum) / seen,
        "train_accuracy": int(correct) / max(int(counted), 1),
        "seconds": seconds,
        "images_per_second": seen / max(seconds, 1e-9),
    }


def _nan_guard(first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad)  # the one host read, every few steps
    if bad >= 0:
        raise TrainingError(
            f"loss became NaN or inf at epoch {epoch + 1} step {bad + 1}; "
            "lower train.optimizer.lr (or method.rho / eps) and resubmit"
        )


def validation_attack(config: RunConfig) -> AttackSpec | None:
    """The validation's attack: the grid's, or PGD-10 at the adversarial-training budget; None =
    clean accuracy (methods without an attack budget)."""
    chosen = config.train.validation.attack
    if chosen is not None:
        return attacks.resolve([chosen])[0]
    method = config.method
    if isinstance(method, AdversarialMethod):
        return AttackSpec(attack="pgd", norm=method.norm, eps=method.eps, steps=10)
    return None


def _validate(
    run: RunDir,
    config: RunConfig,
    dataset: Any,
    model: torch.nn.Module,
    position: Position,
    loader: Any = None,
) -> dict[str, Any]:
    """Every `validation.every` epochs: clean and robust accuracy on the held-out split; keeps the
    best weights (train.keep: best) and records a robust-accuracy collapse (FGSM-RS's
    catastrophic overfitting) with its epoch."""
    validation = config.train.validation
    epoch = position.epoch
    last = config.train.total_epochs(len(loader)) if loader is not None else config.train.epochs
    if dataset.validation is None or (epoch % validation.every and epoch != last):
        return {}
    device = next(model.parameters()).device
    split: Split = dataset.validation
    out = {
        "val_accuracy": accuracy(
            model, DeviceLoader(split, config.eval.batch_size, device=device, shuffle=False)
        )
    }
    spec = validation_attack(config)
    if spec is not None:
        images = split.images.float().div(255)
        out["val_robust"] = attacks.evaluate(
            model,
            images,
            split.labels,
            [spec],
            batch_size=config.eval.batch_size,
            num_classes=dataset.num_classes,
            seed=config.seed,
        )[attacks.label(spec)]
    score = out.get("val_robust", out["val_accuracy"])
    best = position.best
    collapsed = best and spec is not None and score < validation.collapse_ratio * best["score"]
    if collapsed and run.state().catastrophic_overfitting_epoch is None:
        run.record_overfitting(epoch)
        log.warning(
            "validation robust accuracy collapsed at epoch %d (%.4f, best %.4f): "
            "catastrophic overfitting",
            epoch,
            score,
            best["score"],
        )
    if not best or score > best["score"]:
        position.best = {"epoch": epoch, "score": score}
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        write_checkpoint(
            run.file(CHECKPOINT_BEST),
            tensors,
            {
                "epoch": epoch,
                "score": score,
                "run_id": run_id(config),
                "lineage": run.lineage(),
                "samat": __version__,
            },
        )
    return out


def _select_checkpoint(run: RunDir, config: RunConfig, model: torch.nn.Module) -> str:
    """'last' (the weights in memory) or 'best' (loaded from checkpoint-best)."""
    chosen = config.eval.checkpoint or config.train.keep
    if chosen == "best":
        path = run.file(CHECKPOINT_BEST)
        if not path.exists():
            raise ConfigError(
                f"{path} is missing: eval.checkpoint 'best' needs train.validation.size > 0 "
                "and keep 'best' when the run trains"
            )
        tensors, meta = read_checkpoint(path)
        if meta.get("run_id") != run_id(config):
            raise ConfigError(
                f"{path} belongs to another run ({meta.get('run_id')}); delete it, then "
                "`samat submit --force` trains this run again to choose its own best weights"
            )
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        log.info("evaluating the validation-best weights of epoch %d", meta["epoch"])
    return chosen


def _result(
    run: RunDir,
    config: RunConfig,
    summary: dict[str, Any],
    records: dict[str, dict[str, Any]],
    totals: dict[str, float],
    method: methods.Method,
    checkpoint: str,
    device: torch.device,
) -> dict[str, Any]:
    """Write result.json: the task's summary of the records, then how the run went."""
    eval_seconds = sum(r.get("seconds", 0.0) for r in records.values())
    best = read_checkpoint(run.file(CHECKPOINT_BEST))[1] if checkpoint == "best" else None
    epochs = int(totals.get("epochs", config.train.epochs))
    result = {
        "run_id": run.run_id,
        "task": config.task,
        "seed": config.seed,
        "method": config.method.name,
        **summary,
        "checkpoint": checkpoint,
        "checkpoint_epoch": best["epoch"] if best else epochs,
        "catastrophic_overfitting_epoch": run.state().catastrophic_overfitting_epoch,
        "train_seconds": totals["train_seconds"],
        "eval_seconds": eval_seconds,
        "images_per_second": totals["images"] / max(totals["train_seconds"], 1e-9),
        "forward_backward_passes": totals["steps"] * method.passes_per_step,
        "passes_per_step": method.passes_per_step,
        "epochs": epochs,
        "steps": totals["steps"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {**versions(), "torch_build": torch.__version__},
        "records": {label: r["key"] for label, r in records.items()},
        "request": run.request_key(),
        "lineage": run.lineage(),
    }
    write_json(run.file(RESULT), result)
    log.info(
        "natural %s %.4f; done in %.1fs train + %.1fs eval",
        result["metric"],
        result["natural"],
        totals["train_seconds"],
        eval_seconds,
    )
    return result
