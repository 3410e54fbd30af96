"""The three telemetry metrics: negentropy (K), LZ76 complexity (C) and symbiosis (S).

Each is a plain class following :class:`bitlm_core.interfaces.TelemetryMetric`: built with its
options, then called as ``metric(bits, probs=None) -> Tensor (B,)`` with ``bits`` of shape
``(B, L)`` (uint8 or bool, only 0 and 1; a single ``(L,)`` row is accepted as ``B = 1``) and
``probs`` of shape ``(B, L)``, the model's probability that each bit is 1. Values are float32
on the device of the input. torch is imported inside the methods, never at module import.

Summary (n = L, the bits in one row):

=============== ===================================== ======== ================================
metric          formula                               range    fair coin / constant stream
=============== ===================================== ======== ================================
negentropy K    1 - H(block) / H_max (bits)           [0, 1]   ~0 (finite-sample bias) / 1
                1 - mean_t h(p_t) (probs)             [0, 1]   0 for p = 0.5 / 1 when certain
lz_complexity C c(n) log2(n) / n (LZ76 phrases)       [0, ~1.1] ~1 (1.07 at n=1000) / ~0
symbiosis S     exp(-mean_t KL(q_t || p_t))           (0, 1]   0.5 for p = 0.5 vs observed bits
=============== ===================================== ======== ================================
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from bitlm_core.errors import BitlmError, BitsError

from bitlm_telemetry_kcs.lz76 import lz76_phrase_count, normalised_complexity

if TYPE_CHECKING:
    import torch

__all__ = ["Negentropy", "LZComplexity", "Symbiosis", "MissingProbabilitiesError"]


class MissingProbabilitiesError(BitlmError, ValueError):
    """A metric that reads the model's predictive distribution was called without ``probs``."""


def _bits_2d(bits: Any, metric: str) -> "torch.Tensor":
    """Validated (B, L) uint8 bits; a 1-D row becomes (1, L)."""
    from bitlm_core.bits import check_bits

    t = check_bits(bits, f"{metric}: bits")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise BitsError(f"{metric}: bits must have shape (B, L) (or (L,) for one row), got "
                        f"shape {tuple(t.shape)}")
    return t


def _probs_2d(probs: Any, shape: "torch.Size", metric: str) -> "torch.Tensor":
    """Validated floating (B, L) probabilities matching the bits' shape."""
    import torch

    if not isinstance(probs, torch.Tensor):
        probs = torch.as_tensor(probs, dtype=torch.float32)
    if not probs.is_floating_point():
        raise ValueError(f"{metric}: probs must be a floating tensor of probabilities, got "
                         f"{probs.dtype}")
    if probs.dim() == 1:
        probs = probs.unsqueeze(0)
    if probs.shape != shape:
        raise ValueError(f"{metric}: probs has shape {tuple(probs.shape)} but bits have shape "
                         f"{tuple(shape)}; pass P(bit = 1) for every position")
    if probs.numel():
        lo, hi = float(probs.detach().min()), float(probs.detach().max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"{metric}: probs must lie in [0, 1] (probabilities, not logits), "
                             f"found values in [{lo}, {hi}]; apply torch.sigmoid to logits")
    return probs


def _binary_entropy_bits(p: "torch.Tensor") -> "torch.Tensor":
    """h(p) = -p log2 p - (1-p) log2 (1-p), elementwise, with 0 log 0 = 0."""
    import torch

    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)


class Negentropy:
    """K: how far a stream is from fair-coin noise. 0 for noise, 1 for a fully determined stream.

    ``source="bits"`` (default): split each row into consecutive non-overlapping blocks of
    ``block_bits`` bits starting at bit 0 (leftover bits at the end are ignored), count the
    empirical distribution of block values and return ::

        K = 1 - H / H_max,   H = -sum_v f_v log2 f_v,   H_max = min(block_bits, log2 m)

    with ``m`` the number of blocks. Range [0, 1]: 1 for a constant stream (H = 0), 0 when all
    ``m`` blocks differ and look uniform. Why blocks: the entropy of single bits of English
    text is within 1% of a fair coin (K_1 ~ 0.01, useless), while byte-aligned blocks carry
    the structure (K_8 ~ 0.45 on large samples). The default 9 matches bitlm's ``parity9``
    frames, so blocks are whole bytes when rows start on a frame boundary (as bitlm's
    windows do); use 8 for ``raw8`` and 1 for the textbook single-bit negentropy.

    Finite-sample bias: the plug-in entropy of ``m`` blocks underestimates H, so noise reads
    slightly above 0 (about 0.03 at L = 1024 with 9-bit blocks) and only tends to 0 as the
    number of blocks grows; capping H_max at log2(m) keeps short rows from reading as
    structured merely because they hold fewer blocks than there are block values. A parity9
    frame's last bit is determined by the other 8, so parity-encoded random bytes tend to
    1 - 8/9 = 0.11 once m >> 512. Compare values only at the same L and block size.

    ``source="probs"``: the model's predictive distribution instead of the bits ::

        K = 1 - mean_t h(p_t)        h = binary entropy in bits

    0 when the model predicts 0.5 everywhere, 1 when it is certain everywhere. This variant is
    differentiable in ``probs`` (usable as a regulariser).
    """

    name = "negentropy"

    def __init__(self, source: str = "bits", block_bits: int = 9):
        if source not in ("bits", "probs"):
            raise ValueError(f"negentropy: source must be 'bits' or 'probs', got {source!r}")
        if isinstance(block_bits, bool) or not isinstance(block_bits, int) or not (
                1 <= block_bits <= 16):
            raise ValueError(f"negentropy: block_bits must be an integer from 1 to 16, "
                             f"got {block_bits!r}")
        self.source = source
        self.block_bits = block_bits

    @property
    def differentiable(self) -> bool:
        """Only ``source="probs"`` has a gradient (a regulariser weight needs it)."""
        return self.source == "probs"

    def __call__(self, bits: Any, probs: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        import torch

        b = _bits_2d(bits, self.name)
        if self.source == "probs":
            if probs is None:
                raise MissingProbabilitiesError(
                    "negentropy with source='probs' needs the model's probabilities: call it "
                    "as metric(bits, probs) with probs of shape (B, L), or use source='bits'")
            p = _probs_2d(probs, b.shape, self.name)
            if p.shape[1] == 0:
                return torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            return (1.0 - _binary_entropy_bits(p.float()).mean(dim=1))
        return self._from_bits(b)

    def _from_bits(self, b: "torch.Tensor") -> "torch.Tensor":
        import torch

        rows, length = b.shape
        k = self.block_bits
        m = length // k
        if m < 2:  # one block (or none) has zero entropy whatever it holds: nothing to measure
            return torch.zeros(rows, dtype=torch.float32, device=b.device)
        blocks = b[:, :m * k].reshape(rows, m, k).to(torch.int64)
        weights = 2 ** torch.arange(k - 1, -1, -1, device=b.device, dtype=torch.int64)
        values = (blocks * weights).sum(dim=2)  # (B, m) block values, MSB first
        offsets = torch.arange(rows, device=b.device, dtype=torch.int64).unsqueeze(1) << k
        counts = torch.bincount((values + offsets).reshape(-1), minlength=rows << k)
        freq = counts.reshape(rows, 1 << k).double() / m
        entropy = -torch.special.xlogy(freq, freq).sum(dim=1) / math.log(2)
        h_max = min(float(k), math.log2(m))
        return (1.0 - entropy / h_max).clamp(0.0, 1.0).float()


class LZComplexity:
    """C: normalised Lempel-Ziv 1976 complexity of each row's bits. ~1 for noise, ~0 if repetitive.

    ::

        C = c(n) * log2(n) / n

    where c(n) counts the LZ76 phrases of the row (each phrase the shortest substring not seen
    starting earlier, overlap allowed; the last phrase counts even if incomplete; see
    :mod:`bitlm_telemetry_kcs.lz76`) and n is the row length L: rows are measured whole, so
    n = L, recorded after each call in ``last_n``. Range: [0, ~1.1]; fair-coin bits give 1.07
    at n = 10^3 and 1.01 at 10^6 (it converges from above), a constant row 2 log2(n)/n (0.02
    at n = 1000), English text bits about 0.74 at 10^3 and 0.35 at 10^5. Because C depends
    on n, compare values only at one n. Low C means repetitive, degenerate output (loops,
    stuck bits); high C means incompressible, noise-like output.

    Options: ``window`` (None: exact LZ76; an int bounds how far back a match may start, which
    caps the cost at long L but is a sliding-window variant with larger counts),
    ``normalise`` (False returns the raw phrase count c(n)). Not differentiable; computed on
    CPU with numpy (the bits are copied off the device). The exact count costs about
    0.3 ms per 1,000-bit row (see ``benchmarks/telemetry.py``).
    """

    name = "lz_complexity"
    differentiable = False  # a phrase count of the bits: logged and gated, never trained on

    @property
    def bounds(self) -> tuple[float, float]:
        """Normalised C exceeds 1 on short rows (3 bits "011": 1.58) and tends to 1 from
        above; a raw phrase count is at most the row's length."""
        return (0.0, 2.0) if self.normalise else (0.0, float("inf"))

    def __init__(self, window: Optional[int] = None, normalise: bool = True):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"lz_complexity: window must be a positive integer (bits) or None "
                             f"for exact LZ76, got {window!r}")
        self.window = window
        self.normalise = bool(normalise)
        self.last_n: Optional[int] = None

    def __call__(self, bits: Any, probs: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        import torch

        b = _bits_2d(bits, self.name)
        rows = np.ascontiguousarray(b.detach().cpu().numpy())
        n = rows.shape[1]
        values = []
        for row in rows:
            count = lz76_phrase_count(row, self.window)
            values.append(normalised_complexity(count, n) if self.normalise else float(count))
        self.last_n = n
        return torch.tensor(values, dtype=torch.float32, device=b.device)


class Symbiosis:
    """S: agreement between the model's predictive distribution and a reference distribution.

    ::

        S = exp(-mean_t KL(q_t || p_t))    KL in nats;  equivalently 2 ** -(mean KL in bits)

    where p_t is the model's P(bit t = 1) and q_t the reference's. The mapping does not depend
    on the unit: exp(-KL_nats) = 2^(-KL_bits). Range (0, 1]: 1 when the model matches the
    reference everywhere, falling towards 0 as it diverges.

    ``reference="observed"`` (default): q_t is the observed bit (one-hot), so KL is the
    cross-entropy and S is the geometric mean of the probability the model gave to the bits
    that actually occurred, S = 2^(-bits per bit) (for parity9 frames S = 2^(-bits per byte / 9)).
    Perfect predictions give 1, an uninformed model (p = 0.5) exactly 0.5, a model worse than a
    coin less than 0.5: the default floor 0.5 of the ``kcs`` gate means "no better than a coin".

    ``reference="marginal"``: q_t is the row's empirical frequency of ones (the same for every
    t), so S measures how well the model's predictions match the stream's overall bit balance:
    p = 0.5 on a balanced row gives 1, on a constant row 0.5.

    Probabilities are clamped to [eps, 1 - eps] (default 1e-6) so one confident mistake costs
    at most -ln(eps) = 13.8 nats instead of infinity. Differentiable in ``probs``. Symbiosis
    needs the model's probabilities: calling it without ``probs`` raises
    :class:`MissingProbabilitiesError`.
    """

    name = "symbiosis"
    differentiable = True  # in probs: usable as a regulariser

    def __init__(self, reference: str = "observed", eps: float = 1e-6):
        if reference not in ("observed", "marginal"):
            raise ValueError(f"symbiosis: reference must be 'observed' or 'marginal', got "
                             f"{reference!r}")
        if not (0.0 < float(eps) < 0.5):
            raise ValueError(f"symbiosis: eps must lie in (0, 0.5), got {eps!r}")
        self.reference = reference
        self.eps = float(eps)

    def __call__(self, bits: Any, probs: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        import torch

        b = _bits_2d(bits, self.name)
        if probs is None:
            raise MissingProbabilitiesError(
                "symbiosis needs the model's probabilities: call it as metric(bits, probs) with "
                "probs of shape (B, L), the model's P(bit = 1) at each position (from "
                "torch.sigmoid of its logits); it cannot be computed from bits alone")
        p = _probs_2d(probs, b.shape, self.name)
        if p.shape[1] == 0:
            return torch.ones(p.shape[0], dtype=torch.float32, device=p.device)
        p = p.float().clamp(self.eps, 1.0 - self.eps)
        q = b.to(p.dtype)
        if self.reference == "marginal":
            q = q.mean(dim=1, keepdim=True).expand_as(p)
        # KL(q || p) for Bernoulli distributions, in nats; xlogy gives 0 log 0 = 0.
        kl = (torch.special.xlogy(q, q) - q * torch.log(p)
              + torch.special.xlogy(1 - q, 1 - q) - (1 - q) * torch.log1p(-p))
        return torch.exp(-kl.mean(dim=1).clamp_min(0.0))  # clamp: rounding below 0
