"""Optional mirrors of metrics.jsonl (TensorBoard event files, W&B offline runs), for the
dashboards researchers already use. metrics.jsonl stays the source of truth: every call into a
tracker is guarded, and a tracker that fails (a missing package, a full disk, a broken service)
logs one warning, is dropped for the rest of the attempt and never fails the run."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

from samat.config import RunConfig
from samat.store import RunDir

log = logging.getLogger("samat.trackers")

TENSORBOARD_DIR = "tensorboard"  # <run dir>/tensorboard/events.out.tfevents.*
WANDB_DIR = "wandb"  # <run dir>/wandb/offline-run-<time>-<run id>/ (made by wandb itself)
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Tracker(Protocol):
    """What train() calls: one `log` per epoch line of metrics.jsonl, `close` at the end of the
    attempt (done, stopped by a signal or failed)."""

    name: str

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line, but its step (`epoch`), by their metrics.jsonl key."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "epoch"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard, step = epoch. A resumed attempt opens a new event
    file with purge_step = its first epoch: TensorBoard drops what an earlier attempt wrote for
    the epochs that are trained again (those past the checkpoint), as metrics.jsonl does."""

    name = "tensorboard"

    def __init__(self, run: RunDir, start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run.path / TENSORBOARD_DIR), purge_step=start_epoch + 1
        )

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["epoch"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a job killed later still leaves its epochs on disk

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in offline mode whose id is the run id: every attempt of a requeued run (a new
    offline-run folder each) is the same W&B run, which `wandb sync` merges into one."""

    name = "wandb"

    def __init__(self, run: RunDir, config: RunConfig) -> None:
        import wandb

        from samat.grid import group_id

        self.run = wandb.init(
            id=run.run_id,
            resume="allow",
            mode="offline",
            dir=str(run.path),
            project=os.environ.get("WANDB_PROJECT", "samat"),
            group=group_id(config),
            name=run.state().label or run.run_id,
            config=config.model_dump(mode="json"),
            # no system-stats sampler, no code copy: the run's own log and config say it
            settings=wandb.Settings(
                silent=True, console="off", x_disable_stats=True, save_code=False
            ),
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["epoch"]))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers behind one guard: a tracker that raises is warned about once and
    dropped; the others (and the run) go on."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.active = list(trackers)

    def _call(self, what: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, what)(*args)
            except Exception as error:  # a tracker never fails the run
                self.active.remove(tracker)
                log.warning(
                    "tracker %s failed to %s (%s: %s); it is off for this attempt, "
                    "metrics.jsonl has every epoch",
                    tracker.name,
                    what,
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )

    def log(self, record: dict[str, Any]) -> None:
        self._call("log", record)

    def close(self) -> None:
        self._call("close")
        self.active = []


def open_trackers(run: RunDir, config: RunConfig, start_epoch: int) -> Trackers:
    """The trackers `track` names, each opened behind the guard (a missing package or a failed
    start is a warning naming the extra to install)."""
    opened: list[Tracker] = []
    for name in config.track:
        try:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run, start_epoch))
            else:
                opened.append(WandbTracker(run, config))
        except ImportError as error:
            log.warning(
                "track: %s needs the %s package (%s); pip install 'samat[%s]'; "
                "training goes on without it",
                name,
                EXTRAS[name],
                error,
                name,
            )
        except Exception as error:
            log.warning(
                "tracker %s did not start (%s: %s); training goes on without it",
                name,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
    return Trackers(opened)
