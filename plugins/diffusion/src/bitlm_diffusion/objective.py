"""The ``diffusion`` objective: the continuous-time masked-diffusion ELBO on bits.

For a clean window ``x`` of ``L`` bits, draw a noise level ``t`` and mask each bit independently
with probability ``1 - alpha(t)``; the non-causal model sees the partly masked window and
predicts every bit. The negative ELBO (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024) is

    -log p(x) <= E_t E_mask [ w(t) * sum_{i masked} -log p_model(x_i | masked window) ],
    w(t) = -alpha'(t) / (1 - alpha(t)),  t ~ U(0, 1),

in nats per window. One (t, mask) draw per window gives an unbiased estimate of it. ``t`` is
clamped to ``[eps, 1]`` (the integrand is continuous at 0, so the clamp only moves a sliver of
mass by O(eps)).

Reported figures, for a batch of B windows:

* ``loss`` = mean over windows of the bound, divided by ``L``: nats per bit, the scale of the
  causal objective's cross-entropy, so the same learning rates work;
* ``bits_per_byte`` = ``loss * frame_bits / ln 2``: the bound in bits per byte, directly
  comparable with the causal model's bits per byte, and never below the true code length in
  expectation (``is_bound = True``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from bitlm_core.interfaces import ObjectiveOutput

from bitlm_diffusion.schedules import DEFAULT_EPS, SCHEDULES, get_schedule

LN2 = math.log(2.0)


def _mask_token() -> int:
    from bitlm_core.model import MASK

    return MASK


class DiffusionObjective:
    """Masked bit diffusion, trained on the continuous-time ELBO.

    Options:

    ``schedule``
        noise schedule: ``linear`` (default), ``cosine``, ``exp``, ``loglinear``.
    ``eps``
        smallest noise level sampled (``t`` is clamped to ``[eps, 1]``), in (0, 0.5);
        default 1e-3.
    ``antithetic``
        low-discrepancy ``t`` across the batch (default true): ``t_i = (u + i/B) mod 1`` with
        one uniform ``u``, so every batch covers the noise range evenly. Each ``t_i`` is still
        uniform, so the estimate stays unbiased, with lower variance.
    ``t_min``, ``t_max``, ``curriculum_steps``
        optional curriculum: for the first ``curriculum_steps`` calls in training mode the
        noise range moves linearly from ``[t_min, t_max]`` to the full ``[0, 1]``. While it is
        active the training ``bits_per_byte`` is not the bound (``extras['curriculum']`` gives
        the progress); evaluation (``model.eval()``) always uses the full range. The call count
        lives in the objective, so it restarts when a run is resumed. Off by default
        (``curriculum_steps = 0``).
    ``eval_samples``
        independent (t, mask) draws averaged per window in evaluation mode, to lower the
        variance of held-out bounds (default 1).
    ``unit``
        what is masked: ``bit`` (default: each bit on its own, the classic bit-level
        formulation) or ``frame`` (whole byte frames: masked diffusion over bytes, framed layout
        only). With ``frame`` a masked frame's bits are scored by the chain rule inside the
        frame (``model(tokens, causal=False, targets=bits)``), so its term is exactly
        ``-log p(frame | visible frames)`` and the figure stays a bound in bits per byte.
    """

    name = "diffusion"
    causal = False
    is_bound = True

    def __init__(self, schedule: str = "linear", eps: float = DEFAULT_EPS,
                 antithetic: bool = True, t_min: float = 0.0, t_max: float = 1.0,
                 curriculum_steps: int = 0, eval_samples: int = 1, unit: str = "bit"):
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not isinstance(eps, (int, float)) or not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be a number in (0, 0.5), got {eps!r}")
        if not isinstance(antithetic, bool):
            raise ValueError(f"antithetic must be true or false, got {antithetic!r}")
        if not (isinstance(t_min, (int, float)) and isinstance(t_max, (int, float))
                and 0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"t_min and t_max must satisfy 0 <= t_min < t_max <= 1, got "
                             f"t_min={t_min!r}, t_max={t_max!r}")
        if not isinstance(curriculum_steps, int) or curriculum_steps < 0:
            raise ValueError(f"curriculum_steps must be an integer >= 0, got "
                             f"{curriculum_steps!r}")
        if not isinstance(eval_samples, int) or eval_samples < 1:
            raise ValueError(f"eval_samples must be an integer >= 1, got {eval_samples!r}")
        if unit not in ("bit", "frame"):
            raise ValueError(f"unit must be 'bit' or 'frame', got {unit!r}")
        self.unit = unit
        self.schedule_name = schedule
        self.schedule = get_schedule(schedule)
        self.eps = float(eps)
        self.antithetic = antithetic
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.curriculum_steps = curriculum_steps
        self.eval_samples = eval_samples
        self.train_calls = 0

    # -- noise --------------------------------------------------------------------------
    def curriculum_progress(self) -> float:
        """1.0 once the curriculum is over (or when there is none)."""
        if self.curriculum_steps == 0:
            return 1.0
        return min(1.0, self.train_calls / self.curriculum_steps)

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None,
                 lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """(B,) float64 noise levels in ``[lo, hi]``, clamped to ``[eps, 1]``."""
        if self.antithetic:
            u = torch.rand((), generator=generator, dtype=torch.float64)
            t = (u + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
        else:
            t = torch.rand(batch, generator=generator, dtype=torch.float64)
        return (lo + (hi - lo) * t).clamp(self.eps, 1.0)

    def sample_mask(self, t: torch.Tensor, length: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, L) bool: True where a bit is masked, each with probability ``1 - alpha(t)``."""
        p_mask = 1.0 - self.schedule.alpha(t)  # (B,)
        u = torch.rand(t.numel(), length, generator=generator, dtype=torch.float64)
        return u < p_mask.unsqueeze(1)

    # -- the bound ----------------------------------------------------------------------
    def bound(self, model: Any, bits: torch.Tensor, t: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
        """Per-window negative ELBO estimate in nats, (B,), for given noise levels and masks.

        ``w(t_b) * sum_i mask[b, i] * CE(logits[b, i], bits[b, i])``, with logits from
        ``model(tokens, causal=False)`` where ``tokens`` is ``bits`` with MASK at masked places.
        """
        device = bits.device
        mask = mask.to(device)
        tokens = torch.where(mask, torch.full_like(bits, _mask_token()), bits)
        if self.unit == "frame":
            logits = model(tokens, causal=False, targets=bits)  # chain rule inside a frame
        else:
            logits = model(tokens, causal=False)  # (B, L, 2)
        ce = F.cross_entropy(logits.reshape(-1, 2).float(), bits.reshape(-1).long(),
                             reduction="none").view(bits.shape)  # (B, L)
        weight = self.schedule.weight(t, self.eps).to(device=device, dtype=torch.float32)
        return weight * (ce * mask.float()).sum(dim=1)

    def __call__(self, model: Any, bits: torch.Tensor) -> ObjectiveOutput:
        if bits.dim() != 2:
            raise ValueError(f"diffusion objective expects bits of shape (B, L), got "
                             f"{tuple(bits.shape)}")
        B, L = bits.shape
        bits = bits.to(torch.uint8)
        training = bool(getattr(model, "training", False))
        extras: dict[str, float] = {}
        if training:
            progress = self.curriculum_progress()
            lo, hi = self.t_min * (1 - progress), self.t_max + (1 - self.t_max) * progress
            if progress < 1.0:
                extras["curriculum"] = progress
            self.train_calls += 1
            draws = 1
        else:
            lo, hi, draws = 0.0, 1.0, self.eval_samples
        total = 0.0
        for _ in range(draws):
            t = self.sample_t(B, lo=lo, hi=hi)
            if self.unit == "frame":
                Fb = model.frame_bits
                mask = self.sample_mask(t, L // Fb).repeat_interleave(Fb, dim=1)
            else:
                mask = self.sample_mask(t, L)
            total = total + self.bound(model, bits, t, mask)
            extras["mask_fraction"] = float(mask.float().mean())
        per_window = total / draws  # (B,) nats
        loss = per_window.mean() / L  # nats per bit
        bpb = float(loss.detach()) * model.frame_bits / LN2
        return ObjectiveOutput(loss=loss, bits_per_byte=bpb, extras=extras, is_bound=True)
