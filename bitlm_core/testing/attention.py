"""Contract checks for attention backends: agreement with ``reference`` and no look-ahead.

Use them from a backend's tests::

    from bitlm_core.testing.attention import check_attention_contract, check_no_lookahead

    def test_my_backend():
        check_attention_contract(MyBackend())
        check_no_lookahead(MyBackend())

:func:`check_attention_contract` runs the backend and the explicit softmax(QK^T / sqrt(D)) V of
the ``reference`` backend on the same random inputs (seeded: the same cases every run) and
compares outputs and the gradients of q, k and v, for

* fp32 (tolerance :data:`FP32_TOLERANCE`) and bf16 (:data:`BF16_TOLERANCE`),
* causal and non-causal attention,
* ``Tq == Tk`` (training, prefill) and ``Tq < Tk`` (decoding with a key/value cache, queries are
  the last Tq positions; ``Tq == 1`` and ``Tq > 1`` both covered),
* chunked attention when the backend has a ``chunk_size`` attribute (or when asked): the expected
  values then come from the same explicit computation with the chunk mask (a query sees its own
  chunk plus the ``overlap`` positions before it, chunks counted in absolute positions).

The expected values are always computed in fp32 from the (bf16-rounded, for bf16 cases) inputs,
so the bf16 tolerance bounds the backend's own rounding error. A failure raises AssertionError
naming the case (shapes, dtype, causal, chunking), the tensor, the largest error and the
tolerance. The whole contract takes well under a few seconds on one CPU thread.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = [
    "Tolerance",
    "FP32_TOLERANCE",
    "BF16_TOLERANCE",
    "AttentionCase",
    "attention_cases",
    "expected_attention",
    "check_attention_contract",
    "check_no_lookahead",
]


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound ``|actual - expected| <= atol + rtol * |expected|``."""

    atol: float
    rtol: float


#: fp32: outputs and gradients of q, k, v. Fused kernels reorder sums (blocked online softmax),
#: which costs a few ulps on values of order one.
FP32_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-4)

#: bf16 (8 bits of mantissa, ulp 2**-8 = 0.0039 near 1): outputs and gradients of q, k, v against
#: the fp32 computation on the same bf16-rounded inputs. A bf16 backend rounds its
#: probabilities and its products, so a few ulps of error on values of order one are expected.
BF16_TOLERANCE = Tolerance(atol=3e-2, rtol=3e-2)

_UNSET: Any = object()


@dataclass(frozen=True)
class AttentionCase:
    """One random problem: q (B, H, Tq, D), k and v (B, H, Tk, D)."""

    batch: int
    heads: int
    tq: int
    tk: int
    dim: int
    causal: bool

    def describe(self) -> str:
        kind = "self" if self.tq == self.tk else "cache"
        return (f"B={self.batch} H={self.heads} Tq={self.tq} Tk={self.tk} D={self.dim} "
                f"causal={self.causal} ({kind})")


def attention_cases(seed: int = 0, per_kind: int = 2, max_len: int = 40) -> list[AttentionCase]:
    """Random shapes, deterministic in ``seed``: for causal and not, ``per_kind`` cases each of
    Tq == Tk, Tq == 1 < Tk and 1 < Tq < Tk."""
    rng = random.Random(seed)
    cases = []
    for causal in (False, True):
        for kind in ("self", "cache1", "cacheN"):
            for _ in range(per_kind):
                tk = rng.randint(3, max_len)
                tq = {"self": tk, "cache1": 1, "cacheN": rng.randint(2, tk - 1)}[kind]
                cases.append(AttentionCase(batch=rng.randint(1, 2), heads=rng.randint(1, 3),
                                           tq=tq, tk=tk, dim=rng.choice([8, 16, 32]),
                                           causal=causal))
    return cases


def _allowed(tq: int, tk: int, causal: bool, chunk_size: Optional[int], overlap: int):
    """(tq, tk) bool: may query i (absolute position tk - tq + i) attend key j?"""
    import torch

    query_pos = torch.arange(tk - tq, tk).view(tq, 1)
    key_pos = torch.arange(tk).view(1, tk)
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed &= key_pos <= query_pos
    if chunk_size is not None:
        same_chunk = (key_pos // chunk_size) == (query_pos // chunk_size)
        chunk_start = query_pos - query_pos % chunk_size
        just_before = (key_pos < chunk_start) & (key_pos >= chunk_start - overlap)
        allowed &= same_chunk | just_before
    return allowed


def expected_attention(q, k, v, *, causal: bool, chunk_size: Optional[int] = None,
                       overlap: int = 0):
    """The expected (out, weights) in fp32: ``reference`` without chunking, else the same
    explicit softmax with the chunk mask. Differentiable (gradients flow to q, k, v)."""
    import torch

    q, k, v = q.float(), k.float(), v.float()
    if chunk_size is None:
        from bitlm_core.builtins.attention import ReferenceAttention

        return ReferenceAttention()(q, k, v, causal=causal, need_weights=True)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    allowed = _allowed(q.size(-2), k.size(-2), causal, chunk_size, overlap).to(q.device)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(weights, v), weights


def _compare(name: str, actual, expected, tol: Tolerance, where: str) -> None:
    import torch

    if actual is None:
        raise AssertionError(f"{where}: {name} is None")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{where}: {name} has shape {tuple(actual.shape)}, expected "
                             f"{tuple(expected.shape)}")
    actual, expected = actual.detach().float(), expected.detach().float()
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{where}: {name} has non-finite values")
    error = (actual - expected).abs()
    bound = tol.atol + tol.rtol * expected.abs()
    if not bool((error <= bound).all()):
        worst = int((error - bound).argmax())
        raise AssertionError(
            f"{where}: {name} differs from the reference: max |diff| {error.max().item():.3g} "
            f"(worst element: got {actual.flatten()[worst].item():.6g}, expected "
            f"{expected.flatten()[worst].item():.6g}); tolerance atol={tol.atol:g} "
            f"rtol={tol.rtol:g}"
        )


def _random_inputs(case: AttentionCase, dtype, generator):
    import torch

    def draw(t: int):
        return torch.randn(case.batch, case.heads, t, case.dim, generator=generator).to(dtype)

    return draw(case.tq), draw(case.tk), draw(case.tk), draw(case.tq)


def _run_case(backend, case: AttentionCase, dtype, tol: Tolerance, chunk_size, overlap,
              generator, check_backward: bool, check_weights: bool) -> None:
    import torch

    q, k, v, grad_out = _random_inputs(case, dtype, generator)
    chunk = f" chunk_size={chunk_size} overlap={overlap}" if chunk_size is not None else ""
    where = f"[{type(backend).__name__} {str(dtype).replace('torch.', '')} " \
            f"{case.describe()}{chunk}]"

    qa, ka, va = (t.clone().requires_grad_(check_backward) for t in (q, k, v))
    out, weights = backend(qa, ka, va, causal=case.causal, dropout_p=0.0)
    if out.dtype != dtype:
        raise AssertionError(f"{where}: output dtype {out.dtype}, expected {dtype}")
    qe, ke, ve = (t.clone().requires_grad_(check_backward) for t in (q, k, v))
    exp_out, exp_weights = expected_attention(qe, ke, ve, causal=case.causal,
                                              chunk_size=chunk_size, overlap=overlap)
    _compare("output", out, exp_out, tol, where)

    if check_backward:
        (out.float() * grad_out.float()).sum().backward()
        (exp_out * grad_out.float()).sum().backward()
        for name, got, exp in (("grad q", qa.grad, qe.grad), ("grad k", ka.grad, ke.grad),
                               ("grad v", va.grad, ve.grad)):
            _compare(name, got, exp, tol, where)

    if check_weights:
        with torch.no_grad():
            out_w, weights = backend(q, k, v, causal=case.causal, dropout_p=0.0,
                                     need_weights=True)
        _compare("output (need_weights=True)", out_w, exp_out, tol, where)
        if weights is None:
            if getattr(backend, "supports_weights", False):
                raise AssertionError(f"{where}: supports_weights is True but need_weights=True "
                                     "returned no weights")
        else:
            _compare("attention weights", weights, exp_weights, tol, where)


def check_attention_contract(backend, *, dtypes: Sequence[str] = ("float32", "bfloat16"),
                             chunk_size: Optional[int] = _UNSET, overlap: int = _UNSET,
                             seed: int = 0, per_kind: int = 3, max_len: int = 40,
                             check_backward: bool = True, check_weights: bool = True) -> None:
    """Check that ``backend`` computes what ``reference`` computes, forward and backward.

    Args:
        backend: an attention backend (``backend(q, k, v, *, causal, dropout_p, need_weights)``).
        dtypes: "float32" (:data:`FP32_TOLERANCE`) and/or "bfloat16" (:data:`BF16_TOLERANCE`).
        chunk_size, overlap: the chunking the backend implements; by default read from the
            backend's ``chunk_size`` / ``overlap`` attributes (absent or None: full attention).
        seed: seeds both the shapes and the values.
        per_kind: random shapes per (causal, Tq == Tk / Tq == 1 / 1 < Tq < Tk) combination.
        max_len: largest Tk drawn.
        check_backward: also compare the gradients of q, k and v.
        check_weights: also call with ``need_weights=True``: the output must still match, and
            weights, when returned, must match the reference's (a backend whose
            ``supports_weights`` is True must return them).

    Raises:
        AssertionError naming the first failing case.
    """
    import torch

    if chunk_size is _UNSET:
        chunk_size = getattr(backend, "chunk_size", None)
    if overlap is _UNSET:
        overlap = getattr(backend, "overlap", 0) or 0
    tolerances = {"float32": (torch.float32, FP32_TOLERANCE),
                  "bfloat16": (torch.bfloat16, BF16_TOLERANCE)}
    unknown = [d for d in dtypes if d not in tolerances]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(tolerances)}")
    cases = attention_cases(seed=seed, per_kind=per_kind, max_len=max_len)
    generator = torch.Generator().manual_seed(seed)
    for name in dtypes:
        dtype, tol = tolerances[name]
        for index, case in enumerate(cases):
            _run_case(backend, case, dtype, tol, chunk_size, overlap, generator,
                      check_backward=check_backward,
                      check_weights=check_weights and index % 3 == 0)


def check_no_lookahead(backend, *, seed: int = 0, length: int = 24, cached_queries: int = 5,
                       atol: float = 0.0) -> None:
    """Check that causal attention never looks ahead, with and without a key/value cache.

    For several key positions j, keys and values at j are replaced by large random values; the
    outputs of every query at an (absolute) position < j must not change (within ``atol``; 0 means
    bit-identical), and the query at j itself must change (so the perturbation is effective). The
    gradients of k and v at positions >= j of a loss over the outputs before j must be zero.
    Checked for ``Tq == Tk == length`` and for the last ``cached_queries`` queries of ``length``
    keys (cache case), in fp32.

    Raises:
        AssertionError naming the backend, the case and the position.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    for tq in (length, cached_queries, 1):
        tk = length
        offset = tk - tq
        q, k, v = (torch.randn(2, 2, t, 16, generator=generator) for t in (tq, tk, tk))
        base, _ = backend(q, k, v, causal=True, dropout_p=0.0)
        for j in sorted({1, offset, offset + tq // 2, tk - 1}):
            if j < 1:
                continue
            where = (f"[{type(backend).__name__} Tq={tq} Tk={tk}] perturbing key/value "
                     f"position {j}")
            k2, v2 = k.clone(), v.clone()
            k2[..., j, :] = 50 * torch.randn(2, 2, 16, generator=generator)
            v2[..., j, :] = 50 * torch.randn(2, 2, 16, generator=generator)
            out, _ = backend(q, k2, v2, causal=True, dropout_p=0.0)
            earlier = max(0, j - offset)  # queries (rows) at absolute positions < j
            diff = (out[..., :earlier, :] - base[..., :earlier, :]).abs()
            if earlier and diff.max().item() > atol:
                raise AssertionError(f"{where}: outputs at earlier positions changed by "
                                     f"{diff.max().item():.3g} (allowed {atol:g}): look-ahead")
            if j >= offset and torch.equal(out[..., j - offset, :], base[..., j - offset, :]):
                raise AssertionError(f"{where}: the output at position {j} did not change; "
                                     "the key/value there is ignored")
            if earlier:
                qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k2, v2))
                out_g, _ = backend(qg, kg, vg, causal=True, dropout_p=0.0)
                out_g[..., :earlier, :].pow(2).sum().backward()
                leaked = max(kg.grad[..., j:, :].abs().max().item(),
                             vg.grad[..., j:, :].abs().max().item())
                if leaked > atol:
                    raise AssertionError(f"{where}: gradients reach keys/values at positions "
                                         f">= {j} from earlier outputs ({leaked:.3g}): "
                                         "look-ahead")
