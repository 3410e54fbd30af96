"""Gated generation: strict blocking, warnings, retries with new seeds and fallback samplers,
and drift detection."""

from __future__ import annotations

import warnings

import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.errors import SafetyError
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.registry import get_registry
from bitlm_core.app.generate import SafetyWarning, hil_safe_inference, safe_sample_with_retry
from bitlm_core.engine.telemetry import detect_metric_drift, sample_metrics

ENC = Parity9Encoder()
TEXT = (b"She was the youngest of the two daughters of a most affectionate, indulgent father; "
        b"and had, in consequence of her sister's marriage, been mistress of his house from a "
        b"very early period.") * 2


class ScriptedSampler:
    """Writes a constant stream (zero bytes) for the seeds in ``stuck``, English otherwise."""

    causal = True  # what every sampler declares (bitlm_core.interfaces.Sampler)

    def __init__(self, name: str, stuck=()):
        self.name, self.stuck, self.seeds = name, set(stuck), []

    def sample(self, model, prompt, n_frames, generator, encoder):
        seed = generator.initial_seed()
        self.seeds.append(seed)
        body = bytes(n_frames) if seed in self.stuck or "all" in self.stuck else TEXT[:n_frames]
        return torch.cat([prompt, encoder.encode(body)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(layout="framed", d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      max_frames=64, frame_parity=True)
    return BitTransformerLM(cfg, ReferenceAttention()).eval()


def kcs(**floors):
    return get_registry().build("safety", "kcs", floors)


def telemetry():
    reg = get_registry()
    return {name: reg.build("telemetry", name) for name in ("lz_complexity", "symbiosis")}


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis")
def test_sample_metrics_use_the_model_probabilities(model):
    bits = ENC.encode(b"Emma " + TEXT[:40])
    values = sample_metrics(model, ENC, bits, 5 * 9, telemetry())
    assert set(values) == {"lz_complexity", "symbiosis"}
    assert 0 < values["symbiosis"] <= 1 and values["lz_complexity"] > 0.3
    constant = sample_metrics(model, ENC, ENC.encode(bytes(45)), 9, telemetry())
    assert constant["lz_complexity"] < 0.3


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis", "safety:kcs")
def test_strict_gate_blocks_a_constant_stream_naming_metric_and_floor(model):
    with pytest.raises(SafetyError, match=r"lz_complexity 0\.\d+ .* below its floor 0\.3"):
        hil_safe_inference(model, ENC, ScriptedSampler("s", stuck={0}), "Emma", 40,
                           gate=kcs(s_floor=0), telemetry=telemetry(), seed=0, strict=True)
    assert SafetyError.exit_code == 3


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis", "safety:kcs")
def test_non_strict_gate_warns_and_returns(model):
    with pytest.warns(SafetyWarning, match="lz_complexity"):
        result = hil_safe_inference(model, ENC, ScriptedSampler("s", stuck={0}), "Emma", 40,
                                    gate=kcs(s_floor=0), telemetry=telemetry(), seed=0)
    assert not result.decision and result.text == "Emma" + "\x00" * 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        passed = hil_safe_inference(model, ENC, ScriptedSampler("s"), "Emma", 40,
                                    gate=kcs(s_floor=0), telemetry=telemetry(), seed=0)
    assert passed.decision and passed.text == "Emma" + TEXT[:40].decode()


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis", "safety:kcs")
def test_retry_with_a_new_seed_recovers_and_logs_each_attempt(model):
    sampler, lines = ScriptedSampler("scripted", stuck={5}), []
    out = safe_sample_with_retry(model, ENC, [sampler], "Emma", 40, gate=kcs(s_floor=0),
                                 telemetry=telemetry(), seed=5, max_retries=2, strict=True,
                                 log=lines.append)
    assert out.allowed and sampler.seeds == [5, 6]
    assert [(a.number, a.seed, a.allowed) for a in out.attempts] == [(1, 5, False), (2, 6, True)]
    assert "lz_complexity" in out.attempts[0].reasons[0]
    assert lines[0].startswith("attempt 1/3 (scripted, seed 5): blocked")
    assert lines[1] == "attempt 2/3 (scripted, seed 6): allowed"


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis", "safety:kcs")
def test_retry_moves_on_to_the_fallback_sampler(model):
    primary, fallback = ScriptedSampler("primary", stuck={"all"}), ScriptedSampler("diffusion")
    out = safe_sample_with_retry(model, ENC, [primary, fallback], "Emma", 40,
                                 gate=kcs(s_floor=0), telemetry=telemetry(), max_retries=3)
    assert out.allowed and [a.sampler for a in out.attempts] == ["primary", "diffusion"]


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis", "safety:kcs")
def test_every_attempt_blocked(model):
    stuck = ScriptedSampler("stuck", stuck={"all"})
    with pytest.raises(SafetyError, match="blocked all 3 attempts"):
        safe_sample_with_retry(model, ENC, [stuck], "Emma", 40, gate=kcs(s_floor=0),
                               telemetry=telemetry(), max_retries=2, strict=True)
    with pytest.warns(SafetyWarning, match="returning the last"):
        out = safe_sample_with_retry(model, ENC, [stuck], "Emma", 40, gate=kcs(s_floor=0),
                                     telemetry=telemetry(), max_retries=1)
    assert not out.allowed and len(out.attempts) == 2


def test_drift():
    assert detect_metric_drift([1.0, 1.0, 1.0], window=2, threshold=0.1) is None  # too short
    steady = detect_metric_drift([0.5, 0.52, 0.5, 0.51], window=2, threshold=0.1, metric="C")
    assert not steady.alert and steady.previous == pytest.approx(0.51)
    moved = detect_metric_drift([0.5, 0.5, 0.5, 0.3, 0.3], window=2, threshold=0.2, metric="C")
    assert moved.alert and moved.change == pytest.approx(0.4)
    assert str(moved) == "C drifted from 0.5 to 0.3 (40% change, threshold 20%)"
    assert detect_metric_drift([1.0, float("nan"), 1.0, 2.0, 2.0], 2, 0.5).alert
    with pytest.raises(ValueError):
        detect_metric_drift([1.0], window=0, threshold=0.1)


@pytest.mark.needs("telemetry:negentropy")
def test_training_logs_a_drift_alert_and_can_stop(tmp_path, tiny_spec):
    import json

    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    # Threshold 0: any change of a metric's mean between windows of one value is an alert.
    spec = load_spec(tiny_spec(steps=12, telemetry={
        "metrics": [{"name": "negentropy", "options": {"source": "probs"}}], "every": 3,
        "drift_threshold": 0.0, "drift_window": 1, "drift_stop": True}))
    logs = []
    summary = execute(spec, tmp_path / "r", log=logs.append)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    alerts = [r for r in records if r["split"] == "alert"]
    assert alerts and alerts[0]["metric"] == "telemetry/val/negentropy" and alerts[0]["step"] == 6
    assert summary["steps"] == 6  # stopped at the first alert, with a checkpoint
    assert any(m.startswith("stopped early at step 6: telemetry drift") for m in logs)


@pytest.mark.needs("telemetry:negentropy", "telemetry:lz_complexity", "telemetry:symbiosis")
def test_telemetry_on_train_and_val_batches_with_regularisers(tmp_path, tiny_spec):
    import json

    from bitlm_core.errors import SpecError
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    metrics = [{"name": "negentropy", "options": {"source": "probs"}}, {"name": "lz_complexity"},
               {"name": "symbiosis"}]
    spec = load_spec(tiny_spec(steps=6, telemetry={"metrics": metrics, "every": 2,
                                                   "lambda_K": 0.1, "lambda_S": 0.2}))
    execute(spec, tmp_path / "r", log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    tel = [r for r in records if r["split"] == "telemetry"]
    assert [r["step"] for r in tel] == [2, 4, 6]
    for r in tel:
        for split in ("train", "val"):
            assert 0 <= r[f"telemetry/{split}/negentropy"] <= 1
            assert 0 < r[f"telemetry/{split}/symbiosis"] <= 1
            assert r[f"telemetry/{split}/lz_complexity"] > 0
    train = [r for r in records if r["split"] == "train"]
    assert all(0 <= r["reg/K"] <= 1 and 0 < r["reg/S"] <= 1 for r in train)

    with pytest.raises(SpecError, match="add {name: symbiosis} to telemetry.metrics"):
        execute(load_spec(tiny_spec(steps=2, telemetry={"lambda_S": 0.1})), tmp_path / "s",
                log=lambda m: None)
    with pytest.raises(SpecError, match="lambda_C must be 0"):
        load_spec(tiny_spec(steps=2, telemetry={"lambda_C": 0.1}))


@pytest.mark.needs("telemetry:lz_complexity", "telemetry:symbiosis")
def test_metrics_of_a_non_causal_sample_leave_out_model_probabilities(model):
    values = sample_metrics(model, ENC, ENC.encode(b"Emma " + TEXT[:40]), 5 * 9, telemetry(),
                            causal=False)
    assert set(values) == {"lz_complexity"}  # symbiosis needs next-bit probabilities


@pytest.mark.needs("telemetry:negentropy", "telemetry:symbiosis", "objective:diffusion",
                   "sampler:diffusion")
def test_regularisers_change_training_and_need_a_causal_objective(tmp_path, tiny_spec):
    from safetensors.torch import load_file

    from bitlm_core.store.checkpoint import latest_checkpoint
    from bitlm_core.errors import SpecError
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    metrics = [{"name": "negentropy", "options": {"source": "probs"}}, {"name": "symbiosis"}]
    weights = {}
    for lam in (0.0, 0.5):
        spec = load_spec(tiny_spec(steps=3, telemetry={"metrics": metrics, "lambda_K": lam}))
        execute(spec, tmp_path / str(lam), log=lambda m: None)
        weights[lam] = load_file(str(latest_checkpoint(tmp_path / str(lam)) / "model.safetensors"))
    assert any(not torch.equal(weights[0.0][k], weights[0.5][k]) for k in weights[0.0])
    diffusion = load_spec(tiny_spec(steps=2, objective={"name": "diffusion"},
                                    sample={"sampler": {"name": "diffusion"}},
                                    telemetry={"metrics": metrics, "lambda_S": 0.1}))
    with pytest.raises(SpecError, match="objective 'diffusion' gives none"):
        execute(diffusion, tmp_path / "d", log=lambda m: None)
