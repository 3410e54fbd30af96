"""Adaptive computation time: positions halt early on easy input, the ponder cost moves the
halting depth, halted batches skip the later blocks without changing outputs, cached decoding
agrees, and a run logs the depth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitlm_core.app.run import execute
from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def config(**kw) -> ModelConfig:
    base = dict(layout="framed", max_frames=16, d_model=32, n_layers=6, n_heads=2, d_ff=64,
                act=True)
    return ModelConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons


def train_on_periodic_text(ponder_weight: float, steps: int = 60):
    """A model trained on "abcabc...", returns (held-out ponder figures, model)."""
    bits = Parity9Encoder().encode(b"abc" * 200).view(-1)
    gen = torch.Generator().manual_seed(0)

    def windows(n: int, frames: int = 16):
        starts = torch.randint(0, 600 - frames, (n,), generator=gen).tolist()
        return torch.stack([bits[s * 9:(s + frames) * 9] for s in starts])

    torch.manual_seed(0)
    model = BitTransformerLM(config(), ReferenceAttention())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = windows(8)
        loss = F.cross_entropy(model(x).reshape(-1, 2), x.reshape(-1).long())
        (loss + ponder_weight * model.ponder["cost"]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        model(windows(8))
    return {k: float(v) for k, v in model.ponder.items()}, model


def test_on_easy_input_positions_halt_early_and_the_ponder_weight_moves_the_depth():
    free, _ = train_on_periodic_text(0.0)
    pondered, _ = train_on_periodic_text(0.05)
    assert free["blocks"] == pytest.approx(6.0)  # a new model uses every block
    assert pondered["halted_early"] > 0.5
    assert pondered["blocks"] < 6.0 - 1.0
    assert pondered["blocks"] < free["blocks"]


def test_a_halted_batch_skips_the_later_blocks_and_outputs_do_not_change():
    torch.manual_seed(0)
    model = BitTransformerLM(config(), ReferenceAttention()).eval()
    with torch.no_grad():
        model.halt.bias.fill_(20.0)  # every position halts after the first block
    calls = []
    model.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randint(0, 2, (2, 16 * 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        assert float(model.ponder["blocks"]) == 1.0 and not calls
        one_block = BitTransformerLM(config(n_layers=1), ReferenceAttention()).eval()
        state = {k: v for k, v in model.state_dict().items()
                 if not k.startswith("blocks.") or k.startswith("blocks.0.")}
        one_block.load_state_dict(state)
        torch.testing.assert_close(out, one_block(x), rtol=0, atol=0)


@pytest.mark.parametrize("extra", [{}, {"reversible": True}, {"layout": "flat"}])
def test_cached_decoding_with_act_matches_the_full_forward(extra):
    torch.manual_seed(0)
    model = BitTransformerLM(config(**extra), ReferenceAttention()).eval()
    with torch.no_grad():
        model.halt.weight.normal_(0, 1.0)  # positions halt at different depths
    x = torch.randint(0, 2, (1, 5 * 9), generator=torch.Generator().manual_seed(2))
    cached, full = model.decoder(x[:, :18]), model.decoder(x[:, :18], cache=False)
    for b in x[0, 18:]:
        torch.testing.assert_close(cached.logits(), full.logits(), atol=1e-5, rtol=1e-5)
        cached.push(b.view(1))
        full.push(b.view(1))


@pytest.mark.parametrize("memory", [{"checkpointing": "blocks"},
                                    {"reversible": True, "checkpointing": "blocks"}])
def test_act_gradients_with_checkpointing_equal_those_without(memory):
    x = torch.randint(0, 2, (2, 16 * 9), generator=torch.Generator().manual_seed(3))

    def grads(cfg):
        torch.manual_seed(0)
        model = BitTransformerLM(cfg, ReferenceAttention()).train()
        torch.manual_seed(1)
        loss = F.cross_entropy(model(x).reshape(-1, 2), x.reshape(-1).long())
        (loss + 0.01 * model.ponder["cost"]).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = config(dropout=0.1, reversible=memory.get("reversible", False))
    a, b = grads(plain), grads(dataclasses.replace(plain, **memory))
    assert a.keys() == b.keys() and "halt.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_act_logs_the_halting_depth(tmp_path, tiny_spec):
    spec = load_spec(tiny_spec(steps=4), ["model.act.enabled=true"])
    summary = execute(spec, tmp_path / "r", log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val" and not r.get("final")]
    assert all(1.0 <= r["act/blocks"] <= 2.0 for r in train)  # tiny_spec has 2 blocks
    assert val and all("act/blocks" in r for r in val)
    assert 1.0 <= summary["act_blocks"] <= 2.0


@pytest.mark.needs("telemetry:lz_complexity")  # core alone has no metric: no telemetry pass
def test_telemetry_sees_the_halting_depth(tmp_path, tiny_spec):
    spec = load_spec(tiny_spec(steps=4), ["model.act.enabled=true", "telemetry.every=2",
                                          "telemetry.metrics=all"])
    summary = execute(spec, tmp_path / "r", log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    tel = [r for r in records if r["split"] == "telemetry"]
    assert tel and all(1.0 <= r["telemetry/val/act_blocks"] <= 2.0 for r in tel)
    assert all(1.0 <= r["telemetry/train/act_blocks"] <= 2.0 for r in tel)
    assert summary["act_blocks"] >= 1.0


def test_the_ponder_cost_is_part_of_the_loss_it_trains(tmp_path, tiny_spec):
    from safetensors.torch import load_file

    from bitlm_core.store.checkpoint import latest_checkpoint

    path = tiny_spec(steps=3)
    for name, weight in (("a", "0.0"), ("b", "1.0")):
        execute(load_spec(path, ["model.act.enabled=true", f"model.act.ponder_weight={weight}"]),
                tmp_path / name, log=lambda m: None)
    a, b = (load_file(str(latest_checkpoint(tmp_path / n) / "model.safetensors")) for n in "ab")
    assert not torch.equal(a["halt.bias"], b["halt.bias"])


@pytest.mark.needs("attention:sdpa")
def test_the_original_systems_configuration_trains_from_examples(tmp_path, tiny_corpus):
    spec = load_spec(EXAMPLES / "original.yaml", [
        "data.corpus.name=file", f"data.corpus.options={{path: {tiny_corpus}}}",
        "data.seq_len=16", "train.steps=2", "train.batch_size=2", "train.eval_every=2",
        "sample.bytes=4"])
    assert spec.model.act.enabled and spec.model.reversible and spec.train.precision == "bf16"
    summary = execute(spec, tmp_path / "r", log=lambda m: None)
    assert summary["steps"] == 2 and summary["precision"] == "bf16"
    assert 1.0 <= summary["act_blocks"] <= 8.0
