"""The ``diffusion`` sampler: reverse masked diffusion from all-masked bits to clean bits.

The new bits start masked, after the (fixed) prompt. Going from noise level ``t`` to ``s < t``
over ``steps`` equal steps from 1 to 0, each still-masked bit is revealed with probability
``(alpha(s) - alpha(t)) / (1 - alpha(t))``, its value drawn from the model's prediction given
everything currently visible; the last step (``s = 0``) reveals whatever is left. Steps where
no bit is revealed skip the model call. Revealed bits are never re-masked, and prompt bits are
never touched. For encoders with a parity bit the finished frames are then made parity-valid
with ``encoder.enforce``; ``parity_fixed`` counts the parity bits it had to correct.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from bitlm_diffusion.schedules import SCHEDULES, get_schedule

MIN_STEPS, MAX_STEPS = 8, 256


class DiffusionSampler:
    """Reverse masked diffusion, conditioned on a prompt.

    Options: ``steps`` (8 to 256, default 64), ``schedule`` (``linear`` default, ``cosine``,
    ``exp``, ``loglinear``: how many bits are revealed at each step), ``temperature`` (default
    1; 0 takes the more likely bit), ``unit`` (``bit`` default; ``frame`` reveals whole byte
    frames, each drawn bit by bit from the model's chain rule inside the frame: for models
    trained with the objective's ``unit: frame``, framed layout only).

    Context: the model is non-causal, so the prompt and the new bits must fit its context
    together (``model.cfg.max_frames`` frames). When they do not, only the last part of the
    prompt that fits is shown to the model (the returned sequence still holds the whole prompt,
    unchanged). When the new bits alone exceed the context they are generated in blocks of half
    the context, each conditioned on the bits just before it (prompt and earlier blocks), with
    the full ``steps`` per block.

    Deterministic given the ``torch.Generator`` (all random draws use it). After ``sample``,
    ``parity_fixed`` holds the number of parity bits ``encoder.enforce`` corrected (0 without
    a parity encoder) and ``model_calls`` the number of forward passes.
    """

    name = "diffusion"
    causal = False

    def __init__(self, steps: int = 64, schedule: str = "linear", temperature: float = 1.0,
                 unit: str = "bit"):
        if isinstance(steps, bool) or not isinstance(steps, int) or not (
                MIN_STEPS <= steps <= MAX_STEPS):
            raise ValueError(f"steps must be an integer from {MIN_STEPS} to {MAX_STEPS}, got "
                             f"{steps!r}")
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if unit not in ("bit", "frame"):
            raise ValueError(f"unit must be 'bit' or 'frame', got {unit!r}")
        self.unit = unit
        self.steps = steps
        self.schedule = get_schedule(schedule)
        self.temperature = float(temperature)
        self.parity_fixed = 0
        self.model_calls = 0

    # -- one block ----------------------------------------------------------------------
    def _denoise(self, model: Any, context: torch.Tensor, n_bits: int,
                 generator: torch.Generator) -> torch.Tensor:
        """Generate ``n_bits`` after ``context`` (1-D bits), returning them (1-D uint8, CPU)."""
        from bitlm_core.model import MASK

        device = next(model.parameters()).device
        P = context.numel()
        tokens = torch.cat([context.to(torch.long).cpu(),
                            torch.full((n_bits,), MASK, dtype=torch.long)])
        masked = torch.ones(n_bits, dtype=torch.bool)
        a = self.schedule.alpha(torch.arange(self.steps + 1, dtype=torch.float64) / self.steps)
        for i in range(self.steps, 0, -1):  # from t = i/steps to s = (i-1)/steps
            a_t, a_s = a[i], a[i - 1]
            p_reveal = 1.0 if i == 1 else float(((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0))
            u_reveal = torch.rand(n_bits, generator=generator, dtype=torch.float64)
            u_value = torch.rand(n_bits, generator=generator, dtype=torch.float64)
            reveal = masked & (u_reveal < p_reveal)
            if not bool(reveal.any()):
                continue
            logits = model(tokens.view(1, -1).to(device), causal=False)[0, P:].float().cpu()
            self.model_calls += 1
            if self.temperature == 0:
                values = logits.argmax(dim=-1)
            else:
                p_one = torch.softmax(logits / self.temperature, dim=-1)[:, 1].double()
                values = (u_value < p_one).long()
            tokens[P:] = torch.where(reveal, values, tokens[P:])
            masked &= ~reveal
        assert not bool(masked.any()), "the last diffusion step must reveal every bit"
        return tokens[P:].to(torch.uint8)

    def _denoise_frames(self, model: Any, context: torch.Tensor, n_bits: int,
                        generator: torch.Generator) -> torch.Tensor:
        """``unit: frame``: reveal whole frames, each drawn bit by bit from the model's chain
        rule inside the frame (``model.local``) given every visible frame."""
        from bitlm_core.model import MASK

        Fb = model.frame_bits
        device = next(model.parameters()).device
        P, n = context.numel() // Fb, n_bits // Fb
        tokens = torch.cat([context.to(torch.long).cpu(),
                            torch.full((n_bits,), MASK, dtype=torch.long)]).view(-1, Fb)
        masked = torch.ones(n, dtype=torch.bool)
        a = self.schedule.alpha(torch.arange(self.steps + 1, dtype=torch.float64) / self.steps)
        for i in range(self.steps, 0, -1):
            a_t, a_s = a[i], a[i - 1]
            p_reveal = 1.0 if i == 1 else float(((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0))
            u_reveal = torch.rand(n, generator=generator, dtype=torch.float64)
            u_value = torch.rand(n, Fb, generator=generator, dtype=torch.float64)
            reveal = masked & (u_reveal < p_reveal)
            if not bool(reveal.any()):
                continue
            h = model.frame_states(tokens.view(1, -1).to(device))[0, P:][reveal.to(device)]
            self.model_calls += 1
            frame = torch.zeros(h.size(0), Fb, dtype=torch.long, device=device)
            for j in range(Fb):  # bit j given bits < j of the same frame (entry j reads no more)
                logits = model.local(h, frame)[:, j].float().cpu()
                if self.temperature == 0:
                    bit = logits.argmax(dim=-1)
                else:
                    p_one = torch.softmax(logits / self.temperature, dim=-1)[:, 1].double()
                    bit = (u_value[reveal, j] < p_one).long()
                frame[:, j] = bit.to(device)
            tokens[P:][reveal] = frame.cpu()
            masked &= ~reveal
        assert not bool(masked.any()), "the last diffusion step must reveal every frame"
        return tokens[P:].reshape(-1).to(torch.uint8)

    def _enforce(self, bits: torch.Tensor, encoder: Any, Fb: int) -> torch.Tensor:
        if encoder is None or not getattr(encoder, "has_parity", False):
            return bits
        frames, fixed = encoder.enforce(bits.numpy().reshape(-1, Fb))
        self.parity_fixed += int(fixed)
        return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8).reshape(-1))

    # -- the sampler protocol -----------------------------------------------------------
    def sample(self, model: Any, prompt: torch.Tensor, n_frames: int,
               generator: torch.Generator, encoder: Optional[Any] = None) -> torch.Tensor:
        """prompt (P,) bits of whole frames -> (P + n_frames * frame_bits,) uint8 bits."""
        Fb = model.frame_bits
        if self.unit == "frame" and model.cfg.layout != "framed":
            raise ValueError("the diffusion sampler's unit: frame needs model.layout: framed")
        if encoder is not None and getattr(encoder, "frame_bits", Fb) != Fb:
            raise ValueError(f"encoder '{getattr(encoder, 'name', '?')}' has "
                             f"{encoder.frame_bits}-bit frames but the model has {Fb}")
        prompt = torch.as_tensor(prompt)
        if prompt.dim() != 1 or prompt.numel() % Fb:
            raise ValueError(f"prompt must be 1-D bits of whole {Fb}-bit frames, got shape "
                             f"{tuple(prompt.shape)}")
        if prompt.numel() and not bool(((prompt == 0) | (prompt == 1)).all()):
            raise ValueError("prompt must hold only bits 0 and 1")
        if not isinstance(n_frames, int) or n_frames < 0:
            raise ValueError(f"n_frames must be an integer >= 0, got {n_frames!r}")
        cap = int(model.cfg.max_frames)  # context in frames, both layouts
        block = n_frames if n_frames <= cap else max(1, cap // 2)

        self.parity_fixed = 0
        self.model_calls = 0
        history = prompt.to(torch.uint8).cpu()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                remaining = n_frames
                while remaining > 0:
                    b = min(block, remaining)
                    ctx_frames = min(history.numel() // Fb, cap - b)
                    context = history[history.numel() - ctx_frames * Fb:]
                    denoise = self._denoise_frames if self.unit == "frame" else self._denoise
                    new = denoise(model, context, b * Fb, generator)
                    history = torch.cat([history, self._enforce(new, encoder, Fb)])
                    remaining -= b
        finally:
            model.train(was_training)
        return history.to(prompt.device)
