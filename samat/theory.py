"""The binary toy model of the SAM/AT papers, computed exactly.

y is uniform in {-1, +1}; the robust feature x_1 equals y with probability p and -y otherwise; the
n non-robust features x_2..x_{n+1} are iid N(eta * y, 1). The classifier is sign(w . x) with
w_2 = .. = w_{n+1} = 1, so only w_1 is learned, and W_R = w_1 / n is the robust-feature weight.

Given y = +1 (y = -1 is the mirror image) the non-robust sum is N(n eta, n), so the accuracy is
u(w_1) = p Phi(a) + (1 - p) Phi(b) with a = (w_1 + n eta) / sqrt(n), b = (n eta - w_1) / sqrt(n).
Its slope has the sign of log(p phi(a)) - log((1 - p) phi(b)), which decreases strictly in w_1, so u
is unimodal: every optimum below is the root of a monotone function, found by Brent's method to a
few machine epsilons of the computed margins (1e-15 relative at the papers' scale; rounding of a^2
and b^2 costs accuracy as n eta^2 grows: 1e-10 at n = 1e5, eta = 0.5). The papers' closed forms
(Thm 4.1 - 4.5) are kept separate, to be compared with these exact optima rather than assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

# 16-point Gauss-Legendre integrates exp(c s), |c| <= 1.5 on [-1, 1], to machine precision: that is
# the regime in which _log_interval_mass uses it.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)
# Brent's method guarantees at best 4 machine epsilons relative; every optimum asks for that.
_RTOL = 4 * float(np.finfo(float).eps)
_XTOL = 1e-300
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class ToyModel:
    """Parameters of the toy model: reliability p of x_1, mean eta of x_2.., number n of those."""

    p: float
    eta: float
    n: int

    def __post_init__(self) -> None:
        if not 0.5 < self.p < 1:
            raise ValueError(f"p must lie strictly between 0.5 and 1, got {self.p}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {self.eta}")
        if int(self.n) != self.n or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")

    @property
    def log_odds(self) -> float:
        """Log-odds ln p - ln(1 - p) that x_1 agrees with y."""
        return math.log(self.p) - math.log1p(-self.p)


def _margins(model: ToyModel, w1: float, mean: float) -> tuple[float, float]:
    """Standardised margins (a, b) of w . x given y = +1 and x_1 = +1 (a) or x_1 = -1 (b)."""
    root_n = math.sqrt(model.n)
    return (w1 + model.n * mean) / root_n, (model.n * mean - w1) / root_n


def _accuracy(model: ToyModel, w1: float, mean: float) -> float:
    """Exact accuracy when the non-robust features have mean `mean` * y."""
    a, b = _margins(model, w1, mean)
    return float(model.p * ndtr(a) + (1 - model.p) * ndtr(b))


def accuracy(model: ToyModel, w1: float) -> float:
    """Exact clean accuracy u(w_1) of sign(w . x)."""
    return _accuracy(model, w1, model.eta)


def adversarial_accuracy(model: ToyModel, w1: float, eps: float) -> float:
    """Exact accuracy under the worst l_inf attack of budget eps on the non-robust features.

    The attack moves every x_2.. by -eps * y, so their mean becomes eta - eps, as in the papers'
    Thm 4.2. The robust x_1 is left alone: it is +-1, and an eps < 1 attack cannot flip its sign.
    It could still shrink x_1 to (1 - eps) y; that stronger threat model is the same formula with
    w_1 replaced by (1 - eps) w_1, and would put a factor 1 / (1 - eps) on Thm 4.2.
    """
    return _accuracy(model, w1, model.eta - eps)


def sam_accuracy(model: ToyModel, w1: float, radius: float) -> float:
    """SAM objective: the worst accuracy over w_1 + d, |d| <= radius (unimodal u: an endpoint)."""
    return min(accuracy(model, w1 - radius), accuracy(model, w1 + radius))


def robust_weight(model: ToyModel, w1: float) -> float:
    """Robust-feature weight W_R = w_1 / n."""
    return w1 / model.n


def _argmax_accuracy(model: ToyModel, mean: float) -> float:
    """Maximiser of the accuracy at non-robust mean `mean` > 0."""

    def slope_sign(w1: float) -> float:
        a, b = _margins(model, w1, mean)
        return model.log_odds - 0.5 * a * a + 0.5 * b * b

    # At w_1 = 0, a = b and the slope sign is the log-odds, positive since p > 1/2.
    high = 1.0
    while slope_sign(high) > 0:
        high *= 2
    return float(brentq(slope_sign, 0.0, high, xtol=_XTOL, rtol=_RTOL))


def optimal_w1_standard(model: ToyModel) -> float:
    """w_1 maximising the clean accuracy (standard training), found numerically."""
    return _argmax_accuracy(model, model.eta)


def optimal_w1_adversarial(model: ToyModel, eps: float) -> float | None:
    """w_1 maximising the adversarial accuracy at l_inf budget eps; None when eps >= eta.

    At eps >= eta the attacked non-robust features no longer point towards y, the accuracy rises
    towards p as w_1 grows without bound, and no finite maximiser exists.
    """
    if eps >= model.eta:
        return None
    return _argmax_accuracy(model, model.eta - eps)


def _log_interval_mass(m: float, h: float) -> float:
    """log(Phi(m + h) - Phi(m - h)) for h > 0, accurate for narrow and wide intervals alike."""
    m = abs(m)
    if h * max(m, 1.0) <= 1.0:
        # A difference of CDFs would cancel here; integrate phi(m) exp(-m s - s^2 / 2) instead.
        s = h * _GL_NODES
        integral = h * float(np.dot(_GL_WEIGHTS, np.exp(-m * s - 0.5 * s * s)))
        return -0.5 * m * m - _LOG_SQRT_2PI + math.log(integral)
    upper, lower = float(log_ndtr(h - m)), float(log_ndtr(-h - m))
    return upper + math.log1p(-math.exp(lower - upper))


def optimal_w1_sam(model: ToyModel, radius: float) -> float:
    """w_1 maximising min over |d| <= radius of u(w_1 + d), the SAM objective, found numerically.

    The optimum balances the endpoints, u(w_1 + radius) = u(w_1 - radius). Their difference is
    p M(a) - (1 - p) M(b), M(m) the normal mass of [m - h, m + h], h = radius / sqrt(n); its sign is
    found in log space, which keeps the O(radius^2) shift from w_1* resolvable down to radii of
    about 1e-6 (for p = 0.9, eta = 0.1, n = 100). Below double precision it returns w_1*.
    """
    w_star = optimal_w1_standard(model)
    if radius == 0:
        return w_star
    h = radius / math.sqrt(model.n)

    def balance(w1: float) -> float:
        a, b = _margins(model, w1, model.eta)
        return model.log_odds + _log_interval_mass(a, h) - _log_interval_mass(b, h)

    low, high = w_star - radius, w_star + radius
    if not balance(low) > 0 > balance(high):
        return w_star
    return float(brentq(balance, low, high, xtol=_XTOL, rtol=_RTOL))


def matching_sam_radius(model: ToyModel, eps_at: float) -> float | None:
    """SAM radius whose optimum has the same W_R as AT at budget eps_at (numeric Thm 4.5)."""
    target = optimal_w1_adversarial(model, eps_at)
    if target is None:
        return None
    if eps_at == 0:
        return 0.0

    def gap(radius: float) -> float:
        return optimal_w1_sam(model, radius) - target

    # The SAM optimum grows like radius + const for large radii, so doubling reaches the target.
    high = 1.0
    while gap(high) < 0:
        high *= 2
    return float(brentq(gap, 0.0, high, xtol=_XTOL, rtol=1e-13))


def w1_standard_closed(model: ToyModel) -> float:
    """Thm 4.1: w_1* = (ln p - ln(1 - p)) / (2 eta)."""
    return model.log_odds / (2 * model.eta)


def w1_adversarial_closed(model: ToyModel, eps: float) -> float | None:
    """Thm 4.2: w_1^AT = (ln p - ln(1 - p)) / (2 (eta - eps)); None when eps >= eta."""
    if eps >= model.eta:
        return None
    return model.log_odds / (2 * (model.eta - eps))


def w1_sam_thm44(model: ToyModel, radius: float) -> float:
    """Thm 4.4 as stated by the papers: W_R^SAM ~ W_R* (1 + (2/3) radius^2)."""
    return w1_standard_closed(model) * (1 + 2 / 3 * radius**2)


def w1_sam_leading_order(model: ToyModel, radius: float) -> float:
    """Exact small-radius law of this model: w_1^SAM ~ w_1* (1 + radius^2 / (3 n)).

    Expanding u(w + r) = u(w - r) around w_1* gives w_1^SAM - w_1* ~ -u''' r^2 / (6 u''), and at
    w_1* the two density terms are equal, so u'' = -2 eta C / sqrt(n) and
    u''' = 4 eta w_1* C / n^(3/2) with C = p phi(a): the shift is w_1* r^2 / (3 n).
    """
    return w1_standard_closed(model) * (1 + radius**2 / (3 * model.n))


def sam_radius_thm45(model: ToyModel, eps_at: float) -> float | None:
    """Thm 4.5: the radius solving 2 + 3 / eps_SAM^2 = 2 eta / eps_AT; None when eps_AT >= eta."""
    if eps_at >= model.eta:
        return None
    return math.sqrt(3 * eps_at / (2 * (model.eta - eps_at)))


def _relative_error(approx: float | None, exact: float | None) -> float | None:
    """Signed (approx - exact) / |exact|; None when either side is undefined or exact is 0."""
    if approx is None or exact is None or exact == 0:
        return None
    return (approx - exact) / abs(exact)


def compare_with_theorems(
    model: ToyModel, eps: float, eps_at: float | None = None
) -> dict[str, float | bool | None]:
    """Exact optima next to Thm 4.1 - 4.5 at SAM radius eps and AT budget eps_at (default eps).

    Robust accuracies are under the l_inf attack of budget eps_at of `adversarial_accuracy`.
    """
    eps_at = eps if eps_at is None else eps_at
    w_st = optimal_w1_standard(model)
    w_at = optimal_w1_adversarial(model, eps_at)
    w_sam = optimal_w1_sam(model, eps)
    w_st_closed = w1_standard_closed(model)
    w_at_closed = w1_adversarial_closed(model, eps_at)
    w_sam_thm44 = w1_sam_thm44(model, eps)
    eps_sam_matching = matching_sam_radius(model, eps_at)
    eps_sam_formula = sam_radius_thm45(model, eps_at)
    sam_excess = w_sam / w_st - 1
    return {
        "p": model.p,
        "eta": model.eta,
        "n": model.n,
        "eps": eps,
        "eps_at": eps_at,
        "w_st": w_st,
        "w_at": w_at,
        "w_sam": w_sam,
        "w_st_closed": w_st_closed,
        "w_at_closed": w_at_closed,
        "w_sam_thm44": w_sam_thm44,
        "w_sam_leading_order": w1_sam_leading_order(model, eps),
        "sam_exceeds_st": w_sam > w_st,
        "w_st_rel_error": _relative_error(w_st_closed, w_st),
        "w_at_rel_error": _relative_error(w_at_closed, w_at),
        "w_sam_thm44_rel_error": _relative_error(w_sam_thm44, w_sam),
        "w_r_st": robust_weight(model, w_st),
        "w_r_at": None if w_at is None else robust_weight(model, w_at),
        "w_r_sam": robust_weight(model, w_sam),
        "sam_excess": sam_excess,
        "sam_excess_thm44": 2 / 3 * eps**2,
        "sam_excess_leading_order": eps**2 / (3 * model.n),
        "sam_excess_rel_error": _relative_error(2 / 3 * eps**2, sam_excess),
        "eps_sam_matching": eps_sam_matching,
        "eps_sam_formula": eps_sam_formula,
        "eps_sam_rel_error": _relative_error(eps_sam_formula, eps_sam_matching),
        "clean_acc_st": accuracy(model, w_st),
        "clean_acc_at": None if w_at is None else accuracy(model, w_at),
        "clean_acc_sam": accuracy(model, w_sam),
        "robust_acc_st": adversarial_accuracy(model, w_st, eps_at),
        "robust_acc_at": None if w_at is None else adversarial_accuracy(model, w_at, eps_at),
        "robust_acc_sam": adversarial_accuracy(model, w_sam, eps_at),
    }
