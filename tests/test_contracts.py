"""bitlm's own components meet the contracts plugin authors are given (bitlm_core.testing), and
the checks catch what they say they catch."""

from __future__ import annotations

import pytest
import torch

from bitlm_core.errors import BitlmError
from bitlm_core.registry import get_registry
from bitlm_core.testing import (check_callback_contract, check_command_contract,
                                check_corpus_contract, check_gate_contract,
                                check_metric_contract, check_objective_contract,
                                check_sampler_contract, check_scaling_contract, tiny_model)


def build(kind, name, **options):
    return get_registry().build(kind, name, options)


def test_core_components_meet_their_contracts(tmp_path):
    check_gate_contract(build("safety", "none"), {"lz_complexity": 0.5})
    for name, options in (("depth", {"add": 1}), ("width", {}), ("context", {})):
        check_scaling_contract(build("scaling", name, **options))
    check_objective_contract(build("objective", "causal"))
    check_sampler_contract(build("sampler", "autoregressive"))
    check_sampler_contract(build("sampler", "autoregressive", cache=False, temperature=0.0))
    (tmp_path / "t.txt").write_text("some text")
    assert check_corpus_contract(build("corpus", "file", path=str(tmp_path / "t.txt"))) == \
        b"some text"
    check_corpus_contract(build("corpus", "quickstart"))
    registry = get_registry()
    for name in registry.names("command"):
        check_command_contract(registry.get("command", name).load(), name)
    from bitlm_core.engine.callbacks import BUILTIN

    for name in BUILTIN:
        check_callback_contract(lambda name=name: build("callback", name))


class Scalar:
    name = "scalar"

    def __call__(self, bits, probs=None):
        return torch.tensor(0.5)  # one value for the whole batch


class TooHigh:
    name = "too_high"

    def __call__(self, bits, probs=None):
        from bitlm_core.bits import check_bits

        return check_bits(bits).float().sum(dim=1)  # a count, not in [0, 1]


class Chatty:
    name = "chatty"

    def __call__(self, bits, probs=None):
        from bitlm_core.bits import check_bits

        return check_bits(bits).float().mean(dim=1)


class Meddler:
    """Changes training: the weights go one way in on_step."""

    def __getattr__(self, event):
        if event.startswith("on_"):
            return lambda *a: None
        raise AttributeError(event)

    def on_step(self, trainer, state, record):
        with torch.no_grad():
            next(trainer.model.parameters()).add_(1.0)


def test_the_checks_catch_what_they_say():
    check_metric_contract(Chatty())
    with pytest.raises(AssertionError, match=r"shape \(\) for 3 rows"):
        check_metric_contract(Scalar())
    with pytest.raises(AssertionError, match=r"outside its bounds \(0.0, 1.0\)"):
        check_metric_contract(TooHigh())
    with pytest.raises(AssertionError, match="other weights than without it"):
        check_callback_contract(Meddler)

    class Shrinker:
        name = "shrinker"

        def grow(self, model):
            with torch.no_grad():
                model.ln_f.weight.mul_(0.5)
            return model

    with pytest.raises(AssertionError, match="changed the model's outputs"):
        check_scaling_contract(Shrinker())


def test_a_run_refuses_a_metric_that_breaks_its_contract_before_training(tmp_path, tiny_spec):
    from bitlm_core.components import Components
    from bitlm_core.errors import PluginError
    from bitlm_core.records import TelemetryMetricSpec
    from bitlm_core.registry import Registry
    from bitlm_core.spec import load_spec

    registry = Registry(get_registry().manager)
    registry.records["telemetry"]["scalar"] = TelemetryMetricSpec("scalar", Scalar).with_origin(
        "fake", None)
    spec = load_spec(tiny_spec(steps=2, telemetry={"metrics": [{"name": "scalar"}]}))
    with pytest.raises(PluginError, match=r"telemetry 'scalar' from plugin 'fake' at "
                                          r"telemetry.metrics\[0\] returned shape \(\) for 2 "
                                          r"rows"):
        Components.build(spec, registry)
    assert issubclass(PluginError, BitlmError)
    assert tiny_model().cfg.layout == "framed"


class NoMagic:
    name = "nomagic"

    def compress(self, bits):
        return bytes(bits.tolist())

    def decompress(self, data, max_bits=1 << 20):
        return torch.tensor(list(data), dtype=torch.uint8)


class Bomb(NoMagic):
    """Stores a run of zeros as its length, and ignores max_bits when it decodes."""

    name, magic = "bomb", b"BOMB"

    def compress(self, bits):
        from bitlm_core.bits import check_bits

        bits = check_bits(bits)
        if bits.numel() and not bits.any():
            return self.magic + b"Z" + bits.numel().to_bytes(8, "little")
        return self.magic + b"B" + bytes(bits.tolist())

    def decompress(self, data, max_bits=1 << 20):
        from bitlm_core.errors import CodecError

        if data[:4] != self.magic or data[4:5] not in (b"Z", b"B"):
            raise CodecError("not a bomb stream")
        if data[4:5] == b"Z":
            if len(data) != 13:
                raise CodecError("bad length")
            return torch.zeros(int.from_bytes(data[5:], "little"), dtype=torch.uint8)
        out = torch.tensor(list(data[5:]), dtype=torch.uint8)
        if out.numel() > max_bits or (out.numel() and int(out.max()) > 1):
            raise CodecError("bad stream")
        return out


def test_the_codec_contract_names_what_is_missing_and_catches_a_bomb():
    from bitlm_core.testing import check_codec_contract, check_hostile_streams

    with pytest.raises(AssertionError, match="it has no magic"):
        check_codec_contract(NoMagic())
    with pytest.raises(AssertionError, match="decompression bomb"):
        check_hostile_streams(Bomb(), samples=[], random_streams=0)
