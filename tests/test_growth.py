"""Growing a model: depth and feed-forward width keep its outputs, learn, and survive resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.builtins.scaling import DepthGrowth, WidthGrowth
from bitlm_core.errors import BitlmError, CheckpointError
from bitlm_core.model.growth import add_layers, fit_to_config, widen_feedforward
from bitlm_core.model import BitTransformerLM, ModelConfig

ENC = Parity9Encoder()
BITS = ENC.encode(b"It is a truth universally acknowledged").view(1, -1)


def model(layout: str = "framed", **cfg) -> BitTransformerLM:
    torch.manual_seed(0)
    base = dict(layout=layout, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_frames=64,
                frame_parity=layout == "framed")
    return BitTransformerLM(ModelConfig(**{**base, **cfg}), ReferenceAttention()).eval()


@pytest.mark.parametrize("layout", ["framed", "flat"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("init", ["copy", "random"])
def test_added_layers_leave_the_outputs_unchanged(layout, causal, init):
    m = model(layout)
    before = m(BITS, causal=causal)
    add_layers(m, 3, init)
    assert m.cfg.n_layers == 5 and len(m.blocks) == 5
    assert torch.equal(m(BITS, causal=causal), before)


def test_copied_layers_stack_the_trained_ones_and_share_the_backend():
    m = model()
    add_layers(m, 3)  # 0, 1, then copies of 0, 1, 0
    for new, source in zip(m.blocks[2:], (m.blocks[0], m.blocks[1], m.blocks[0])):
        assert torch.equal(new.attn.qkv.weight, source.attn.qkv.weight)
        assert torch.equal(new.mlp.fc.weight, source.mlp.fc.weight)
        assert new.attn.qkv.weight is not source.attn.qkv.weight  # a copy, trained apart
        assert new.attn.backend is source.attn.backend
        assert not new.attn.proj.weight.any() and not new.mlp.proj.weight.any()
    add_layers(m, 1, "random")
    assert not torch.equal(m.blocks[-1].attn.qkv.weight, m.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("layout", ["framed", "flat"])
@pytest.mark.parametrize("init", ["copy", "random"])
def test_wider_feedforward_leaves_the_outputs_unchanged(layout, init):
    m = model(layout)
    before = m(BITS)
    widen_feedforward(m, 160, init)
    assert m.cfg.d_ff == 160
    assert all(b.mlp.fc.out_features == 160 and b.mlp.proj.in_features == 160 for b in m.blocks)
    torch.testing.assert_close(m(BITS), before, rtol=0, atol=1e-5)


def test_copied_units_repeat_the_trained_ones():
    m = model()
    old_fc = m.blocks[0].mlp.fc.weight.detach().clone()
    widen_feedforward(m, 160)  # 64 units: new unit j copies unit j mod 64
    fc = m.blocks[0].mlp.fc.weight
    assert torch.equal(fc[:64], old_fc) and torch.equal(fc[64:128], old_fc)
    assert torch.equal(fc[128:], old_fc[:32])
    assert not m.blocks[0].mlp.proj.weight[:, 64:].any()
    with pytest.raises(BitlmError, match="copy, random"):
        widen_feedforward(m, 200, "zeros")


def test_grown_parts_learn_from_the_first_step():
    m = model().train()
    add_layers(m, 1)
    widen_feedforward(m, 128)
    m(BITS).sum().backward()
    new = m.blocks[-1]
    assert new.attn.proj.weight.grad.abs().sum() > 0  # zero weights, non-zero inputs
    assert new.mlp.proj.weight.grad.abs().sum() > 0
    old = m.blocks[0].mlp.proj.weight.grad
    assert old[:, 64:].abs().sum() > 0  # the new units' output weights


def test_growth_refuses_to_shrink_or_nonsense():
    m = model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BitlmError, match="positive integer"):
            add_layers(m, bad)
    with pytest.raises(BitlmError, match="copy, random"):
        add_layers(m, 1, "zeros")
    with pytest.raises(BitlmError, match="only grows"):
        widen_feedforward(m, 64)


def test_fit_to_config_rebuilds_a_grown_shape():
    grown = model()
    add_layers(grown, 2)
    widen_feedforward(grown, 128)
    fresh = model()
    fit_to_config(fresh, grown.cfg.to_dict())
    assert fresh.cfg == grown.cfg
    fresh.load_state_dict(grown.state_dict(), strict=True)
    assert torch.equal(fresh(BITS), grown(BITS))
    with pytest.raises(CheckpointError, match="n_layers"):
        fit_to_config(model(), {"n_layers": "6"})


def test_strategy_options_and_caps():
    for cls, kwargs in ((DepthGrowth, {"add": 0}), (DepthGrowth, {"max_layers": 1}),
                        (DepthGrowth, {"init": "zeros"}),
                        (WidthGrowth, {"factor": 1}), (WidthGrowth, {"max_d_ff": 2.5}),
                        (WidthGrowth, {"init": "zeros"})):
        with pytest.raises(ValueError):
            cls(**kwargs)
    m = model()
    depth = DepthGrowth(add=3, max_layers=4)
    before = m.cfg
    assert depth.grow(m) is m and m.cfg.n_layers == 4  # capped at max_layers
    assert not depth.can_grow(m)
    assert depth.describe(before, m.cfg) == "depth 2 -> 4 layers"
    width = WidthGrowth(factor=4, max_d_ff=200)
    before = m.cfg
    assert width.grow(m) is m and m.cfg.d_ff == 200 and not width.can_grow(m)
    assert width.describe(before, m.cfg) == "feed-forward width 64 -> 200 hidden units"


@pytest.mark.parametrize("strategy, change, key, value", [
    ({"name": "depth", "options": {"add": 1}}, "depth 2 -> 3 layers", "n_layers", 3),
    ({"name": "width", "options": {"factor": 2}},
     "feed-forward width 128 -> 256 hidden units", "d_ff", 256),
])
def test_growth_in_training_resumes_exactly_and_loads(tmp_path, tiny_spec, strategy, change,
                                                     key, value):
    from safetensors.torch import load_file

    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    # min_delta 10: the second evaluation (step 6) is a plateau, so the model grows there
    spec = load_spec(tiny_spec(steps=10, scaling={"strategy": strategy, "patience": 1,
                                                  "min_delta": 10.0, "max_growths": 1},
                               output={"keep_checkpoints": 10}))
    straight = tmp_path / "straight"
    execute(spec, straight, log=lambda m: None)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").open()]
    assert [(r["step"], r["change"]) for r in records if r["split"] == "scaling"] == [(6, change)]

    # a run stopped at step 8, after the growth, resumes into the grown model
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for late in ("step-000010",):
        shutil.rmtree(resumed / "checkpoints" / late)
    logs = []
    execute(spec, resumed, log=logs.append)
    assert any("resuming from step-000008" in m for m in logs)
    assert not any("scaled" in m for m in logs)  # the growth count was restored too

    def weights(run):
        return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1]
                             / "model.safetensors"))

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = load_run(straight)
    assert getattr(run.model.cfg, key) == value


def test_optimizer_state_follows_the_trained_part_of_grown_tensors():
    from bitlm_core.engine.optim import carry_optimizer_state
    from bitlm_core.model.growth import expand_positional_encoding

    m = model().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(BITS).sum().backward()
    opt.step()
    before = dict(m.named_parameters())
    old_fc = before["blocks.0.mlp.fc.weight"]
    old_moment = opt.state[old_fc]["exp_avg"].clone()
    old_sq = opt.state[old_fc]["exp_avg_sq"].clone()
    ln_state = opt.state[before["ln_f.weight"]]
    widen_feedforward(m, 96)
    add_layers(m, 1)
    expand_positional_encoding(m, 80)
    new_opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    kept = carry_optimizer_state(opt.state, before, m, new_opt.state)
    with_state = [q for q in before.values() if q in opt.state]  # (unused tables have none)
    assert kept == len(with_state)  # every one: survived or enlarged
    after = dict(m.named_parameters())
    assert new_opt.state[after["ln_f.weight"]] is ln_state  # survived: the same state
    grown = new_opt.state[after["blocks.0.mlp.fc.weight"]]
    assert grown["exp_avg"].shape == (96, 32)
    assert torch.equal(grown["exp_avg"][:64], old_moment) and not grown["exp_avg"][64:].any()
    assert torch.equal(grown["exp_avg_sq"][:64], old_sq) and not grown["exp_avg_sq"][64:].any()
    assert new_opt.state[after["pos.weight"]]["exp_avg"].shape == after["pos.weight"].shape
    assert after["blocks.2.attn.proj.weight"] not in new_opt.state  # new: starts fresh
    m(BITS).sum().backward()
    new_opt.step()  # the carried state fits its parameters
