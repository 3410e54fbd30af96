"""Noise schedules for masked diffusion: ``alpha(t)``, the probability that a bit is kept.

Every schedule satisfies ``alpha(0) = 1`` (nothing masked), ``alpha(1) = 0`` (everything
masked), exactly, and is strictly decreasing on ``[0, 1]``. The continuous-time ELBO weights the
cross-entropy of masked bits by

    w(t) = -alpha'(t) / (1 - alpha(t)),

which behaves like ``1/t`` near ``t = 0`` for all four schedules below. ``w`` is evaluated with
``t`` clamped to ``[eps, 1]`` and through ``expm1``-style closed forms so that it stays finite
and accurate near 0; ``alpha`` and ``alpha'`` are exact on all of ``[0, 1]``.

Schedules (``t`` in ``[0, 1]``):

``linear``
    ``alpha = 1 - t``; ``w = 1/t``. (The SEDD/MDLM "log-linear" noise with its epsilon set to 0
    is this schedule.)
``cosine``
    ``alpha = 1 - sin(pi t / 2)`` (MD4's cosine, ``1 - cos(pi/2 (1 - t))``);
    ``w = (pi/2) / tan(pi t / 2)``. Masks faster than ``linear`` at first and more slowly
    near ``t = 1``.
``exp``
    exponential decay renormalised to hit 0 at ``t = 1``:
    ``alpha = (exp(-k t) - exp(-k)) / (1 - exp(-k))`` with ``k = 5``; ``w = k / expm1(k t)``.
    Masks quickly at first.
``loglinear``
    total noise whose logarithm is linear in t, ``sigma(t) = sigma_min^(1-t) sigma_max^t``
    (``sigma_min = 1e-3``, ``sigma_max = 10``; MDLM calls this shape "geometric"), with
    ``alpha = (exp(-sigma(t)) - exp(-sigma_max)) / (exp(-sigma_min) - exp(-sigma_max))`` so the
    end points are exact. Keeps most bits until t ~ 0.5, then masks fast.

In continuous time the bound itself depends only on the end points, so every schedule targets
the same quantity; they differ in the variance of its Monte Carlo estimate and, for sampling, in
how many bits are revealed at each step.
"""

from __future__ import annotations

import math
from typing import Union

import torch

TimeLike = Union[float, torch.Tensor]
DEFAULT_EPS = 1e-3


def _t(t: TimeLike) -> torch.Tensor:
    """``t`` as a float64 tensor clamped to [0, 1]."""
    return torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)


class Schedule:
    """Base class: subclasses give ``alpha``, ``dalpha`` and a numerically safe ``_weight``."""

    name = "schedule"

    def alpha(self, t: TimeLike) -> torch.Tensor:
        """Probability that a bit is still clean at noise level ``t`` (float64 tensor)."""
        raise NotImplementedError

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        """Derivative ``alpha'(t)`` (negative on (0, 1))."""
        raise NotImplementedError

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self.dalpha(t) / (1.0 - self.alpha(t))

    def weight(self, t: TimeLike, eps: float = DEFAULT_EPS) -> torch.Tensor:
        """ELBO weight ``-alpha'(t) / (1 - alpha(t))`` with ``t`` clamped to ``[eps, 1]``."""
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        return self._weight(_t(t).clamp(min=eps))

    def unmask_probability(self, s: TimeLike, t: TimeLike) -> torch.Tensor:
        """Chance that a bit masked at ``t`` is revealed by ``s < t``:
        ``(alpha(s) - alpha(t)) / (1 - alpha(t))``; 1 when ``s = 0``."""
        a_s, a_t = self.alpha(s), self.alpha(t)
        return ((a_s - a_t) / (1.0 - a_t).clamp(min=1e-300)).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """``alpha(t) = 1 - t``; weight ``1/t``."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - _t(t)

    def dalpha(self, t):
        return torch.full_like(_t(t), -1.0)

    def _weight(self, t):
        return 1.0 / t


class CosineSchedule(Schedule):
    """``alpha(t) = 1 - sin(pi t / 2)``; weight ``(pi/2) / tan(pi t / 2)``."""

    name = "cosine"

    def alpha(self, t):
        return 1.0 - torch.sin(0.5 * math.pi * _t(t))

    def dalpha(self, t):
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * _t(t))

    def _weight(self, t):
        return 0.5 * math.pi / torch.tan(0.5 * math.pi * t)


class ExpSchedule(Schedule):
    """``alpha(t) = (exp(-k t) - exp(-k)) / (1 - exp(-k))``; weight ``k / expm1(k t)``."""

    name = "exp"

    def __init__(self, k: float = 5.0):
        if not k > 0:
            raise ValueError(f"exp schedule rate k must be > 0, got {k}")
        self.k = float(k)

    def alpha(self, t):
        # 1 - alpha = (1 - exp(-k t)) / (1 - exp(-k)), exactly 1 at t = 1
        return 1.0 - torch.expm1(-self.k * _t(t)) / math.expm1(-self.k)

    def dalpha(self, t):
        return self.k * torch.exp(-self.k * _t(t)) / math.expm1(-self.k)

    def _weight(self, t):
        return self.k / torch.expm1(self.k * t)

    def __repr__(self) -> str:
        return f"ExpSchedule(k={self.k})"


class LogLinearSchedule(Schedule):
    """Total noise ``sigma(t) = sigma_min^(1-t) sigma_max^t``, ``alpha`` renormalised from
    ``exp(-sigma(t))`` to end exactly at 1 and 0.

    With ``r = ln(sigma_max / sigma_min)`` and ``d(t) = sigma(t) - sigma_min =
    sigma_min expm1(r t)``: ``1 - alpha = expm1(-d(t)) / expm1(-d(1))`` and the weight is
    ``sigma_min r exp(r t) / expm1(d(t))``.
    """

    name = "loglinear"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 10.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"loglinear schedule needs 0 < sigma_min < sigma_max, got "
                             f"{sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.r = math.log(sigma_max / sigma_min)
        self._d1 = sigma_min * math.expm1(self.r)

    def _d(self, t):
        return self.sigma_min * torch.expm1(self.r * t)

    def alpha(self, t):
        t = _t(t)
        return 1.0 - torch.expm1(-self._d(t)) / math.expm1(-self._d1)

    def dalpha(self, t):
        t = _t(t)
        d_prime = self.sigma_min * self.r * torch.exp(self.r * t)
        return d_prime * torch.exp(-self._d(t)) / math.expm1(-self._d1)

    def _weight(self, t):
        return self.sigma_min * self.r * torch.exp(self.r * t) / torch.expm1(self._d(t))

    def __repr__(self) -> str:
        return f"LogLinearSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LinearSchedule, CosineSchedule, ExpSchedule, LogLinearSchedule)
}


def get_schedule(name: str, option: str = "schedule") -> Schedule:
    """The schedule called ``name``; ``ValueError`` naming ``option`` and the choices if none."""
    try:
        return SCHEDULES[name]()
    except (KeyError, TypeError):
        raise ValueError(f"{option} must be one of {', '.join(SCHEDULES)}, got {name!r}") from None
