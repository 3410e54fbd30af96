"""From spec to components: defaults that follow the objective and what is installed,
regulariser weights (and their older lambda_K/S form), and the interface check."""

from __future__ import annotations

import pytest
import torch

from bitlm_core.components import Components, check_interface, complete_spec, resolve_spec
from bitlm_core.errors import PluginError, SpecError
from bitlm_core.registry import get_registry
from bitlm_core.spec import load_spec, validate_spec

KCS = ("telemetry:negentropy", "telemetry:lz_complexity", "telemetry:symbiosis")


def test_the_sampler_defaults_to_the_one_the_objective_names():
    causal = complete_spec(validate_spec({"sample": {"sampler": {"options": {"top_k": 2}}}}))
    assert causal.sample.sampler.name == "autoregressive"
    assert causal.sample.sampler.options == {"top_k": 2}  # options kept
    assert complete_spec(validate_spec({"objective": {"name": "distill", "options": {
        "teacher": "runs/x"}}})).sample.sampler.name == "autoregressive"


@pytest.mark.needs("objective:diffusion", "sampler:diffusion")
def test_a_diffusion_objective_gets_the_diffusion_sampler_unless_one_is_named():
    spec = complete_spec(validate_spec({"objective": {"name": "diffusion"}}))
    assert spec.sample.sampler.name == "diffusion"
    assert resolve_spec(spec)["sample.sampler"].record.name == "diffusion"
    wrong = validate_spec({"objective": {"name": "diffusion"},
                           "sample": {"sampler": {"name": "autoregressive"}}})
    with pytest.raises(SpecError, match="disagree: one is causal"):
        Components.build(wrong)


def test_an_unknown_objective_is_reported_when_completing_the_sampler():
    with pytest.raises(SpecError, match="unknown objective 'causl' at objective.name"):
        complete_spec(validate_spec({"objective": {"name": "causl"}}))


def test_metrics_all_is_every_installed_metric_with_its_defaults():
    spec = complete_spec(validate_spec({"telemetry": {"metrics": "all"}}))
    assert [m.name for m in spec.telemetry.metrics] == get_registry().names("telemetry")
    assert all(m.options == {} for m in spec.telemetry.metrics)
    assert complete_spec(spec) == spec  # completing twice changes nothing


def tiny(tiny_spec, **telemetry):
    return load_spec(tiny_spec(steps=3, telemetry=telemetry))


@pytest.mark.needs(*KCS)
def test_a_weight_option_and_the_older_lambda_train_the_same_model(tmp_path, tiny_spec):
    from safetensors.torch import load_file

    from bitlm_core.app.run import execute
    from bitlm_core.store.checkpoint import latest_checkpoint

    neg = {"name": "negentropy", "options": {"source": "probs"}}
    old = tiny(tiny_spec, metrics=[neg, {"name": "symbiosis"}], lambda_K=0.3, lambda_S=0.2)
    new = tiny(tiny_spec, metrics=[{"name": "negentropy",
                                    "options": {"source": "probs", "weight": 0.3}},
                                   {"name": "symbiosis", "options": {"weight": 0.2}}])
    comps = Components.build(new)
    assert list(comps.regularisers) == ["K", "S"]  # keyed by the records' symbols
    assert [w for w, _ in comps.regularisers.values()] == [0.3, 0.2]
    assert resolve_spec(old)["telemetry.metrics[0]"].options["weight"] == 0.3  # as validate shows
    weights = []
    for name, spec in (("old", old), ("new", new)):
        execute(spec, tmp_path / name, log=lambda m: None)
        weights.append(load_file(str(latest_checkpoint(tmp_path / name) / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.needs(*KCS)
def test_weights_that_cannot_regularise_are_refused(tiny_spec):
    with pytest.raises(SpecError, match="lambda_K and telemetry.metrics.0..options.weight both"):
        Components.build(tiny(tiny_spec, lambda_K=0.1, metrics=[
            {"name": "negentropy", "options": {"source": "probs", "weight": 0.1}}]))
    with pytest.raises(SpecError, match=r"metrics\[0\] \('lz_complexity'\) has a regulariser "
                                        r"weight, but it is not differentiable"):
        Components.build(tiny(tiny_spec, metrics=[{"name": "lz_complexity",
                                                   "options": {"weight": 0.1}}]))
    with pytest.raises(SpecError, match="not differentiable"):  # negentropy of the bits
        Components.build(tiny(tiny_spec, lambda_K=0.1, metrics=[{"name": "negentropy"}]))
    with pytest.raises(SpecError, match=r"metrics\[0\].options.weight must be a number >= 0"):
        Components.build(tiny(tiny_spec, metrics=[{"name": "symbiosis",
                                                   "options": {"weight": -1}}]))
    with pytest.raises(SpecError, match="add {name: negentropy} to telemetry.metrics"):
        Components.build(tiny(tiny_spec, lambda_K=0.1))


@pytest.mark.needs(*KCS)
def test_the_weight_option_is_bitlms_not_the_metrics():
    resolved = resolve_spec(validate_spec({"telemetry": {"metrics": [
        {"name": "symbiosis", "options": {"weight": 0.5, "eps": 1e-4}}]}}))
    res = resolved["telemetry.metrics[0]"]
    assert res.options == {"weight": 0.5, "eps": 1e-4}
    assert res.factory_options == {"eps": 1e-4}  # what the metric's factory is called with


def test_components_without_what_bitlm_reads_are_the_plugins_fault():
    record = get_registry().get("objective", "causal")

    class Bare:
        causal = True

    with pytest.raises(PluginError, match=r"objective 'causal' from plugin 'core' .* has no "
                                          r"is_bound, which every objective declares"):
        check_interface(record, Bare())
    good = Bare()
    good.is_bound = False
    assert check_interface(record, good) is good


class Confidence:
    """A second metric with symbol K (as another plugin might declare)."""

    name, differentiable = "confidence", True

    def __call__(self, bits, probs=None):
        if probs is None:
            from bitlm_core.errors import BitlmError

            raise BitlmError("confidence needs the model's probabilities")
        return (probs - 0.5).abs().mean(dim=1) * 2


@pytest.mark.needs(*KCS)
def test_two_weighted_metrics_may_not_log_under_one_key(tiny_spec):
    from bitlm_core.records import TelemetryMetricSpec
    from bitlm_core.registry import Registry

    registry = Registry(get_registry().manager)
    registry.records["telemetry"]["confidence"] = TelemetryMetricSpec(
        "confidence", Confidence, symbol="K").with_origin("core", None)
    spec = tiny(tiny_spec, metrics=[
        {"name": "negentropy", "options": {"source": "probs", "weight": 0.1}},
        {"name": "confidence", "options": {"weight": 0.1}}])
    with pytest.raises(SpecError, match=r"metrics\[0\] and telemetry.metrics\[1\] both weight "
                                        r"K \(logged as reg/K\)"):
        Components.build(spec, registry)


@pytest.mark.needs(*KCS)
def test_two_metrics_of_one_name_are_refused(tiny_spec):
    with pytest.raises(SpecError, match=r"metrics\[1\] is a second metric named 'lz_complexity'"):
        Components.build(tiny(tiny_spec, metrics=[{"name": "lz_complexity"},
                                                  {"name": "lz_complexity",
                                                   "options": {"window": 64}}]))
