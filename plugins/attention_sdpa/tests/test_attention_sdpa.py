"""Tests of the ``sdpa`` attention backend: reference contract, masks, dropout, registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bitlm_attention_sdpa.backend import SdpaAttention, chunk_mask
from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.errors import ResolutionError
from bitlm_core.registry import get_registry
from bitlm_core.testing.attention import (FP32_TOLERANCE, check_attention_contract,
                                          check_no_lookahead, expected_attention)

CHUNKINGS = [(8, 0), (8, 3), (5, 7), (1, 0), (64, 4)]


def qkv(tq: int, tk: int, b: int = 2, h: int = 3, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h, tk, d, generator=g),
            torch.randn(b, h, tk, d, generator=g))


# -- contract ------------------------------------------------------------------------------------
def test_reference_passes_its_own_contract():
    check_attention_contract(ReferenceAttention())
    check_no_lookahead(ReferenceAttention())


def test_sdpa_contract():
    check_attention_contract(SdpaAttention())


def test_sdpa_never_looks_ahead():
    check_no_lookahead(SdpaAttention())


@pytest.mark.parametrize("chunk_size,overlap", CHUNKINGS)
def test_chunked_sdpa_contract(chunk_size, overlap):
    backend = SdpaAttention(chunk_size=chunk_size, overlap=overlap)
    check_attention_contract(backend, dtypes=("float32",), seed=chunk_size)
    check_no_lookahead(backend)


def test_chunked_bf16_contract():
    check_attention_contract(SdpaAttention(chunk_size=8, overlap=3), dtypes=("bfloat16",))


def test_contract_catches_a_top_left_aligned_backend():
    """The classic cache bug (torch's is_causal with Tq < Tk) must not pass the contract."""

    class TopLeft:
        supports_weights = False

        def __call__(self, q, k, v, *, causal, dropout_p=0.0, need_weights=False):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal), None

    with pytest.raises(AssertionError, match="cache"):
        check_attention_contract(TopLeft(), dtypes=("float32",))


def test_contract_catches_a_backend_that_looks_ahead():
    class Leaky:
        supports_weights = False

        def __call__(self, q, k, v, *, causal, dropout_p=0.0, need_weights=False):
            return F.scaled_dot_product_attention(q, k, v), None

    with pytest.raises(AssertionError, match="look-ahead"):
        check_no_lookahead(Leaky())


def test_chunked_equals_full_when_one_chunk_covers_everything():
    q, k, v = qkv(20, 20)
    full, _ = SdpaAttention()(q, k, v, causal=True)
    chunked, _ = SdpaAttention(chunk_size=32)(q, k, v, causal=True)
    torch.testing.assert_close(chunked, full, atol=FP32_TOLERANCE.atol, rtol=FP32_TOLERANCE.rtol)


def test_cached_decoding_matches_full_forward_with_chunks():
    """Feeding the last positions with a cache gives the rows of the full forward pass."""
    backend = SdpaAttention(chunk_size=6, overlap=2)
    q, k, v = qkv(23, 23)
    full, _ = backend(q, k, v, causal=True)
    for tq in (1, 4, 9):
        part, _ = backend(q[..., -tq:, :], k, v, causal=True)
        torch.testing.assert_close(part, full[..., -tq:, :], atol=1e-6, rtol=1e-5)


# -- how SDPA is called --------------------------------------------------------------------------
@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record the keyword arguments and key lengths of every SDPA call."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append({"tq": q.size(-2), "tk": k.size(-2), **kwargs})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_square_causal_uses_is_causal_and_no_mask(sdpa_calls):
    SdpaAttention()(*qkv(12, 12), causal=True)
    assert sdpa_calls[-1].get("is_causal") is True
    assert sdpa_calls[-1].get("attn_mask") is None


def test_single_query_decoding_needs_no_mask(sdpa_calls):
    SdpaAttention()(*qkv(1, 12), causal=True)
    assert not sdpa_calls[-1].get("is_causal", False)
    assert sdpa_calls[-1].get("attn_mask") is None


def test_several_cached_queries_use_a_bottom_right_mask(sdpa_calls):
    SdpaAttention()(*qkv(3, 12), causal=True)
    call = sdpa_calls[-1]
    assert not call.get("is_causal", False)
    mask = call["attn_mask"]
    assert mask.dtype == torch.bool and tuple(mask.shape) == (3, 12)
    assert mask[0].tolist() == [True] * 10 + [False] * 2  # query 0 is absolute position 9


@pytest.mark.parametrize("chunk_size,overlap", CHUNKINGS)
def test_chunked_calls_see_at_most_chunk_plus_overlap_keys(sdpa_calls, chunk_size, overlap):
    """Memory is linear in length: no call ever forms more than S x (S + overlap) scores."""
    SdpaAttention(chunk_size=chunk_size, overlap=overlap)(*qkv(50, 50), causal=True)
    assert sdpa_calls
    assert all(c["tq"] <= chunk_size and c["tk"] <= chunk_size + overlap for c in sdpa_calls)


# -- need_weights fallback ----------------------------------------------------------------------
def test_need_weights_falls_back_to_reference():
    backend = SdpaAttention()
    assert backend.supports_weights is False
    for tq, tk in ((10, 10), (3, 10), (1, 10)):
        q, k, v = qkv(tq, tk)
        out, weights = backend(q, k, v, causal=True, need_weights=True)
        ref_out, ref_weights = ReferenceAttention()(q, k, v, causal=True, need_weights=True)
        assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)


def test_chunked_need_weights_are_masked_probabilities():
    q, k, v = qkv(20, 20)
    out, weights = SdpaAttention(chunk_size=6, overlap=2)(q, k, v, causal=True,
                                                          need_weights=True)
    assert tuple(weights.shape) == (2, 3, 20, 20)
    allowed = chunk_mask(20, 20, 6, 2, causal=True)
    assert weights[..., ~allowed].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 20))
    exp_out, exp_weights = expected_attention(q, k, v, causal=True, chunk_size=6, overlap=2)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(weights, exp_weights)


def test_chunk_mask_examples():
    mask = chunk_mask(8, 8, chunk_size=4, overlap=1, causal=False)
    assert mask[5].tolist() == [False, False, False, True, True, True, True, True]
    assert mask[2].tolist() == [True] * 4 + [False] * 4
    causal = chunk_mask(8, 8, chunk_size=4, overlap=1, causal=True)
    assert causal[5].tolist() == [False, False, False, True, True, True, False, False]


# -- dropout ------------------------------------------------------------------------------------
def test_dropout_zero_is_exact_and_deterministic():
    backend = SdpaAttention()
    q, k, v = qkv(16, 16)
    a, _ = backend(q, k, v, causal=True)
    b, _ = backend(q, k, v, causal=True, dropout_p=0.0)
    assert torch.equal(a, b)
    ref, _ = ReferenceAttention()(q, k, v, causal=True)
    torch.testing.assert_close(a, ref, atol=FP32_TOLERANCE.atol, rtol=FP32_TOLERANCE.rtol)


@pytest.mark.parametrize("backend", [SdpaAttention(), SdpaAttention(chunk_size=4, overlap=2)],
                         ids=["full", "chunked"])
def test_dropout_changes_outputs_but_not_their_mean(backend):
    q, k, v = qkv(12, 12, b=1, h=2)
    clean, _ = backend(q, k, v, causal=True)
    torch.manual_seed(0)
    first, _ = backend(q, k, v, causal=True, dropout_p=0.3)
    second, _ = backend(q, k, v, causal=True, dropout_p=0.3)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)
    # Inverted dropout keeps the expectation: the mean of many draws approaches the clean output.
    mean = torch.stack([backend(q, k, v, causal=True, dropout_p=0.3)[0]
                        for _ in range(400)]).mean(0)
    assert (mean - clean).abs().mean() < 0.05


def test_dropout_backward_runs():
    q, k, v = (t.requires_grad_(True) for t in qkv(9, 9))
    out, _ = SdpaAttention()(q, k, v, causal=False, dropout_p=0.2)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# -- errors and options ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"chunk_size": -3}, {"chunk_size": 2.5},
                                    {"chunk_size": 8, "overlap": -1}, {"overlap": 4}])
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SdpaAttention(**kwargs)


def test_bad_shapes_are_rejected():
    backend = SdpaAttention()
    q, k, v = qkv(5, 5)
    with pytest.raises(ValueError, match="4-d"):
        backend(q[0], k[0], v[0], causal=True)
    with pytest.raises(ValueError, match="incompatible"):
        backend(q, k[..., :8], v, causal=True)
    q, k, v = qkv(6, 4)
    with pytest.raises(ValueError, match="queries"):
        backend(q, k, v, causal=True)
    out, _ = backend(q, k, v, causal=False)  # cross-attention with more queries is fine
    assert tuple(out.shape) == (2, 3, 6, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        backend(q, k, v, causal=False, dropout_p=1.0)


# -- plugin registration ------------------------------------------------------------------------
def test_registry_finds_sdpa():
    registry = get_registry(refresh=True)
    assert "sdpa" in registry.names("attention")
    record = registry.get("attention", "sdpa")
    assert record.plugin == "attention_sdpa"
    assert record.distribution == "bitlm-attention-sdpa"
    backend = registry.build("attention", "sdpa", {"chunk_size": 16, "overlap": 4})
    assert isinstance(backend, SdpaAttention) and backend.chunk_size == 16
    with pytest.raises(ResolutionError, match="overlap"):
        registry.build("attention", "sdpa", {"overlapp": 4})
    with pytest.raises(ResolutionError, match="rejected"):
        registry.build("attention", "sdpa", {"chunk_size": 0})


def test_importing_the_plugin_does_not_import_torch():
    code = ("import sys, bitlm_attention_sdpa.plugin, bitlm_attention_sdpa.backend; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
