"""The ``distill`` objective: a student trained against a teacher run's bit probabilities."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.builtins.objectives import CausalObjective, DistillObjective
from bitlm_core.errors import SpecError
from bitlm_core.model import BitTransformerLM, ModelConfig

BITS = Parity9Encoder().encode(b"It is a truth universally acknowledged").view(1, -1)


def model(seed: int = 0) -> BitTransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_frames=64,
                      frame_parity=True)
    return BitTransformerLM(cfg, ReferenceAttention()).train()


def test_loss_mixes_cross_entropy_and_kl_to_the_teacher():
    student, teacher = model(0), model(1)
    objective = DistillObjective("unused", alpha=0.25, temperature=2.0)
    objective._teacher = teacher.eval()
    out = objective(student, BITS)
    ce = CausalObjective()(student, BITS).loss
    s = (student(BITS).float() / 2.0).log_softmax(-1)
    t = (teacher(BITS).float() / 2.0).softmax(-1)
    kl = (t * (t.log() - s)).sum(-1).mean()
    assert torch.allclose(out.loss, 0.75 * ce + 0.25 * 4.0 * kl, atol=1e-5)
    assert out.extras["distill_kl"] == pytest.approx(float(kl.detach()), abs=1e-5)
    assert out.bits_per_byte == pytest.approx(float(ce.detach()) * 9 / math.log(2), rel=1e-5)
    out.loss.backward()
    assert not any(p.grad is not None for p in teacher.parameters())

    same = DistillObjective("unused", alpha=0.5)
    same._teacher = copy.deepcopy(student).eval()
    assert torch.allclose(same(student, BITS).loss, 0.5 * ce, atol=1e-5)  # KL to itself: 0


def test_evaluation_never_runs_the_teacher():
    objective = DistillObjective("no/such/run")
    out = objective(model().eval(), BITS)  # would fail to load the teacher if it tried
    assert "distill_kl" not in out.extras and out.loss > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher": "r", "alpha": 1.5}, "alpha"), ({"teacher": "r", "alpha": True}, "alpha"),
    ({"teacher": "r", "temperature": 0}, "temperature"), ({"teacher": ""}, "run folder"),
])
def test_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillObjective(**kwargs)


@pytest.fixture
def teacher_run(tmp_path, tiny_spec):
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    execute(load_spec(tiny_spec(steps=4)), tmp_path / "teacher", log=lambda m: None)
    return tmp_path / "teacher"


def test_a_student_trains_from_a_teacher_run_and_logs_the_kl(tmp_path, tiny_spec, teacher_run):
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    spec = load_spec(tiny_spec(steps=4, objective={"name": "distill", "options": {
        "teacher": str(teacher_run), "alpha": 0.5}}, model={"n_layers": 1}))
    summary = execute(spec, tmp_path / "student", log=lambda m: None)
    assert math.isfinite(summary["held_out_bits_per_byte"])
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").open()]
    train = [r for r in records if r.get("split") == "train"]
    assert train and all(r["objective/distill_kl"] >= 0 for r in train)
    assert load_run(tmp_path / "student").model.cfg.n_layers == 1


def test_alpha_zero_is_the_causal_run(tmp_path, tiny_spec):
    from safetensors.torch import load_file

    from bitlm_core.store.checkpoint import latest_checkpoint
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    execute(load_spec(tiny_spec(steps=3)), tmp_path / "causal", log=lambda m: None)
    execute(load_spec(tiny_spec(steps=3, objective={"name": "distill", "options": {
        "teacher": "never/loaded", "alpha": 0.0}})), tmp_path / "a0", log=lambda m: None)
    a, b = (load_file(str(latest_checkpoint(tmp_path / r) / "model.safetensors"))
            for r in ("causal", "a0"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_that_does_not_fit_is_named(tmp_path, tiny_spec, teacher_run):
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    def student(name, **sections):
        spec = load_spec(tiny_spec(steps=2, **sections))
        return lambda: execute(spec, tmp_path / name, log=lambda m: None)

    distill = {"name": "distill", "options": {"teacher": str(teacher_run)}}
    with pytest.raises(SpecError, match="same data.encoder"):
        student("raw8", objective=distill, data={"encoder": {"name": "raw8"}})()
    with pytest.raises(SpecError, match="context"):
        student("long", objective=distill, data={"seq_len": 32})()
    missing = {"name": "distill", "options": {"teacher": str(tmp_path / "nothing")}}
    with pytest.raises(SpecError, match="distill teacher: .*not a bitlm run folder"):
        student("missing", objective=missing)()


def test_a_resumed_student_ends_like_an_uninterrupted_one(tmp_path, tiny_spec, teacher_run):
    """Loading the teacher (which seeds torch) must not move the student's random stream."""
    import shutil

    from safetensors.torch import load_file

    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    spec = load_spec(tiny_spec(steps=4, objective={"name": "distill", "options": {
        "teacher": str(teacher_run)}}, model={"dropout": 0.2}, train={"grad_accum": 2},
        output={"keep_checkpoints": 10}))
    execute(spec, tmp_path / "straight", log=lambda m: None)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-000002\n")
    execute(spec, tmp_path / "resumed", log=lambda m: None)  # loads the teacher at step 3

    def weights(run):
        return load_file(str(tmp_path / run / "checkpoints" / "step-000004"
                             / "model.safetensors"))

    a, b = weights("straight"), weights("resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
