"""Contract checks for the component kinds without a module of their own: telemetry metrics,
safety gates, scaling strategies, objectives, samplers, corpora, training callbacks, commands.

Each ``check_*_contract`` takes a built component (and what it needs to run: a model, an
encoder) and raises ``AssertionError`` saying what the component does that bitlm cannot use.
Call them from your plugin's tests::

    from bitlm_core.testing import check_metric_contract

    def test_contract():
        check_metric_contract(MyMetric())
        check_metric_contract(MyMetric(source="probs"))

:func:`tiny_model` gives a small model of either layout to check model-facing components on.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

__all__ = ["tiny_model", "check_metric_contract", "check_gate_contract",
           "check_scaling_contract", "check_objective_contract", "check_sampler_contract",
           "check_corpus_contract", "check_callback_contract", "check_command_contract"]


def tiny_model(layout: str = "framed", causal: bool = True, seed: int = 0, max_frames: int = 16):
    """A small parity9 model (2 blocks of 32) on the reference backend."""
    import torch

    from bitlm_core.builtins.attention import ReferenceAttention
    from bitlm_core.model import BitTransformerLM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(layout=layout, d_model=32, n_layers=2, n_heads=2, d_ff=64, local_dim=32,
                      max_frames=max_frames, frame_parity=True, neighbours=0 if causal else 3)
    return BitTransformerLM(cfg, ReferenceAttention())


def _bits_and_probs(rows: int, length: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    cases = {
        "random": (torch.rand(rows, length, generator=g) < 0.5).to(torch.uint8),
        "zeros": torch.zeros(rows, length, dtype=torch.uint8),
        "ones": torch.ones(rows, length, dtype=torch.uint8),
        "alternating": (torch.arange(length) % 2).to(torch.uint8).repeat(rows, 1),
    }
    probs = torch.rand(rows, length, generator=g).clamp(0.01, 0.99)
    return cases, probs


def check_metric_contract(metric: Any, *, rows: int = 3, lengths=(9, 90, 900), seed: int = 0
                          ) -> dict[str, int]:
    """A telemetry metric: ``name``; ``metric(bits, probs)`` on random, constant and alternating
    rows gives a float tensor of one finite value per row within ``bounds`` (default (0, 1)),
    the same twice, inputs untouched; without ``probs`` it gives the same kind of output or
    raises a ``BitlmError``; rows holding a 2 raise a ``BitlmError``; a ``differentiable``
    metric passes finite gradients to ``probs``. Returns how many calls were checked."""
    import torch

    from bitlm_core.components import DEFAULT_BOUNDS, output_problem
    from bitlm_core.errors import BitlmError

    assert isinstance(getattr(metric, "name", None), str) and metric.name, "metric has no name"
    bounds = getattr(metric, "bounds", DEFAULT_BOUNDS)
    checked = 0
    for length in lengths:
        cases, probs = _bits_and_probs(rows, length, seed)
        for case, bits in cases.items():
            for given in (probs, None):
                before_bits = bits.clone()
                before_probs = given.clone() if given is not None else None
                try:
                    value = metric(bits, given)
                except BitlmError:
                    assert given is None, f"{metric.name} refused {case} bits with probs"
                    continue
                where = f"{metric.name} on {case} bits of length {length}" + (
                    "" if given is not None else " without probs")
                problem = output_problem(value, rows, bounds)
                assert problem is None, f"{where} returned {problem}"
                again = metric(bits, given)
                assert torch.equal(value, again), f"{where} is not deterministic"
                assert torch.equal(bits, before_bits), f"{where} changed its bits"
                if given is not None:
                    assert torch.equal(given, before_probs), f"{where} changed its probs"
                checked += 1
    bad = torch.full((rows, 18), 2, dtype=torch.uint8)
    try:
        metric(bad, None)
    except BitlmError:
        pass
    else:
        raise AssertionError(f"{metric.name} accepted bits holding 2")
    if getattr(metric, "differentiable", False):
        cases, probs = _bits_and_probs(rows, 90, seed)
        probs.requires_grad_(True)
        metric(cases["random"], probs).sum().backward()
        assert probs.grad is not None and bool(torch.isfinite(probs.grad).all()), (
            f"{metric.name} says it is differentiable but gives no finite gradient")
        assert bool(probs.grad.abs().sum() > 0), f"{metric.name}'s gradient is zero everywhere"
    return {"calls": checked}


def check_gate_contract(gate: Any, metrics: Optional[dict[str, float]] = None) -> None:
    """A safety gate: ``name``; ``check(metrics)`` returns a ``GateDecision`` (``allowed``,
    reasons as strings, none when allowed, at least one when blocked) for the metrics given,
    for none at all and for values at the ends of their ranges; ``reset()`` brings back the
    first verdict."""
    from bitlm_core.interfaces import GateDecision

    assert isinstance(getattr(gate, "name", None), str) and gate.name, "gate has no name"
    samples = [metrics or {}, {}, {k: 0.0 for k in (metrics or {})},
               {k: 1.0 for k in (metrics or {})}]
    first = None
    for values in samples:
        decision = gate.check(dict(values))
        assert isinstance(decision, GateDecision), f"{gate.name}.check returned {decision!r}"
        assert isinstance(decision.allowed, bool)
        assert all(isinstance(r, str) and r for r in decision.reasons)
        assert decision.allowed == (not decision.reasons), (
            f"{gate.name}: allowed={decision.allowed} with reasons {decision.reasons}")
        first = decision if first is None else first
    gate.reset()
    assert gate.check(dict(samples[0])).allowed == first.allowed, (
        f"{gate.name}: reset() does not bring back the first verdict")


def _logits(model, bits):
    import torch

    from bitlm_core.model import eval_mode

    with eval_mode(model), torch.no_grad():
        return model(bits, causal=True)


def check_scaling_contract(strategy: Any, model: Any = None, atol: float = 1e-5) -> None:
    """A scaling strategy: ``grow(model)`` grows the model in place and returns it, with
    outputs unchanged on inputs it could already take (within ``atol``), its config saying the
    new size, and ``describe(before, after)`` (when there is one) a string; a model that
    ``can_grow`` says no to is left as it is."""
    import torch

    model = model if model is not None else tiny_model()
    g = torch.Generator().manual_seed(0)
    bits = (torch.rand(2, model.cfg.max_frames * model.frame_bits, generator=g) < 0.5).to(
        torch.uint8)
    before, logits = model.cfg, _logits(model, bits)
    can = getattr(strategy, "can_grow", None)
    grown = strategy.grow(model)
    assert grown is model, "grow must grow the model in place and return it"
    torch.testing.assert_close(_logits(model, bits), logits, rtol=0, atol=atol,
                               msg="growing changed the model's outputs")
    if can is not None and not can(model) and model.cfg == before:
        return
    assert model.cfg != before, "grow changed nothing, and can_grow did not say it could not"
    describe = getattr(strategy, "describe", None)
    if describe is not None:
        assert isinstance(describe(before, model.cfg), str)
    if can is not None and not can(model):
        cfg = model.cfg
        assert strategy.grow(model) is model and model.cfg == cfg, (
            "grow changed a model that can_grow said could not grow")


def check_objective_contract(objective: Any, model: Any = None) -> None:
    """An objective: ``name``, ``causal`` and ``is_bound`` booleans; called in training mode
    it gives a finite scalar loss with a gradient and a finite, non-negative
    ``bits_per_byte``; in evaluation mode it runs without gradients."""
    import torch

    from bitlm_core.interfaces import ObjectiveOutput

    assert isinstance(getattr(objective, "name", None), str) and objective.name
    assert isinstance(objective.causal, bool) and isinstance(objective.is_bound, bool)
    model = model if model is not None else tiny_model(causal=objective.causal)
    g = torch.Generator().manual_seed(0)
    bits = (torch.rand(2, 8 * model.frame_bits, generator=g) < 0.5).to(torch.uint8)
    model.train()
    out = objective(model, bits)
    assert isinstance(out, ObjectiveOutput), f"{objective.name} returned {type(out).__name__}"
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss)), "loss is not a finite scalar"
    assert out.loss.requires_grad, "the training loss has no gradient"
    out.loss.backward()
    assert math.isfinite(out.bits_per_byte) and out.bits_per_byte >= 0
    model.eval()
    with torch.no_grad():
        assert math.isfinite(objective(model, bits).bits_per_byte)


def check_sampler_contract(sampler: Any, model: Any = None, encoder: Any = None,
                           n_frames: int = 5) -> None:
    """A sampler: ``name`` and ``causal``; ``sample(model, prompt, n, generator, encoder)``
    returns the prompt's bits unchanged followed by ``n`` whole frames the encoder decodes
    (parity included), the same for the same seed, and leaves the model's mode as it was."""
    import torch

    assert isinstance(getattr(sampler, "name", None), str) and sampler.name
    assert isinstance(sampler.causal, bool)
    if encoder is None:
        from bitlm_core.builtins.encoders import Parity9Encoder

        encoder = Parity9Encoder()
    model = model if model is not None else tiny_model(causal=sampler.causal)
    prompt = encoder.encode(b"ab")
    model.train()
    runs = [sampler.sample(model, prompt, n_frames, torch.Generator().manual_seed(7), encoder)
            for _ in range(2)]
    assert model.training, "sample left the model in evaluation mode"
    out = runs[0]
    assert out.dim() == 1 and out.numel() == prompt.numel() + n_frames * encoder.frame_bits, (
        f"sample returned shape {tuple(out.shape)}")
    assert torch.equal(out[: prompt.numel()].to(torch.uint8), prompt), "the prompt changed"
    assert torch.equal(runs[0], runs[1]), "the same seed gave different samples"
    encoder.decode(out.to(torch.uint8))  # raises on a frame the encoder cannot read


def check_corpus_contract(corpus: Any) -> bytes:
    """A corpus: ``name``; ``read()`` returns bytes, the same each time. Returns them."""
    assert isinstance(getattr(corpus, "name", None), str) and corpus.name
    data = corpus.read()
    assert isinstance(data, bytes), f"read() returned {type(data).__name__}, not bytes"
    assert corpus.read() == data, "read() gave different bytes the second time"
    return data


def check_callback_contract(make: Callable[[], Any], steps: int = 4) -> None:
    """A training callback (``make()`` builds one): it has the six events, and a short run with
    it ends with the weights a run without it ends with (a callback watches; one meant to
    change training is not for this check)."""
    import tempfile
    from pathlib import Path

    import torch

    from bitlm_core.components import REQUIRED

    callback = make()
    missing = [e for e in REQUIRED["callback"] if not callable(getattr(callback, e, None))]
    assert not missing, f"the callback has no {', '.join(missing)}"
    with tempfile.TemporaryDirectory() as tmp:
        weights = [_short_run(Path(tmp) / name, cbs, steps)
                   for name, cbs in (("with", [make()]), ("without", []))]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), (
        "training with the callback ended with other weights than without it")


def _short_run(folder, callbacks: list, steps: int) -> dict:
    import numpy as np

    from bitlm_core.builtins.encoders import Parity9Encoder
    from bitlm_core.builtins.objectives import CausalObjective
    from bitlm_core.engine.dataset import prepare_dataset
    from bitlm_core.engine.trainer import Trainer, TrainState
    from bitlm_core.spec import validate_spec

    spec = validate_spec({"data": {"seq_len": 8}, "train": {
        "steps": steps, "batch_size": 2, "log_every": 1, "eval_every": 2, "eval_batches": 1,
        "checkpoint_every": 2, "warmup_steps": 1}})
    text = bytes(np.random.default_rng(0).integers(97, 123, size=2000, dtype=np.uint8))
    model = tiny_model(max_frames=8)
    dataset = prepare_dataset(text, Parity9Encoder(), 8, 0.1, folder / "data")
    trainer = Trainer(spec, model, CausalObjective(), dataset, folder,
                      lambda state: {"model_config": model.cfg.to_dict()}, callbacks=callbacks,
                      log=lambda message: None)
    trainer.fit(TrainState())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_command_contract(factory: Callable[[], Any], name: str = "command") -> None:
    """A ``bitlm_commands`` factory: returns a ``typer.Typer`` or a function, which Typer can
    build, and whose ``--help`` works."""
    import typer
    from typer.testing import CliRunner

    made = factory()
    if isinstance(made, typer.Typer):
        app = made
    else:
        assert callable(made), f"the factory returned {type(made).__name__}"
        app = typer.Typer()
        app.command(name=name)(made)
    typer.main.get_command(app)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
