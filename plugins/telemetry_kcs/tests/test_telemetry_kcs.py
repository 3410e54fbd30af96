"""Tests of the telemetry_kcs plugin: LZ76 exactness, metric values and limits, the kcs gate."""

from __future__ import annotations

import functools
import gzip
import math
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.bits import bytes_to_frames
from bitlm_core.errors import BitsError, ResolutionError
from bitlm_core.registry import get_registry
from bitlm_telemetry_kcs import (KCSGate, LZComplexity, MissingProbabilitiesError, Negentropy,
                                 Symbiosis, lz76_complexity, lz76_phrase_count,
                                 lz76_phrase_count_reference, lz76_phrases_reference,
                                 normalised_complexity)

FACTS_EXAMPLE = "1001111011000010"


@functools.lru_cache(maxsize=1)
def corpus() -> bytes:
    path = resources.files("bitlm_core") / "data" / "quickstart.txt.gz"
    return gzip.decompress(path.read_bytes())


def english_bits(n_bits: int, offset: int = 100_000) -> np.ndarray:
    """n_bits of parity9-framed English text (Jane Austen, from the core's quickstart corpus)."""
    text = corpus()
    n_bytes = -(-n_bits // 9)
    return bytes_to_frames(text[offset:offset + n_bytes]).reshape(-1)[:n_bits].copy()


def random_bits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


# -- LZ76: hand-computed cases ----------------------------------------------------------------
def test_facts_example_parses_into_six_phrases():
    assert lz76_phrases_reference(FACTS_EXAMPLE) == ["1", "0", "01", "1110", "1100", "0010"]
    assert lz76_phrase_count_reference(FACTS_EXAMPLE) == 6
    assert lz76_phrase_count(FACTS_EXAMPLE) == 6  # not 8, the LZ78 dictionary count


@pytest.mark.parametrize("bits, phrases", [
    ("", []),
    ("0", ["0"]),
    ("01", ["0", "1"]),
    ("0000", ["0", "000"]),              # overlap: 000 occurs at j=0 inside 0000
    ("00001", ["0", "0001"]),
    ("010101", ["0", "1", "0101"]),      # the last phrase is cut short by the end
    ("0110", ["0", "1", "10"]),
    ("10110100", ["1", "0", "11", "010", "0"]),
])
def test_small_parses(bits, phrases):
    assert lz76_phrases_reference(bits) == phrases
    assert lz76_phrase_count(bits) == len(phrases)


def test_input_types_agree():
    a = np.array([int(c) for c in FACTS_EXAMPLE], dtype=np.uint8)
    for form in (a, a.astype(bool), a.tolist(), torch.from_numpy(a), FACTS_EXAMPLE):
        assert lz76_phrase_count(form) == 6


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="only 0 and 1"):
        lz76_phrase_count(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="one bit sequence"):
        lz76_phrase_count(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="window"):
        lz76_phrase_count("0101", window=0)


def test_constant_stream_has_two_phrases():
    for n in (2, 9, 100, 10_000):
        assert lz76_phrase_count(np.ones(n, dtype=np.uint8)) == 2
    assert normalised_complexity(2, 1000) == pytest.approx(2 * math.log2(1000) / 1000)
    assert normalised_complexity(1, 1) == 0.0 and normalised_complexity(0, 0) == 0.0


# -- LZ76: fast == reference --------------------------------------------------------------------
@st.composite
def lz_inputs(draw, max_size: int = 400) -> np.ndarray:
    """Random, biased, periodic and text-like bit strings: the shapes that stress a parser."""
    n = draw(st.integers(0, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["fair", "biased", "periodic", "noisy_periodic", "text"]))
    if kind == "fair":
        return rng.integers(0, 2, n, dtype=np.uint8)
    if kind == "biased":
        return (rng.random(n) < draw(st.floats(0.0, 1.0))).astype(np.uint8)
    if kind in ("periodic", "noisy_periodic"):
        period = rng.integers(0, 2, draw(st.integers(1, 40)), dtype=np.uint8)
        bits = np.resize(period, n)
        if kind == "noisy_periodic":
            bits ^= (rng.random(n) < 0.02).astype(np.uint8)
        return bits
    return english_bits(n, offset=int(rng.integers(0, 900_000)))


@settings(max_examples=400, deadline=None)
@given(lz_inputs())
def test_fast_count_equals_reference(bits):
    assert lz76_phrase_count(bits) == lz76_phrase_count_reference(bits)


@settings(max_examples=150, deadline=None)
@given(lz_inputs(max_size=300), st.integers(1, 64))
def test_windowed_count_equals_windowed_reference(bits, window):
    assert lz76_phrase_count(bits, window) == lz76_phrase_count_reference(bits, window)


def test_fast_equals_reference_on_longer_streams():
    for bits in (random_bits(3000, 1), english_bits(3000), np.resize([1, 0, 0], 3000)):
        assert lz76_phrase_count(bits) == lz76_phrase_count_reference(bits)


# -- LZ76: limits -----------------------------------------------------------------------------
def test_random_bits_have_complexity_near_one():
    c1000 = np.mean([lz76_complexity(random_bits(1000, s)) for s in range(20)])
    assert 1.0 < c1000 < 1.13  # literature: 1.07 at n = 10^3, converging from above
    assert 0.95 < lz76_complexity(random_bits(20_000, 7)) < 1.07


def test_constant_and_periodic_streams_have_complexity_near_zero():
    n = 10_000
    assert lz76_complexity(np.zeros(n, dtype=np.uint8)) == pytest.approx(2 * math.log2(n) / n)
    for period in ([0, 1], [1, 1, 0], list(map(int, "100110111010"))):
        c = lz76_complexity(np.resize(np.array(period, dtype=np.uint8), n))
        assert c < 0.03, (period, c)


def test_english_text_bits():
    c1000 = lz76_complexity(english_bits(1000))
    c100k = lz76_complexity(english_bits(100_000))
    assert 0.6 < c1000 < 0.95  # FACTS.md: ~0.74 for English; Austen measures ~0.83 here
    assert 0.3 < c100k < 0.55  # FACTS.md: ~0.35 at 10^5; Austen ~0.45
    assert c100k < c1000


def test_window_bounds_the_search_and_never_lowers_the_count():
    bits = english_bits(5000)
    exact = lz76_phrase_count(bits)
    assert lz76_phrase_count(bits, window=256) >= exact
    assert lz76_phrase_count(bits, window=10**9) == exact


# -- lz_complexity metric ---------------------------------------------------------------------
def test_lz_metric_batches_rows_and_records_n():
    metric = LZComplexity()
    batch = torch.from_numpy(np.stack([np.zeros(1000, np.uint8), random_bits(1000),
                                       english_bits(1000)]))
    values = metric(batch)
    assert values.shape == (3,) and values.dtype == torch.float32
    assert metric.last_n == 1000
    assert values[0] < 0.05 and values[1] > 0.95 and 0.6 < values[2] < 0.95
    counts = LZComplexity(normalise=False)(batch)
    assert counts[0] == 2
    assert metric(batch[1]).shape == (1,)  # a single (L,) row


def test_lz_metric_rejects_bad_bits_and_options():
    with pytest.raises(BitsError):
        LZComplexity()(torch.full((1, 10), 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="window"):
        LZComplexity(window=0)


# -- negentropy --------------------------------------------------------------------------------
def test_negentropy_constant_is_one_and_noise_is_near_zero():
    k = Negentropy()
    assert torch.allclose(k(torch.ones(2, 1024, dtype=torch.uint8)), torch.ones(2))
    noise = k(torch.from_numpy(np.stack([random_bits(1024, s) for s in range(8)])))
    assert float(noise.max()) < 0.07  # finite-sample bias at m = 113 blocks
    big = k(torch.from_numpy(random_bits(9 * 50_000, 3)))
    assert float(big) < 0.01  # the bias vanishes as the number of blocks grows


def test_negentropy_hand_computed():
    # blocks of 2 bits: 00 11 00 11 -> two values, half each: H = 1 bit; H_max = min(2, log2 4)
    bits = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.uint8)
    assert Negentropy(block_bits=2)(bits).item() == pytest.approx(0.5)
    # single bits, 3 ones in 4: H = h(0.75) = 0.811278; H_max = 1
    bits = torch.tensor([[1, 1, 0, 1]], dtype=torch.uint8)
    assert Negentropy(block_bits=1)(bits).item() == pytest.approx(1 - 0.8112781, abs=1e-6)
    # fewer than two blocks: nothing to measure
    assert Negentropy()(torch.zeros(1, 9, dtype=torch.uint8)).item() == 0.0


def test_negentropy_of_text_needs_frame_aligned_blocks():
    text = torch.from_numpy(english_bits(90_000))
    single = Negentropy(block_bits=1)(text).item()
    framed = Negentropy(block_bits=9)(text).item()
    assert single < 0.02       # single bits of text look like a coin
    assert 0.35 < framed < 0.6  # byte frames do not (FACTS: J_8 ~ 0.45)


def test_negentropy_of_predictions():
    k = Negentropy(source="probs")
    bits = torch.zeros(3, 4, dtype=torch.uint8)
    probs = torch.tensor([[0.5] * 4, [0.0, 1.0, 1.0, 0.0], [0.25] * 4])
    values = k(bits, probs)
    assert values[0].item() == pytest.approx(0.0, abs=1e-6)
    assert values[1].item() == pytest.approx(1.0)
    assert values[2].item() == pytest.approx(1 - 0.8112781, abs=1e-6)
    p = torch.full((1, 4), 0.3, requires_grad=True)
    k(bits[:1], p).sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    with pytest.raises(MissingProbabilitiesError, match="probabilities"):
        k(bits)
    with pytest.raises(ValueError, match="source"):
        Negentropy(source="logits")
    with pytest.raises(ValueError, match="block_bits"):
        Negentropy(block_bits=0)


# -- symbiosis ---------------------------------------------------------------------------------
def test_symbiosis_perfect_and_uniform_predictions():
    s = Symbiosis()
    bits = torch.from_numpy(np.stack([random_bits(500, 1), random_bits(500, 2)]))
    perfect = s(bits, bits.float())
    assert torch.allclose(perfect, torch.ones(2), atol=1e-5)
    uniform = s(bits, torch.full((2, 500), 0.5))
    assert torch.allclose(uniform, torch.full((2,), 0.5), atol=1e-6)  # = 2^-1 bit per bit


def test_symbiosis_hand_computed():
    bits = torch.ones(1, 4, dtype=torch.uint8)
    # observed: the geometric mean of the probability given to the observed bits
    assert Symbiosis()(bits, torch.full((1, 4), 0.8)).item() == pytest.approx(0.8)
    probs = torch.tensor([[0.8, 0.2, 0.8, 0.2]])
    assert Symbiosis()(bits, probs).item() == pytest.approx(math.sqrt(0.8 * 0.2))
    # marginal: a balanced row against p = 0.5 agrees perfectly; a constant one gives 0.5
    balanced = torch.tensor([[0, 1, 0, 1]], dtype=torch.uint8)
    marginal = Symbiosis(reference="marginal")
    assert marginal(balanced, torch.full((1, 4), 0.5)).item() == pytest.approx(1.0)
    assert marginal(bits, torch.full((1, 4), 0.5)).item() == pytest.approx(0.5)


def test_symbiosis_is_differentiable_and_bounded_by_eps():
    bits = torch.tensor([[1, 0, 1, 1]], dtype=torch.uint8)
    p = torch.tensor([[0.0, 1.0, 0.9, 0.6]], requires_grad=True)  # two certain mistakes
    value = Symbiosis()(bits, p)
    assert 0.0 < value.item() < 0.01
    value.sum().backward()
    assert torch.isfinite(p.grad).all()


def test_symbiosis_errors():
    bits = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(MissingProbabilitiesError, match="symbiosis needs the model's prob"):
        Symbiosis()(bits)
    with pytest.raises(ValueError, match="shape"):
        Symbiosis()(bits, torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="logits"):
        Symbiosis()(bits, torch.full((2, 4), 3.0))
    with pytest.raises(ValueError, match="reference"):
        Symbiosis(reference="uniform")


# -- the kcs gate ------------------------------------------------------------------------------
def metrics_of(bits: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    return {"lz_complexity": LZComplexity()(bits).mean().item(),
            "symbiosis": Symbiosis()(bits, probs).mean().item(),
            "negentropy": Negentropy()(bits).mean().item()}


def test_gate_blocks_a_constant_stream_after_burn_in():
    constant = torch.zeros(1, 1026, dtype=torch.uint8)
    probs = torch.full((1, 1026), 0.01)  # a confident model producing the same bit forever
    metrics = metrics_of(constant, probs)
    gate = KCSGate(burn_in=2)
    assert gate.check(metrics).allowed and gate.check(metrics).allowed  # burn-in
    decision = gate.check(metrics)
    assert not decision.allowed and not decision
    assert len(decision.reasons) == 1
    reason = decision.reasons[0]
    assert "lz_complexity" in reason and "floor 0.3" in reason
    assert f"{metrics['lz_complexity']:.4g}" in reason


def test_gate_lets_text_with_a_decent_model_through():
    bits = torch.from_numpy(english_bits(1026)).unsqueeze(0)
    probs = torch.where(bits.bool(), 0.7, 0.3)
    assert KCSGate().check(metrics_of(bits, probs)).allowed


def test_gate_names_every_failing_floor():
    gate = KCSGate(k_floor=0.2)
    decision = gate.check({"lz_complexity": 0.1, "symbiosis": 0.4, "negentropy": 0.1})
    assert not decision.allowed
    text = " ".join(decision.reasons)
    for part in ("lz_complexity 0.1", "floor 0.3", "symbiosis 0.4", "floor 0.5",
                 "negentropy 0.1", "floor 0.2"):
        assert part in text


def test_gate_ema_math():
    gate = KCSGate(c_floor=0.5, s_floor=0.0, ema=0.9)
    first = gate.check({"lz_complexity": 1.0})
    assert first.metrics["lz_complexity"] == pytest.approx(1.0)  # first value, no bias to 0
    second = gate.check({"lz_complexity": 0.0})
    assert second.metrics["lz_complexity"] == pytest.approx(0.9)  # 0.9 * 1.0 + 0.1 * 0.0
    assert second.allowed
    expected = 0.9
    for _ in range(6):  # keeps sinking towards 0 by a factor 0.9 per check
        expected *= 0.9
        decision = gate.check({"lz_complexity": 0.0})
        assert decision.metrics["lz_complexity"] == pytest.approx(expected)
    assert expected < 0.5 and not decision.allowed
    assert "smoothed, ema 0.9" in decision.reasons[0]


def test_gate_reset_restarts_burn_in_and_averages():
    gate = KCSGate(burn_in=1, ema=0.5)
    bad = {"lz_complexity": 0.0, "symbiosis": 0.0}
    assert gate.check(bad).allowed
    assert not gate.check(bad).allowed
    gate.reset()
    assert gate.checks == 0 and gate.smoothed == {}
    assert gate.check(bad).allowed  # burn-in again
    assert gate.check({"lz_complexity": 1.0, "symbiosis": 1.0}).metrics["symbiosis"] == 0.5


def test_gate_missing_metric_blocks_by_default_or_is_skipped():
    decision = KCSGate().check({"lz_complexity": 0.9})
    assert not decision.allowed
    assert "symbiosis is missing" in decision.reasons[0] and "floor 0.5" in decision.reasons[0]
    assert not KCSGate().check({"lz_complexity": 0.9, "symbiosis": float("nan")}).allowed
    assert KCSGate(missing="skip").check({"lz_complexity": 0.9}).allowed
    assert KCSGate(s_floor=0).check({"lz_complexity": 0.9}).allowed  # floor off: not required
    assert KCSGate(burn_in=1).check({}).allowed  # nothing blocks during burn-in


def test_gate_rejects_bad_options():
    for kwargs in ({"c_floor": -0.1}, {"s_floor": float("nan")}, {"ema": 1.0},
                   {"burn_in": -1}, {"missing": "warn"}):
        with pytest.raises(ValueError):
            KCSGate(**kwargs)


# -- plugin registration -----------------------------------------------------------------------
def test_registry_finds_metrics_and_gate():
    registry = get_registry(refresh=True)
    for name in ("negentropy", "lz_complexity", "symbiosis"):
        record = registry.resolve("telemetry", name)
        assert record.plugin == "telemetry_kcs"
        assert record.distribution == "bitlm-telemetry-kcs"
    assert registry.resolve("safety", "kcs").plugin == "telemetry_kcs"
    gate = registry.build("safety", "kcs", {"c_floor": 0.2, "ema": 0.9, "burn_in": 10})
    assert isinstance(gate, KCSGate) and gate.floors["lz_complexity"] == 0.2
    metric = registry.build("telemetry", "negentropy", {"block_bits": 8})
    assert metric.name == "negentropy" and metric.block_bits == 8
    with pytest.raises(ResolutionError, match="c_flor"):
        registry.build("safety", "kcs", {"c_flor": 0.2})


def test_plugin_module_imports_neither_torch_nor_numpy():
    code = ("import sys, bitlm_telemetry_kcs.plugin as p; "
            "records = list(p.bitlm_safety_gates()) + list(p.bitlm_telemetry_metrics()); "
            "print('torch' in sys.modules, len(records))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "4"]


def test_metrics_and_gate_meet_bitlms_contracts():
    from bitlm_core.testing import check_gate_contract, check_metric_contract

    from bitlm_telemetry_kcs.gate import KCSGate
    from bitlm_telemetry_kcs.metrics import LZComplexity, Negentropy, Symbiosis

    for metric in (Negentropy(), Negentropy(source="probs"), Negentropy(block_bits=8),
                   LZComplexity(), LZComplexity(normalise=False), LZComplexity(window=64),
                   Symbiosis(), Symbiosis(reference="marginal")):
        assert check_metric_contract(metric)["calls"] > 0
    check_gate_contract(KCSGate(), {"lz_complexity": 0.5, "symbiosis": 0.7})
