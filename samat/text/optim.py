"""AdamW with a linear warm-up and decay: the Hugging Face fine-tuning defaults.

The papers fine-tune with AdamW at lr 5e-5 for 3 epochs and say nothing else; the Trainer's
defaults are betas (0.9, 0.999), eps 1e-8, weight decay 0 (when set, not on biases and LayerNorm
weights), a linear decay to 0 after `warmup_steps` of linear warm-up (0 by default). For SAM the
optimizer built here is the base optimizer, and the schedule drives it.
"""

from __future__ import annotations

import torch
from torch import nn


def make_adamw(
    model: nn.Module,
    lr: float = 5e-5,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """torch.optim.AdamW; weight decay skips biases and normalisation weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor rising linearly from 0 to 1 over `warmup_steps`, then falling linearly to 0 at
    `total_steps` (transformers' get_linear_schedule_with_warmup); step it once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
