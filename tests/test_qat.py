"""4-bit quantization-aware training and the quantizer kind: the weight grid, the
straight-through estimator, the ``qat`` callback, and quantizers found by name."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.errors import CheckpointError, SpecError
from bitlm_core.model.quant import (QATLinear, enable_qat, fake_quantize,
                                    fake_quantize_activations, group_dequantize,
                                    group_quantize, linear_weights, qat_layers, qmax, rounded)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 70), group=st.integers(1, 40),
       bits=st.integers(2, 8), log_scale=st.floats(-5, 3), zero_group=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_the_grid_keeps_every_weight_within_half_a_step(rows, cols, group, bits, log_scale,
                                                        zero_group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10.0 ** log_scale
    if zero_group:
        w[0, :group] = 0.0
    q, scales = group_quantize(w, bits, group)
    groups = -(-cols // group)  # the last group may be shorter
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (rows, groups)
    assert int(q.abs().max()) <= qmax(bits)
    back = group_dequantize(q, scales, group)
    step = scales.repeat_interleave(group, dim=1)[:, :cols]
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5)).all()
    # what training computes with is exactly what a file of (q, scales) gives back
    assert torch.equal(rounded(w, bits, group), back)
    if zero_group:
        assert not back[0, :group].any()


def test_the_grid_refuses_what_it_cannot_round():
    with pytest.raises(ValueError, match="from 2 to 8"):
        qmax(9)
    with pytest.raises(ValueError, match="matrix"):
        group_quantize(torch.ones(3), 4, 2)
    with pytest.raises(ValueError, match="group_size"):
        group_quantize(torch.ones(3, 3), 4, 0)


def test_the_straight_through_estimator_passes_gradients_unchanged():
    w = torch.randn(5, 9, requires_grad=True)
    out = fake_quantize(w, 4, 4)
    assert torch.equal(out.detach(), rounded(w, 4, 4))
    upstream = torch.randn(5, 9)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = fake_quantize_activations(x)
    levels = y.detach() / (x.detach().abs().amax(-1, keepdim=True) / 127)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_enable_qat_changes_the_layers_in_place_and_they_compute_on_the_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.GELU(), nn.Linear(7, 3), nn.LayerNorm(3))
    params = [id(p) for p in model.parameters()]
    x = torch.randn(4, 10)
    assert enable_qat(model, 4, 4) == 2
    assert [id(p) for p in model.parameters()] == params  # an optimizer keeps its hold
    assert qat_layers(model) == ["0", "2"] and linear_weights(model) == ["0.weight", "2.weight"]
    first = model[0]
    assert isinstance(first, QATLinear)
    torch.testing.assert_close(first(x), F.linear(x, rounded(first.weight, 4, 4), first.bias),
                               atol=0, rtol=0)
    assert not torch.equal(first(x), F.linear(x, first.weight, first.bias))
    assert enable_qat(model, 3, 2, activations=True) == 2  # again: new settings, same layers
    assert model[2].qat_bits == 3 and model[2].qat_activations


def test_qat_needs_an_eager_unsharded_model(tiny_spec):
    from bitlm_core.spec import load_spec

    with pytest.raises(SpecError, match="train.compile: false"):
        load_spec(tiny_spec(train={"qat": {"bits": 4}, "compile": True}))
    with pytest.raises(SpecError, match="qat"):
        load_spec(tiny_spec(train={"qat": {"bits": 9}}))
    with pytest.raises(SpecError, match="qat"):
        load_spec(tiny_spec(train={"qat": {"bits": 4, "groups": 3}}))
    spec = load_spec(tiny_spec(train={"qat": {}}))
    assert (spec.train.qat.bits, spec.train.qat.group_size, spec.train.qat.start_step) == (
        4, 32, 0)


def test_a_qat_run_trains_on_the_grid_from_its_start_step_and_loads_as_it_trained(
        tmp_path, tiny_spec):
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    spec = load_spec(tiny_spec(steps=6, train={"qat": {"group_size": 8, "start_step": 3}}))
    logs = []
    summary = execute(spec, tmp_path / "run", log=logs.append)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    qat = [r for r in records if r.get("split") == "qat"]
    assert len(qat) == 1 and qat[0]["step"] == 3 and qat[0]["bits"] == 4
    assert qat[0]["layers"] > 0
    assert any("4-bit grid" in m for m in logs)
    run = load_run(tmp_path / "run")
    layers = qat_layers(run.model)
    assert len(layers) == qat[0]["layers"]
    assert all(m.qat_group_size == 8 for m in run.model.modules() if isinstance(m, QATLinear))
    # the held-out figure the run reported is the one its loaded model gives
    from bitlm_core.app.run import load_dataset
    from bitlm_core.engine.evaluation import evaluate

    dataset, _ = load_dataset(run.spec, run.comps, tmp_path / "run")
    with torch.no_grad():
        again = evaluate(run.model, run.comps.objective, dataset, spec.train.batch_size,
                         max_batches=spec.train.eval_batches)
    held_out = [r for r in records if r.get("split") == "val" and r["step"] == 6
                and r["bytes"] == again["bytes"]][0]
    assert again["bits_per_byte"] == pytest.approx(held_out["bits_per_byte"], rel=1e-6)
    assert summary is not None


def test_a_resumed_qat_run_switches_its_layers_before_its_first_step():
    from bitlm_core.engine.callbacks import QuantizationAware

    model = nn.Sequential(nn.Linear(4, 4))
    written, said = [], []
    qat = types.SimpleNamespace(bits=4, group_size=2, start_step=3, activations=False)
    trainer = types.SimpleNamespace(model=model, log=said.append, write_metrics=written.append,
                                    spec=types.SimpleNamespace(
                                        train=types.SimpleNamespace(qat=qat, steps=8)))
    callback = QuantizationAware()
    callback.on_fit_start(trainer, types.SimpleNamespace(step=0))
    assert not isinstance(model[0], QATLinear)  # steps 1 and 2 train in float
    callback.on_step(trainer, types.SimpleNamespace(step=1), {})
    assert not isinstance(model[0], QATLinear)
    callback.on_step(trainer, types.SimpleNamespace(step=2), {})  # step 3 is next
    assert isinstance(model[0], QATLinear) and [r["step"] for r in written] == [3]
    resumed, written[:] = nn.Sequential(nn.Linear(4, 4)), []
    trainer.model = resumed
    QuantizationAware().on_fit_start(trainer, types.SimpleNamespace(step=5))
    assert isinstance(resumed[0], QATLinear) and written == []  # no second start record
    plain = nn.Sequential(nn.Linear(4, 4))
    trainer.model, qat.start_step = plain, 8
    QuantizationAware().on_step(trainer, types.SimpleNamespace(step=8), {})  # the last step
    assert not isinstance(plain[0], QATLinear)  # nothing switched past the end


def test_a_run_ends_loads_and_is_scored_again_in_the_mode_of_its_last_step(tmp_path,
                                                                          tiny_spec):
    """A run stopped before its start step, and a finished QAT run run again: the figure it
    ends with is the one its loaded model gives."""
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    spec = load_spec(tiny_spec(steps=6, train={"qat": {"group_size": 8, "start_step": 2}}))
    first = execute(spec, tmp_path / "run", log=lambda m: None)
    again = execute(spec, tmp_path / "run", log=lambda m: None)  # finished: scored again
    assert again["held_out_bits_per_byte"] == first["held_out_bits_per_byte"]
    assert qat_layers(load_run(tmp_path / "run").model)


def test_a_start_step_after_the_last_step_is_refused(tiny_spec):
    from bitlm_core.spec import load_spec

    with pytest.raises(SpecError, match=r"start_step \(7\) comes after the last step"):
        load_spec(tiny_spec(steps=6, train={"qat": {"start_step": 7}}))
    load_spec(tiny_spec(steps=6, train={"qat": {"start_step": 6}}))


def test_quantizing_a_qat_run_in_int8_keeps_its_grid(tmp_path, tiny_spec):
    """int8 of the weights as the layers computed with them, not of the float weights
    training keeps behind the grid."""
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.quantize import quantize_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec
    from bitlm_core.store.quantized import quantize_rows

    execute(load_spec(tiny_spec(steps=4, model={"d_model": 64},
                                train={"qat": {"group_size": 16}})),
            tmp_path / "run", log=lambda m: None)
    trained = load_run(tmp_path / "run")
    quantize_run(tmp_path / "run", tmp_path / "q")
    stored = load_run(tmp_path / "q").model.state_dict()
    for layer in qat_layers(trained.model):
        module = trained.model.get_submodule(layer)
        grid = rounded(module.weight, 4, 16)
        q, scale = quantize_rows(grid)
        assert torch.equal(stored[f"{layer}.weight"], q.float() * scale[:, None])


def test_quantizers_are_components_found_by_name(tmp_path, tiny_spec):
    from bitlm_core.app.quantize import quantize_run
    from bitlm_core.app.run import execute
    from bitlm_core.registry import get_registry
    from bitlm_core.spec import load_spec

    assert "int8-rowwise" in get_registry().names("quantizer")
    execute(load_spec(tiny_spec(steps=2, model={"d_model": 64})), tmp_path / "run",
            log=lambda m: None)
    from bitlm_core.errors import BitlmError

    with pytest.raises(BitlmError, match="--scheme") as err:
        quantize_run(tmp_path / "run", tmp_path / "q", scheme="int9")
    assert "int8-rowwise" in str(err.value)
    assert not (tmp_path / "q").exists()


def test_weights_in_a_format_no_quantizer_reads_name_the_plugin(tmp_path, tiny_spec):
    from safetensors.torch import load_file, save_file

    from bitlm_core.app.loading import load_run
    from bitlm_core.app.quantize import quantize_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec
    from bitlm_core.store.checkpoint import latest_checkpoint

    execute(load_spec(tiny_spec(steps=2, model={"d_model": 64})), tmp_path / "run",
            log=lambda m: None)
    quantize_run(tmp_path / "run", tmp_path / "q")
    path = latest_checkpoint(tmp_path / "q") / "model.safetensors"
    tensors = load_file(str(path))
    (path.parent / "checksums.json").unlink()  # crafted: only the parts under test differ
    save_file(tensors, str(path), metadata={"bitlm_weights": "int3-future"})
    with pytest.raises(CheckpointError, match="no installed quantizer.*plugins/quantization"):
        load_run(tmp_path / "q")
    scale = next(name for name in tensors if name.endswith(".qscale"))
    save_file({**tensors, scale: tensors[scale].half()}, str(path),
              metadata={"bitlm_weights": "int8-rowwise"})
    with pytest.raises(CheckpointError, match=r"not finite float32 \(float16\)"):
        load_run(tmp_path / "q")
