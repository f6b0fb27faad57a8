"""Efficient SAM, ESAM (Du et al. 2022): stochastic weight perturbation + sharpness-sensitive data
selection.

One step: (1) a clean pass; its backward computes gradients only for the parameter tensors drawn
for perturbation this step (SWP: each with probability beta). (2) Those tensors move to w + e with
e = (rho / beta) g_sel / ||g_sel||_2, the norm over the drawn tensors only, as in the authors'
code (github.com/dydjw9/Efficient_SAM, utils/Esam.py). (3) SDS: a forward-only pass at w + e gives
every example's loss increase; the sds_count(gamma, B) examples whose loss rose the most
(`subset: ceil`: ceil(gamma * B); `subset: official`: the official code's int(gamma * B) - 1, the
whole batch at gamma >= 0.99) make the second pass, whose mean-loss gradient at w + e (all
parameters) drives the base optimizer's step after w is restored. BatchNorm running statistics
follow the clean pass only.

With beta = 1 and gamma = 1 this is SAM's step exactly (`SharpnessAwareTraining`): the same
perturbation (`sam_perturbation`), no selection pass, the whole batch in its order.
"""

from __future__ import annotations

import math
from itertools import compress

import torch
from torch import nn

from samat.methods.base import Method, StepResult, classification_loss
from samat.methods.batchnorm import frozen_bn_stats
from samat.methods.sam import sam_perturbation


def esam_passes_per_step(beta: float, gamma: float) -> float:
    """Average cost of one ESAM step in forward+backward passes of the whole batch.

    A pass is counted as 1/3 forward, 1/3 input-gradient backward and 1/3 weight-gradient
    backward (a backward costs about two forwards). The clean pass skips the weight gradients of
    the tensors SWP leaves out: (2 + beta) / 3. SDS's selection forward: 1/3, only when gamma < 1
    (gamma = 1 skips it). The second pass on a gamma fraction of the batch: gamma. So
    (2 + beta) / 3 + [gamma < 1] / 3 + gamma; 2 at beta = gamma = 1 (SAM), 1.7 at the defaults
    beta 0.6, gamma 0.5.
    """
    selection = 1 / 3 if gamma < 1 else 0.0
    return (2 + beta) / 3 + selection + gamma


def sds_count(gamma: float, batch_size: int, subset: str = "ceil") -> int:
    """How many examples SDS keeps (0 < gamma <= 1), at least 1.

    'ceil': ceil(gamma * B). 'official': as github.com/dydjw9/Efficient_SAM utils/Esam.py:94-104,
    the examples strictly above the int(gamma * B)-th largest rise, int(gamma * B) - 1 of them
    without ties (63 of 128 at gamma 0.5), and the whole batch when gamma >= 0.99.
    """
    if subset == "official":
        if gamma >= 0.99:
            return batch_size
        # the same float product as the official code: int(0.29 * 100) is 28
        return max(1, int(batch_size * gamma) - 1)
    # The small offset absorbs float error in gamma * B: 0.3 * 10 = 3.0000000000000004 keeps 3.
    return max(1, math.ceil(gamma * batch_size - 1e-9))


def swp_mask(count: int, beta: float, generator: torch.Generator | None = None) -> list[bool]:
    """Which of `count` parameter tensors SWP perturbs: each independently with probability beta.

    Drawn from `generator`, a CPU generator (None: the global CPU RNG); beta >= 1 draws nothing,
    so it leaves every RNG untouched.
    """
    if beta >= 1:
        return [True] * count
    probability = torch.full((count,), beta, dtype=torch.float64)
    return torch.bernoulli(probability, generator=generator).bool().tolist()


class ESAMTraining(Method):
    """ESAM around the given base optimizer (SGD as in the paper).

    `generator`, a CPU generator, draws SWP's tensor subsets (None: the global CPU RNG, which
    checkpoints save). The draw is host-side, as is the choice of tensors it drives.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rho: float,
        *,
        beta: float = 0.6,
        gamma: float = 0.5,
        subset: str = "ceil",
        amp: str | bool = "off",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(optimizer, amp=amp)
        self.rho = rho
        self.beta = beta
        self.gamma = gamma
        self.subset = subset
        self.generator = generator
        whole = subset == "official" and gamma >= 0.99
        self.passes_per_step = esam_passes_per_step(beta, 1.0 if whole else gamma)

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Clean pass, SWP perturbation, SDS selection, second pass on the subset, restore, step."""
        self.optimizer.zero_grad()
        params = [
            p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad
        ]
        mask = swp_mask(len(params), self.beta, self.generator)
        chosen = list(compress(params, mask))
        losses, logits = classification_loss(model, images, labels, amp=self.amp, reduction="none")
        loss = losses.mean()
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if chosen:
            # autograd.grad over the drawn tensors only: the weight gradients of the others are
            # never computed (SWP's saving), and .grad stays empty for the second pass.
            grads = torch.autograd.grad(self.scaled(loss), chosen, allow_unused=True)
            present = [i for i, g in enumerate(grads) if g is not None]
            perturbed = [chosen[i] for i in present]
            shifts = sam_perturbation(perturbed, [grads[i] for i in present], self.rho / self.beta)
            with torch.no_grad():
                saved = [(p, p.detach().clone()) for p in perturbed]
                for i, p in enumerate(perturbed):
                    p.add_(shifts[i])
        batch = images.shape[0]
        keep = sds_count(self.gamma, batch, self.subset)
        with frozen_bn_stats(model):
            if keep < batch:
                with torch.no_grad():
                    after, _ = classification_loss(
                        model, images, labels, amp=self.amp, reduction="none"
                    )
                rise = after - losses.detach()
                index = torch.topk(rise, keep).indices
                images, labels = images[index], labels[index]
            second, _ = classification_loss(model, images, labels, amp=self.amp)
            self.backward(second)
        with torch.no_grad():
            # Copying the saved w back, rather than subtracting e, returns exactly to w.
            for p, w in saved:
                p.copy_(w)
        self.optimizer_step()
        return StepResult(loss.detach(), logits.detach())
