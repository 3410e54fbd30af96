"""Long texts: the sliding-window plan, sliding scores and positional growth."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.errors import BitlmError, BitsError
from bitlm_core.engine.evaluation import score_sliding, window_plan
from bitlm_core.model.growth import expand_positional_encoding
from bitlm_core.model import BitTransformerLM, ModelConfig

ENC = Parity9Encoder()
TEXT = (b"It is a truth universally acknowledged, that a single man in possession of a good "
        b"fortune, must be in want of a wife. ") * 3


def model(layout: str = "framed", max_frames: int = 16) -> BitTransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(layout=layout, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      max_frames=max_frames, frame_parity=layout == "framed")
    return BitTransformerLM(cfg, ReferenceAttention()).eval()


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 300), window=st.integers(1, 40), data=st.data())
def test_every_frame_is_scored_once_with_enough_context(n, window, data):
    stride = data.draw(st.integers(1, window))
    plan = window_plan(n, window, stride)
    scored = []
    for k, (begin, first) in enumerate(plan):
        end = min(begin + window, n)
        assert 0 <= begin <= first <= end
        if k > 0:
            assert first - begin >= window - stride  # context before the first scored frame
        scored.extend(range(first, end))
    assert scored == list(range(n))


def test_bad_plans_are_refused():
    for window, stride in [(0, 1), (8, 0), (8, 9)]:
        with pytest.raises(BitlmError, match="stride"):
            window_plan(100, window, stride)


@torch.no_grad()
def nats(m, bits) -> float:
    logits = m(bits.view(1, -1), causal=True).float()
    return float(F.cross_entropy(logits.view(-1, 2), bits.long(), reduction="sum"))


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_stride_equal_to_window_is_non_overlapping_windows(layout):
    m = model(layout)
    bits = ENC.encode(TEXT[:64])  # 4 windows of 16 frames
    bpb, n = score_sliding(m, bits, 9, window=16, stride=16, batch_size=3)
    expected = sum(nats(m, bits[i * 144:(i + 1) * 144]) for i in range(4))
    assert n == 64
    assert bpb == pytest.approx(expected / math.log(2) / 64, rel=1e-5)


@torch.no_grad()
def test_sliding_scores_each_byte_in_the_window_that_gives_it_context():
    m = model()
    bits = ENC.encode(TEXT[:40])
    bpb, n = score_sliding(m, bits, 9, window=16, stride=8)
    expected = 0.0
    for begin, first in window_plan(40, 16, 8):
        logits = m(bits[begin * 9:(begin + 16) * 9].view(1, -1)).float().view(16, 9, 2)
        target = bits[begin * 9:(begin + 16) * 9].view(16, 9).long()
        per_frame = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1),
                                    reduction="none").view(16, 9).sum(-1)
        expected += float(per_frame[first - begin:].sum())
    assert n == 40 and bpb == pytest.approx(expected / math.log(2) / 40, rel=1e-5)
    short, n_short = score_sliding(m, ENC.encode(TEXT[:5]), 9, window=16, stride=8)
    assert n_short == 5
    assert short == pytest.approx(nats(m, ENC.encode(TEXT[:5])) / math.log(2) / 5, rel=1e-5)


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_expanding_positions_keeps_existing_outputs(layout):
    m = model(layout, max_frames=8)
    bits = ENC.encode(TEXT[:8]).view(1, -1)
    with torch.no_grad():
        before = m(bits)
        with pytest.raises(BitsError, match="sliding window"):
            m(ENC.encode(TEXT[:12]).view(1, -1))
        expand_positional_encoding(m, 12)
        assert m.cfg.max_frames == 12
        assert torch.equal(m(bits), before)
        longer = m(ENC.encode(TEXT[:12]).view(1, -1))
        assert torch.equal(longer[:, : bits.size(1)], before)  # causal: later bytes unseen
    with pytest.raises(BitlmError, match="only grows"):
        expand_positional_encoding(m, 4)


def test_context_growth_during_training_survives_resume_and_loading(tmp_path, tiny_spec):
    import json

    from bitlm_core.app.evaluate import evaluate_bytes
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    # min_delta 10: every evaluation after the first is a plateau, so the model grows at once
    spec = load_spec(tiny_spec(steps=12, scaling={
        "strategy": {"name": "context", "options": {"factor": 2, "max_frames": 32}},
        "patience": 1, "min_delta": 10.0, "max_growths": 1}))
    logs = []
    execute(spec, tmp_path / "r", log=logs.append)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    grown = [r for r in records if r["split"] == "scaling"]
    assert [(r["step"], r["change"]) for r in grown] == [(6, "context 16 -> 32 byte frames")]
    assert any("scaled the model: context 16 -> 32" in m for m in logs)
    later = [r for r in records if r["split"] == "val" and r["step"] > 6]
    assert later and all(r["bytes"] % 32 == 0 for r in later)  # held-out windows grew too

    again = []
    execute(spec, tmp_path / "r", log=again.append)  # finished: loads, re-evaluates
    assert not any("scaled" in m for m in again)
    run = load_run(tmp_path / "r")
    assert run.model.cfg.max_frames == 32
    result = evaluate_bytes(run, TEXT, "text")
    assert result["window"] == 32 and result["bytes"] == len(TEXT)


def test_context_growth_options_are_checked():
    from bitlm_core.builtins.scaling import ContextGrowth

    for kwargs in ({"factor": 1}, {"max_frames": 1}, {"factor": 2.5}):
        with pytest.raises(ValueError):
            ContextGrowth(**kwargs)
    m = model(max_frames=8)
    growth = ContextGrowth(factor=4, max_frames=20)
    assert growth.next_frames(m) == 20 and growth.grow(m) is m and m.cfg.max_frames == 20
    assert not growth.can_grow(m)


@pytest.mark.needs("objective:diffusion", "sampler:diffusion", "telemetry:lz_complexity",
                   "telemetry:symbiosis")
def test_a_diffusion_run_is_scored_in_windows_and_refuses_a_stride(tmp_path, tiny_spec):
    import json

    from bitlm_core.errors import DataError
    from bitlm_core.app.evaluate import evaluate_bytes
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    spec = load_spec(tiny_spec(steps=2, objective={"name": "diffusion"},
                               sample={"sampler": {"name": "diffusion"}},
                               telemetry={"metrics": [{"name": "lz_complexity"},
                                                      {"name": "symbiosis"}], "every": 1}))
    execute(spec, tmp_path / "d", log=lambda m: None)
    tel = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").open()]
    tel = [r for r in tel if r["split"] == "telemetry"]
    # no next-bit probabilities from a non-causal model: symbiosis is left out, C is not
    assert tel and all("telemetry/val/lz_complexity" in r for r in tel)
    assert not any("telemetry/val/symbiosis" in r for r in tel)
    run = load_run(tmp_path / "d")
    result = evaluate_bytes(run, TEXT, "text")
    assert result["is_bound"] and result["stride"] == result["window"] == 16
    with pytest.raises(DataError, match="--stride applies to causal models"):
        evaluate_bytes(run, TEXT, "text", stride=4)


def test_eval_reads_its_text_a_batch_of_windows_at_a_time(tmp_path, tiny_spec, monkeypatch):
    """A text is never held whole: every slice read of it is at most one window (or one chunk
    of the UTF-8 check), whatever its length."""
    from bitlm_core.app.evaluate import evaluate_bytes
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.engine import dataset
    from bitlm_core.spec import load_spec

    execute(load_spec(tiny_spec(steps=1)), tmp_path / "r", log=lambda m: None)
    run = load_run(tmp_path / "r")

    class Watched:
        def __init__(self, data: bytes):
            self.data, self.largest, self.reads = data, 0, 0

        def __len__(self):
            return len(self.data)

        def __getitem__(self, key):
            part = self.data[key]
            self.largest, self.reads = max(self.largest, len(part)), self.reads + 1
            return part

    monkeypatch.setattr(dataset, "UTF8_CHUNK", 64)  # the check, too, reads a piece at a time
    text = Watched(b"the cat sat on the mat. " * 400)
    whole = evaluate_bytes(run, text.data, "text")
    assert evaluate_bytes(run, text, "text") == whole  # the same figure, read in pieces
    assert text.largest <= 64 and run.model.cfg.max_frames <= 64
    assert text.reads > len(text) // run.model.cfg.max_frames  # one read per window
