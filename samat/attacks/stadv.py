"""StAdv: adversarial examples by a smooth per-pixel flow field (Xiao et al. 2018), two ways.

StAdv moves pixels instead of changing their values: every output pixel (i, j) is read, with
bilinear interpolation, from the input at (j + flow_x, i + flow_y). torchattacks lacks it, so it is
written here as a torchattacks-like callable, `StAdv(model)(images, labels) -> adversarial images`,
on images in [0, 1] of shape [N, C, H, W] and a model that normalizes inside and returns logits.

Modes
-----
``mode="bounded"`` (the default) is the form that Laidlaw & Feizi use as a robustness column
("Perceptual Adversarial Robustness", ICLR 2021; `perceptual_advex.attacks.StAdvAttack`, built on
mister_ed's `FullSpatial` transform from github:cassidylaidlaw/ReColorAdv): each flow component is
clamped to ``[-bound, bound]`` after every step; 100 Adam steps of learning rate 0.01 from the
identity (zero flow, no random start) minimize the CW margin ``z_y - max_{k != y} z_k`` (no
confidence cap, kappa = inf) plus ``smoothness * L_flow`` with ``smoothness = 0.0025 / bound``.
Their CIFAR-10 evaluation is `StAdvAttack(model, num_iterations=100)`, bound 0.05: these defaults.

``mode="lagrangian"`` is the original attack (Xiao et al., "Spatially Transformed Adversarial
Examples", ICLR 2018; github:rakutentech/stAdv): no bound; L-BFGS (`torch.optim.LBFGS`, strong-Wolfe
line search, history 20, at most `steps` iterations) minimizes ``max(z_y - max_{k != y} z_k,
-kappa) + tau * L_flow`` with ``tau = 0.05`` and ``kappa = 0``, the flow and ``L_flow`` in pixels.
`lr` does not apply (the line search picks the step). The flow starts at zero plus uniform noise
in [-0.01, 0.01] px from `seed` (the reference demo starts from random flows; the noise is kept
small so that the start is still the clean image to the eye).

Units
-----
Flows (`warp`, `last_flow`) are in pixels, channel 0 along the width (x), channel 1 along the height
(y). `bound` is in mister_ed's units, like the reference's 0.05: normalized grid coordinates, where
the image spans [-1, 1] (`grid_sample` with ``align_corners=False``), so one pixel is 2 / W along x
and 2 / H along y, and ``bound`` is ``bound * W / 2`` pixels along x (`bound_in_pixels`): 0.8 px on
CIFAR-10 (32 x 32), 1.6 px on Tiny-ImageNet (64 x 64), 0.2 px on 8 x 8 digits. The bounded mode also
optimizes, and measures smoothness on, the flow in those units, so that Adam's step (0.01) and the
weight 0.0025 / bound mean what they mean in the reference.

`L_flow` (Xiao et al., Eq. 4) sums, over the pixels p and their 4 neighbours q, the distance
``sqrt(|du_p - du_q|^2 + |dv_p - dv_q|^2 + eps) - sqrt(eps)``; subtracting ``sqrt(eps)`` makes a
constant flow (a translation) cost exactly 0 while the gradient stays finite. Image borders repeat
the edge flow (mister_ed and the reference's symmetric padding do the same), so they cost nothing.

Which default matches the papers
--------------------------------
The SAM / AT papers' tables have a StAdv column but the authors' script has no StAdv and the papers
give no settings. The bounded perceptual-advex form (bound 0.05, 100 steps) is the usual StAdv
robustness column, so it is the default here. Unverified: the papers' SGD row (35.2 % on CIFAR-10)
looks high for this attack on a standard model, so the papers may have used a weaker setting.

Deviations from the references, on purpose
------------------------------------------
- Out-of-image samples repeat the border pixel (``padding_mode="border"``); mister_ed pads with
  zeros and clamps the grid to the image, the TF reference clamps the coordinates.
- Per example, the result is the best flow seen: a misclassified one if any, then the lowest
  objective. mister_ed keeps the lowest objective only (and stores the flow after the step whose
  loss it measured); for a robustness column a misclassified example must count as one.
- The model's train/eval mode is left as found (torchattacks and mister_ed switch to eval); only the
  flow gets gradients (`torch.autograd.grad`), never the model's parameters.

On the CPU a call is deterministic; `seed` feeds the lagrangian start only (the bounded mode starts
from zero, as its reference does).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("bounded", "lagrangian")
# Inside the square root of L_flow, so that its gradient is finite where neighbours agree.
FLOW_EPS = 1e-8
# L-BFGS memory, as the TensorFlow reference passes to SciPy's fmin_l_bfgs_b (m=20).
_LBFGS_HISTORY = 20
# Half-width, in pixels, of the uniform noise that starts the lagrangian mode.
_LAGRANGIAN_INIT = 0.01


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Resample `images` [N, C, H, W] along `flow` [N, 2, H, W] (pixels; x then y), bilinearly.

    Output pixel (i, j) is the input at (row i + flow[:, 1, i, j], column j + flow[:, 0, i, j]);
    samples outside the image take the nearest border pixel. Zero flow returns the images.
    """
    n, _, height, width = images.shape
    if flow.shape != (n, 2, height, width):
        raise ValueError(
            f"flow must have shape [{n}, 2, {height}, {width}] for images of shape "
            f"{list(images.shape)}, got {list(flow.shape)}"
        )
    cols = torch.arange(width, dtype=flow.dtype, device=flow.device).view(1, 1, width)
    rows = torch.arange(height, dtype=flow.dtype, device=flow.device).view(1, height, 1)
    x = cols + flow[:, 0]
    y = rows + flow[:, 1]
    # Pixel centre k sits at (2k + 1) / size - 1 in grid_sample's coordinates (align_corners=False).
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def smoothness_loss(flow: torch.Tensor, eps: float = FLOW_EPS) -> torch.Tensor:
    """Xiao et al.'s L_flow (Eq. 4) per example, [N], in the flow's units; 0 for a constant flow."""
    height, width = flow.shape[-2:]
    padded = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    total = flow.new_zeros(flow.shape[0], height, width)
    for top, left in ((0, 1), (2, 1), (1, 0), (1, 2)):  # up, down, left, right neighbours
        neighbour = padded[:, :, top : top + height, left : left + width]
        squared = (flow - neighbour).pow(2).sum(1)
        # sqrt(d + eps) - sqrt(eps), written so that d = 0 gives exactly 0.
        total = total + squared / ((squared + eps).sqrt() + eps**0.5)
    return total.sum((1, 2))


def bound_in_pixels(bound: float, size: int) -> float:
    """A flow bound in normalized grid units (the image spans [-1, 1]) as pixels along `size`."""
    return bound * size / 2


def flow_bound_ok(flow: torch.Tensor, bound: float, atol: float = 1e-6) -> bool:
    """Whether every component of `flow` (pixels) is within `bound` (normalized grid units)."""
    height, width = flow.shape[-2:]
    x_ok = flow[:, 0].abs().max() <= bound_in_pixels(bound, width) + atol
    y_ok = flow[:, 1].abs().max() <= bound_in_pixels(bound, height) + atol
    return bool(x_ok and y_ok)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CW margin per example: the true class's logit minus the largest other; < 0 means fooled."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.amax(1)


class StAdv:
    """StAdv as a torchattacks-like callable; see the module docstring for modes and units.

    Parameters
    ----------
    model
        Maps images in [0, 1] to logits; used as found (mode and parameters untouched).
    bound
        Bounded mode: the largest flow component, in normalized grid units (0.05 = 0.8 px at 32).
    steps
        Adam steps (bounded) or L-BFGS iterations (lagrangian).
    lr
        Adam's learning rate, in normalized grid units per step (bounded mode only).
    smoothness
        Weight of L_flow in the bounded mode; None means 0.0025 / bound, as perceptual-advex.
    mode
        "bounded" (perceptual-advex) or "lagrangian" (Xiao et al.).
    tau
        Weight of L_flow, in pixels, in the lagrangian mode.
    kappa
        Confidence of the lagrangian mode's CW loss: the margin counts down to -kappa.
    seed
        Seeds the lagrangian mode's random start.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bound: float = 0.05,
        steps: int = 100,
        lr: float = 0.01,
        smoothness: float | None = None,
        mode: Literal["bounded", "lagrangian"] = "bounded",
        tau: float = 0.05,
        kappa: float = 0.0,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"StAdv mode must be one of {', '.join(MODES)}, got {mode!r}")
        if bound <= 0 or steps < 1 or lr <= 0 or tau < 0 or kappa < 0:
            raise ValueError(
                "StAdv needs bound > 0, steps >= 1, lr > 0, tau >= 0 and kappa >= 0; got "
                f"bound={bound}, steps={steps}, lr={lr}, tau={tau}, kappa={kappa}"
            )
        self.model = model
        self.bound = bound
        self.steps = steps
        self.lr = lr
        self.smoothness = 0.0025 / bound if smoothness is None else smoothness
        self.mode = mode
        self.tau = tau
        self.kappa = kappa
        self.seed = seed
        self.last_flow: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images for `images` [N, C, H, W] in [0, 1] with true `labels` [N]."""
        if images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"StAdv needs images [N, C, H, W] and labels [N], got {list(images.shape)} "
                f"and {list(labels.shape)}"
            )
        images = images.detach()
        best = _Best(images)
        if self.mode == "bounded":
            self._bounded(images, labels, best)
        else:
            self._lagrangian(images, labels, best)
        self.last_flow = best.flow
        with torch.no_grad():
            return warp(images, best.flow).clamp(0, 1)

    def _bounded(self, images: torch.Tensor, labels: torch.Tensor, best: _Best) -> None:
        height, width = images.shape[-2:]
        to_pixels = images.new_tensor([width / 2, height / 2]).view(1, 2, 1, 1)
        # The reference's parameter: the flow in normalized grid units, starting at the identity.
        theta = torch.zeros_like(best.flow, requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=self.lr)

        def objective() -> torch.Tensor:
            flow = theta * to_pixels
            fooling = margin(self.model(warp(images, flow)), labels)
            value = fooling + self.smoothness * smoothness_loss(theta)
            best.update(flow, fooling, value)
            return value

        for _ in range(self.steps):
            (theta.grad,) = torch.autograd.grad(objective().sum(), theta)
            optimizer.step()
            with torch.no_grad():
                theta.clamp_(-self.bound, self.bound)
        with torch.no_grad():
            objective()

    def _lagrangian(self, images: torch.Tensor, labels: torch.Tensor, best: _Best) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.rand(best.flow.shape, generator=generator, dtype=images.dtype)
        flow = ((2 * start - 1) * _LAGRANGIAN_INIT).to(images.device).requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [flow],
            lr=1.0,
            max_iter=self.steps,
            history_size=_LBFGS_HISTORY,
            line_search_fn="strong_wolfe",
        )

        def objective() -> torch.Tensor:
            fooling = margin(self.model(warp(images, flow)), labels)
            value = fooling.clamp(min=-self.kappa) + self.tau * smoothness_loss(flow)
            best.update(flow, fooling, value)
            return value

        def closure() -> torch.Tensor:
            value = objective().sum()
            (flow.grad,) = torch.autograd.grad(value, flow)
            return value.detach()

        optimizer.step(closure)
        with torch.no_grad():
            objective()


class _Best:
    """Per example, the best flow seen: misclassified beats not, then the lower objective wins."""

    def __init__(self, images: torch.Tensor) -> None:
        n, _, height, width = images.shape
        self.flow = images.new_zeros(n, 2, height, width)
        self.fooled = torch.zeros(n, dtype=torch.bool, device=images.device)
        self.value = images.new_full((n,), float("inf"))

    def update(self, flow: torch.Tensor, fooling: torch.Tensor, value: torch.Tensor) -> None:
        fooled = fooling.detach() < 0
        value = value.detach()
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (value < self.value))
        self.flow[better] = flow.detach()[better]
        self.fooled |= fooled
        self.value = torch.where(better, value, self.value)
