"""Standard training: one clean forward/backward pass and a step of the given optimizer."""

from __future__ import annotations

import torch
from torch import nn

from samat.methods.base import Method, StepResult


class StandardTraining(Method):
    """Plain empirical risk minimisation with SGD or Adam, whichever optimizer is given."""

    passes_per_step = 1

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One clean pass and one optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.forward(model, images, labels)
        self.backward(loss)
        self.optimizer_step()
        return StepResult(loss.detach(), logits.detach())
