"""LookSAM (Liu et al. 2022): SAM's gradient every k steps, its part orthogonal to the plain
gradient reused in between.

Steps 0, k, 2k, ... (counted by the method) are SAM steps: g = grad L(w), g_s = grad L(w + e) with
e = rho g / ||g||_2, the base optimizer steps with g_s (exactly `SharpnessAwareTraining`), and
g_v = g_s - (g_s . g / ||g||^2) g is stored. Every other step costs one pass and steps with
g + alpha (||g|| / ||g_v||) g_v. Norms and the dot product run over all parameters jointly.
`passes_per_step` = (2 + (k - 1)) / k = 1 + 1 / k.

g_v and the step counter are the method's state: `state_dict()` is a flat dict of tensors (what a
safetensors checkpoint holds) and `load_state_dict` resumes a run exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from samat.methods.base import Method, StepResult
from samat.methods.batchnorm import frozen_bn_stats
from samat.methods.sam import SAM


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """l_2 norm of the tensors taken jointly, as a 0-dim tensor (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (no NaN, no host sync)."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(denominator))


@torch.no_grad()
def orthogonal_component(
    sam_grads: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """g_v = g_s - (g_s . g / ||g||^2) g, per tensor; g = 0 gives g_v = g_s."""
    dot = torch.stack(
        [torch.vdot(s.flatten(), g.flatten()) for s, g in zip(sam_grads, grads, strict=True)]
    ).sum()
    coefficient = _safe_ratio(dot, _norm(grads) ** 2)
    return torch._foreach_sub(list(sam_grads), torch._foreach_mul(list(grads), coefficient))


@torch.no_grad()
def looksam_gradient_(
    grads: Sequence[torch.Tensor], stored: Sequence[torch.Tensor], alpha: float
) -> None:
    """Turn g into g + alpha (||g|| / ||g_v||) g_v in place, per tensor; g_v = 0 leaves g."""
    factor = alpha * _safe_ratio(_norm(grads), _norm(stored))
    torch._foreach_add_(list(grads), torch._foreach_mul(list(stored), factor))


class LookSAMTraining(Method):
    """LookSAM around the given base optimizer: a SAM step every k steps, cheap steps between."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rho: float,
        *,
        k: int = 5,
        alpha: float = 0.7,
        amp: str | bool = "off",
    ) -> None:
        super().__init__(optimizer, amp=amp)
        self.sam = SAM(optimizer, rho)
        self.k = k
        self.alpha = alpha
        self.passes_per_step = 1 + 1 / k
        self.steps = 0
        # g_v by the parameter's index in the optimizer's flattened param_groups.
        self.stored: dict[int, torch.Tensor] = {}

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """A SAM step storing g_v when the step count is a multiple of k, else a cheap step."""
        refresh = self.steps % self.k == 0
        self.steps += 1
        self.sam.zero_grad()
        loss, logits = self.forward(model, images, labels)
        self.backward(loss)
        indexed = [(i, p) for i, p in enumerate(self._params()) if p.grad is not None]
        grads = [p.grad for _, p in indexed]
        if refresh:
            self.sam.first_step()
            self.sam.zero_grad()
            with frozen_bn_stats(model):
                perturbed_loss, _ = self.forward(model, images, labels)
            self.backward(perturbed_loss)
            sam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in indexed]
            stored = orthogonal_component(sam_grads, grads)
            if self.scaler.is_enabled():
                # fp16 gradients are scaled (g_v is used only through its direction) and may
                # overflow: a non-finite g_v is stored as 0, which leaves later gradients alone
                finite = torch.stack([torch.isfinite(v).all() for v in stored]).all()
                stored = [torch.where(finite, v, torch.zeros_like(v)) for v in stored]
            self.stored = {indexed[j][0]: v for j, v in enumerate(stored)}
            self.sam.restore()
        else:
            pairs = [(p, self.stored[i]) for i, p in indexed if i in self.stored]
            if pairs:
                looksam_gradient_([p.grad for p, _ in pairs], [v for _, v in pairs], self.alpha)
        self.optimizer_step()
        return StepResult(loss.detach(), logits.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The step counter ("step", int64) and g_v ("g_v.<param index>"), all tensors."""
        state = {**super().state_dict(), "step": torch.tensor(self.steps)}
        state.update({f"g_v.{i}": v for i, v in self.stored.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned; g_v moves to its parameter's device and dtype."""
        super().load_state_dict(state)
        params = self._params()
        self.steps = int(state["step"])
        self.stored = {}
        for key, value in state.items():
            if key.startswith("g_v."):
                index = int(key[4:])
                self.stored[index] = value.to(params[index]).clone()
