"""Freezing BatchNorm running statistics for the extra forward passes SAM and AT make."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Leave BatchNorm running statistics (and num_batches_tracked) untouched inside the block.

    A train-mode BatchNorm still normalises with the batch's statistics, so the forward is the
    one training sees; eval mode is unaffected. Used for SAM's perturbed pass and for generating
    adversarial examples, so the running statistics follow only the batches actually trained on.
    """
    # A BatchNorm that does not track running stats hands no buffers to F.batch_norm in train
    # mode, so nothing is updated: exact, with no arithmetic on the buffers to undo afterwards.
    tracking = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for module in tracking:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in tracking:
            module.track_running_stats = True
