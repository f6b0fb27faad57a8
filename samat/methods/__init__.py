"""Training methods (ST, SAM, ASAM, ESAM, LookSAM, PGD-AT, FGSM-AT) behind one `step` interface
and a registry.

`amp="bf16"` (or True) runs every forward (training passes and adversarial-example generation)
under `torch.autocast(device_type=images.device.type, dtype=torch.bfloat16)` on any device, CPU
included; the loss is taken in float32 and bf16 needs no GradScaler. `amp="fp16"` autocasts to
float16 and scales every backward with a GradScaler (`Method.backward`, `Method.optimizer_step`;
its scale is part of the method's checkpointed state). Parameters stay float32; `StepResult.logits`
are then bf16 or fp16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from samat.config import (
    AdversarialMethod,
    ConfigError,
    ESAMMethod,
    LookSAMMethod,
    MethodConfig,
    SAMMethod,
    StandardMethod,
)
from samat.methods.adversarial import AdversarialTraining, default_alpha, pgd
from samat.methods.base import Method, StepResult
from samat.methods.batchnorm import frozen_bn_stats
from samat.methods.esam import ESAMTraining
from samat.methods.looksam import LookSAMTraining
from samat.methods.sam import SAM, SharpnessAwareTraining, sam_perturbation
from samat.methods.standard import StandardTraining

__all__ = [
    "METHODS",
    "SAM",
    "AdversarialTraining",
    "Method",
    "SharpnessAwareTraining",
    "StandardTraining",
    "StepResult",
    "create",
    "frozen_bn_stats",
    "pgd",
    "sam_perturbation",
]

Factory = Callable[[MethodConfig, torch.optim.Optimizer, bool, torch.Generator | None], Method]


def _standard(
    cfg: StandardMethod, optimizer: torch.optim.Optimizer, amp: str, _: torch.Generator | None
) -> Method:
    return StandardTraining(optimizer, amp=amp)


def _sam(
    cfg: SAMMethod, optimizer: torch.optim.Optimizer, amp: str, _: torch.Generator | None
) -> Method:
    return SharpnessAwareTraining(
        optimizer, cfg.rho, adaptive=cfg.name == "asam", eta=cfg.eta, scaled=cfg.scaled, amp=amp
    )


def _esam(
    cfg: ESAMMethod,
    optimizer: torch.optim.Optimizer,
    amp: str,
    generator: torch.Generator | None,
) -> Method:
    return ESAMTraining(
        optimizer,
        cfg.rho,
        beta=cfg.beta,
        gamma=cfg.gamma,
        subset=cfg.subset,
        amp=amp,
        generator=generator,
    )


def _looksam(
    cfg: LookSAMMethod, optimizer: torch.optim.Optimizer, amp: str, _: torch.Generator | None
) -> Method:
    return LookSAMTraining(optimizer, cfg.rho, k=cfg.k, alpha=cfg.alpha, amp=amp)


def _pgd_at(
    cfg: AdversarialMethod,
    optimizer: torch.optim.Optimizer,
    amp: str,
    generator: torch.Generator | None,
) -> Method:
    alpha = default_alpha(cfg.norm, cfg.eps) if cfg.alpha is None else cfg.alpha
    return AdversarialTraining(
        optimizer,
        norm=cfg.norm,
        eps=cfg.eps,
        alpha=alpha,
        steps=cfg.steps,
        random_start=cfg.random_start,
        l2_start=cfg.l2_start,
        amp=amp,
        generator=generator,
    )


def _fgsm_at(
    cfg: AdversarialMethod,
    optimizer: torch.optim.Optimizer,
    amp: str,
    generator: torch.Generator | None,
) -> Method:
    # Wong et al. 2020: one step of 1.25 eps from a random start; `steps` does not apply.
    alpha = 1.25 * cfg.eps if cfg.alpha is None else cfg.alpha
    return AdversarialTraining(
        optimizer,
        norm=cfg.norm,
        eps=cfg.eps,
        alpha=alpha,
        steps=1,
        random_start=cfg.random_start,
        l2_start=cfg.l2_start,
        amp=amp,
        generator=generator,
    )


# The one place where a `method.name` in a config maps to code.
METHODS: dict[str, Factory] = {
    "standard": _standard,
    "sam": _sam,
    "asam": _sam,
    "esam": _esam,
    "looksam": _looksam,
    "pgd_at": _pgd_at,
    "fgsm_at": _fgsm_at,
}


def create(
    cfg: MethodConfig,
    optimizer: torch.optim.Optimizer,
    *,
    amp: str | bool = "off",
    generator: torch.Generator | None = None,
) -> Method:
    """The training method `cfg` names, stepping `optimizer` (the base optimizer for SAM/ASAM).

    `generator` drives the random starts of adversarial training (None: the global RNG).
    """
    factory = METHODS.get(cfg.name)
    if factory is None:
        raise ConfigError(f"unknown method.name {cfg.name!r}; use one of {', '.join(METHODS)}")
    return factory(cfg, optimizer, amp, generator)
