"""Each built-in callback on its own, against a stand-in trainer, and the loop that calls them.

The stand-in records what a callback writes, logs, saves and asks for; the real
:class:`~bitlm_core.engine.trainer.Trainer` is used only where a callback needs a model and an
optimizer (growth, attention maps) and for the loop itself.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.engine import callbacks as cb
from bitlm_core.engine.trainer import RunningMeans, Trainer, TrainState
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.spec import validate_spec


def spec(**sections):
    return validate_spec({"train": {"steps": 7, "log_every": 3, "eval_every": 3,
                                    "checkpoint_every": 2, **sections.pop("train", {})},
                          **sections})


class StandIn:
    """What a callback sees of a trainer, recording what it does."""

    def __init__(self, run_spec, **attrs):
        self.spec, self.t = run_spec, run_spec.train
        self.records, self.logs, self.events, self.saved = [], [], [], []
        self.callbacks, self.stop_reason, self.progress = [], None, None
        self.means = RunningMeans()
        self.__dict__.update(attrs)

    def write_metrics(self, record):
        self.records.append(record)

    def log(self, message):
        self.logs.append(message)

    def emit(self, event, state, *args):
        self.events.append((event, state.step))
        for callback in self.callbacks:
            getattr(callback, event)(self, state, *args)

    def request_stop(self, reason):
        self.stop_reason = self.stop_reason or reason

    def checkpoint(self, state):
        self.saved.append(state.step)


def steps(callback, trainer, last, record=None, state=None):
    state = state or TrainState()
    for step in range(1, last + 1):
        state.step = step
        callback.on_step(trainer, state, dict(record or {"loss": 1.0}, step=step))
    return state


def test_builtin_callbacks_are_registered_in_the_loop_order():
    from bitlm_core.registry import get_registry

    reg = get_registry()
    assert [type(reg.build("callback", n)).__name__ for n in cb.BUILTIN] == [
        "TrainLog", "Evaluation", "Growth", "AttentionMaps", "Telemetry", "Progress",
        "Checkpointing", "TimeLimit", "QuantizationAware"]
    assert all(reg.get("callback", n).plugin == "core" for n in cb.BUILTIN)


def test_train_log_writes_every_log_every_and_the_last_step_with_the_means():
    trainer = StandIn(spec())
    trainer.means.add({"raw/loss": 2.0})
    trainer.means.add({"raw/loss": 4.0})
    steps(cb.TrainLog(), trainer, 7)
    assert [r["step"] for r in trainer.records] == [3, 6, 7]
    assert trainer.records[0] == {"split": "train", "loss": 1.0, "step": 3, "raw/loss": 3.0,
                                  "raw/batches": 2}
    assert "raw/loss" not in trainer.records[1]  # drained at the first line


def test_evaluation_writes_val_records_tells_the_others_and_logs(monkeypatch):
    from bitlm_core.engine import evaluation

    scores = iter([3.5, 3.25, 3.0])
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: {"bits_per_byte": next(scores),
                                                            "bytes": 640, "bound": False})
    heard = []
    listener = SimpleNamespace(on_eval=lambda trainer, state, result: heard.append(
        (state.step, result["bits_per_byte"])))
    trainer = StandIn(spec(), model=None, objective=None, dataset=None, callbacks=[listener])
    state = steps(cb.Evaluation(), trainer, 7)
    assert [(r["step"], r["bits_per_byte"]) for r in trainer.records] == [(3, 3.5), (6, 3.25),
                                                                           (7, 3.0)]
    assert heard == [(3, 3.5), (6, 3.25), (7, 3.0)]
    assert state.metrics["val_bits_per_byte"] == 3.0
    assert trainer.logs[0] == "step      3  train loss 1.0000  held-out 3.500 bits/byte"


def tiny_model(n_layers=1):
    torch.manual_seed(0)
    return BitTransformerLM(ModelConfig(d_model=16, n_layers=n_layers, n_heads=2, d_ff=32,
                                        local_dim=16, max_frames=8, frame_parity=True),
                            ReferenceAttention())


def test_growth_grows_after_patience_evaluations_without_gain_and_keeps_adam_state(tmp_path):
    from bitlm_core.builtins.scaling import DepthGrowth
    from bitlm_core.engine.optim import make_optimizer

    run_spec = spec(scaling={"strategy": {"name": "depth"}, "patience": 2, "min_delta": 0.01,
                             "max_growths": 1})
    model = tiny_model()
    optimizer = make_optimizer(model, run_spec.train)
    model(torch.zeros(1, 72, dtype=torch.uint8)).sum().backward()
    optimizer.step()
    dataset = SimpleNamespace(seq_frames=8, val=SimpleNamespace(n_frames=100),
                              train=SimpleNamespace(n_frames=1000))
    trainer = StandIn(run_spec, model=model, optimizer=optimizer, dataset=dataset,
                      scaling=DepthGrowth(add=1, max_layers=4))
    growth, state = cb.Growth(), TrainState(step=3)
    first = next(iter(model.parameters()))
    for bpb in (3.0, 2.995, 2.99):  # improvements below min_delta: a plateau at the third
        growth.on_eval(trainer, state, {"bits_per_byte": bpb})
    assert model.cfg.n_layers == 2 and state.metrics["scaling/growths"] == 1
    assert trainer.optimizer is not optimizer and trainer.optimizer.state[first]  # carried
    assert trainer.records[-1]["split"] == "scaling"
    assert trainer.records[-1]["change"] == "depth 1 -> 2 layers"
    for bpb in (2.99, 2.99, 2.99):  # max_growths reached: never again
        growth.on_eval(trainer, state, {"bits_per_byte": bpb})
    assert model.cfg.n_layers == 2
    plateau = {"scaling/best_bpb": 2.0, "scaling/stale": 5}  # would grow at any other step
    growth.on_eval(trainer, TrainState(step=6, metrics=dict(plateau)), {"bits_per_byte": 9.0})
    assert model.cfg.n_layers == 3
    growth.on_eval(trainer, TrainState(step=7, metrics=dict(plateau)), {"bits_per_byte": 9.0})
    assert model.cfg.n_layers == 3  # not at the last step: nothing would train the new block


def test_attention_maps_are_saved_only_when_asked_and_only_with_maps(tmp_path):
    window = torch.from_numpy(np.unpackbits(np.frombuffer(b"attend!!", np.uint8)).reshape(
        -1, 8)).repeat(1, 2)[:, :9].reshape(1, -1).to(torch.uint8)
    dataset = SimpleNamespace(val_batches=lambda b, n: iter([window]))
    trainer = StandIn(spec(attention={"full_attn_logging": True}), model=tiny_model(2),
                      dataset=dataset, run_dir=Path(tmp_path))
    cb.AttentionMaps().on_eval(trainer, TrainState(step=3), {})
    maps = load_file(str(tmp_path / "attention" / "step-3.safetensors"))
    assert sorted(maps) == ["layer0", "layer1"] and maps["layer0"].shape == (2, 8, 8)
    off = StandIn(spec(), model=tiny_model(), dataset=dataset, run_dir=Path(tmp_path / "off"))
    cb.AttentionMaps().on_eval(off, TrainState(step=3), {})
    assert not (tmp_path / "off").exists()


class MeanBit:
    """A telemetry metric: the share of ones in each row (drifts when the bits do)."""

    name = "mean_bit"

    def __call__(self, bits, probs=None):
        return bits.float().mean(dim=1)


def test_telemetry_on_train_and_held_out_batches_then_drift_alert_and_stop():
    batches = iter([torch.zeros(2, 18, dtype=torch.uint8), torch.ones(2, 18, dtype=torch.uint8)])
    dataset = SimpleNamespace(val_batches=lambda b, n: iter([next(batches)]))
    trainer = StandIn(spec(telemetry={"every": 3, "drift_threshold": 0.5, "drift_window": 1,
                                      "drift_stop": True}),
                      telemetry={"mean_bit": MeanBit()}, dataset=dataset,
                      objective=SimpleNamespace(causal=False),
                      windows=lambda step, micro: (None, torch.ones(2, 18, dtype=torch.uint8)))
    state = steps(cb.Telemetry(), trainer, 6)
    tel = [r for r in trainer.records if r["split"] == "telemetry"]
    assert tel == [{"split": "telemetry", "step": 3, "telemetry/train/mean_bit": 1.0,
                    "telemetry/val/mean_bit": 0.0},
                   {"split": "telemetry", "step": 6, "telemetry/train/mean_bit": 1.0,
                    "telemetry/val/mean_bit": 1.0}]
    alert = next(r for r in trainer.records if r["split"] == "alert")
    assert alert["step"] == 6 and alert["metric"] == "telemetry/val/mean_bit"
    assert state.metrics["telemetry/val/mean_bit"] == 1.0
    assert trainer.stop_reason.startswith("telemetry drift (telemetry/val/mean_bit drifted")


def test_telemetry_does_nothing_without_metrics():
    trainer = StandIn(spec(telemetry={"every": 1}), telemetry={})
    steps(cb.Telemetry(), trainer, 3)
    assert trainer.records == []


def test_progress_shows_the_step_the_last_held_out_figure_and_telemetry():
    calls = []
    bar = SimpleNamespace(add_task=lambda *a, **k: calls.append(("add", k)) or 7,
                          update=lambda task, **k: calls.append(("update", task, k)))
    trainer = StandIn(spec(), progress=bar)
    progress, state = cb.Progress(), TrainState(step=2)
    progress.on_fit_start(trainer, state)
    state.step = 3
    state.metrics.update({"val_bits_per_byte": 2.5, "telemetry/val/symbiosis": 0.75})
    progress.on_step(trainer, state, {"loss": 0.5, "bits_per_byte": 3.25, "lr": 0.001})
    assert calls[0] == ("add", {"total": 7, "completed": 2, "info": ""})
    assert calls[1][:2] == ("update", 7) and calls[1][2]["completed"] == 3
    assert calls[1][2]["info"] == "loss 0.5000  bpb 3.250  val 2.500  lr 1.00e-03  sym 0.75"
    quiet = StandIn(spec())  # no bar: nothing to do
    cb.Progress().on_fit_start(quiet, state)
    cb.Progress().on_step(quiet, state, {})


def test_checkpoints_every_n_steps_at_the_end_and_on_interrupt():
    trainer = StandIn(spec())
    checkpointing = cb.Checkpointing()
    state = steps(checkpointing, trainer, 7)
    assert trainer.saved == [2, 4, 6]  # the last step is saved by on_end, once
    checkpointing.on_end(trainer, state)
    checkpointing.on_interrupt(trainer, TrainState(step=5))
    assert trainer.saved == [2, 4, 6, 7, 5]


def test_time_limit_stops_once_training_took_max_minutes():
    trainer = StandIn(spec(train={"max_minutes": 0.5}))
    limit = cb.TimeLimit()
    limit.on_step(trainer, TrainState(step=1, elapsed=29.0), {})
    assert trainer.stop_reason is None
    limit.on_step(trainer, TrainState(step=2, elapsed=31.0), {})
    assert trainer.stop_reason == "train.max_minutes=0.5 reached"
    unlimited = StandIn(spec())
    limit.on_step(unlimited, TrainState(step=1, elapsed=1e9), {})
    assert unlimited.stop_reason is None


class Recorder(cb.Callback):
    """Records every event; asks to stop at ``stop_at``; raises Ctrl-C at ``interrupt_at``."""

    def __init__(self, stop_at=None, interrupt_at=None):
        self.events, self.stop_at, self.interrupt_at = [], stop_at, interrupt_at

    def on_fit_start(self, trainer, state):
        self.events.append(("start", state.step))

    def on_step(self, trainer, state, record):
        self.events.append(("step", state.step, sorted(record)))
        if state.step == self.interrupt_at:
            raise KeyboardInterrupt
        if state.step == self.stop_at:
            trainer.request_stop("enough")

    def on_checkpoint(self, trainer, state, path):
        self.events.append(("checkpoint", state.step, Path(path).name))

    def on_interrupt(self, trainer, state):
        self.events.append(("interrupt", state.step))

    def on_end(self, trainer, state):
        self.events.append(("end", state.step))


def loop(tmp_path, tiny_spec, *callbacks, steps_=5):
    from bitlm_core.app.build import build_model
    from bitlm_core.app.run import load_dataset
    from bitlm_core.components import Components
    from bitlm_core.spec import load_spec

    run_spec = load_spec(tiny_spec(steps=steps_))
    comps = Components.build(run_spec)
    model = build_model(run_spec, comps)
    dataset, _ = load_dataset(run_spec, comps, tmp_path)
    logs = []
    trainer = Trainer(run_spec, model, comps.objective, dataset, tmp_path,
                      lambda s: {"model_config": model.cfg.to_dict()}, callbacks=callbacks,
                      log=logs.append)
    return trainer, logs


def test_fit_runs_the_steps_and_tells_callbacks_in_order(tmp_path, tiny_spec):
    recorder = Recorder()
    trainer, _ = loop(tmp_path, tiny_spec, recorder, cb.Checkpointing())
    state = trainer.fit(TrainState(step=2))  # as when resumed from step 2
    assert state.step == 5 and state.elapsed > 0
    keys = ["bits_per_byte", "compressed_batches", "grad_norm", "loss", "lr", "step", "time"]
    assert recorder.events == [("start", 2), ("step", 3, keys), ("step", 4, keys),
                               ("checkpoint", 4, "step-000004"), ("step", 5, keys),
                               ("end", 5), ("checkpoint", 5, "step-000005")]


def test_a_stop_request_ends_the_run_after_that_step(tmp_path, tiny_spec):
    recorder = Recorder(stop_at=2)
    trainer, logs = loop(tmp_path, tiny_spec, recorder)
    assert trainer.fit(TrainState()).step == 2
    assert recorder.events[-1] == ("end", 2)
    assert logs == ["stopped early at step 2: enough"]


def test_ctrl_c_tells_callbacks_and_goes_on(tmp_path, tiny_spec):
    recorder = Recorder(interrupt_at=3)
    trainer, _ = loop(tmp_path, tiny_spec, recorder)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(TrainState())
    assert recorder.events[-1] == ("interrupt", 3)
    assert ("end", 3) not in recorder.events


CALLBACK_PLUGIN = """
from bitlm_core.engine.callbacks import Callback
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CallbackSpec


class EventsLog(Callback):
    def __init__(self, path: str, every: int = 1):
        self.path, self.every = path, every

    def write(self, line):
        with open(self.path, "a") as f:
            f.write(line + "\\n")

    def on_step(self, trainer, state, record):
        if state.step % self.every == 0:
            self.write(f"step {state.step}")

    def on_eval(self, trainer, state, result):
        self.write(f"eval {state.step}")

    def on_end(self, trainer, state):
        self.write(f"end {state.step}")


class NoEvents:
    pass


class Raising(Callback):
    def on_step(self, trainer, state, record):
        raise RuntimeError("callback bug on purpose")


@hookimpl
def bitlm_callbacks():
    yield CallbackSpec("events_log", EventsLog, "events to a text file")
    yield CallbackSpec("no_events", NoEvents, "not a callback")
    yield CallbackSpec("raising", Raising, "raises at the first step")
"""


@pytest.fixture
def callback_plugin(tmp_path, monkeypatch):
    """A fake installed plugin providing three callbacks, seen by a fresh registry."""
    import importlib
    import sys

    import bitlm_core.plugins as plugins_module
    import bitlm_core.registry as registry_module

    site = tmp_path / "site"
    info = site / "fakecb-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakecb\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bitlm]\nfakecb = fakecb_plugin\n")
    (site / "fakecb_plugin.py").write_text(CALLBACK_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(plugins_module, "_MANAGER", None)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    yield
    sys.modules.pop("fakecb_plugin", None)


def test_a_spec_adds_a_plugin_callback_with_its_options(tmp_path, tiny_spec, callback_plugin):
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    events = tmp_path / "events.txt"
    spec = load_spec(tiny_spec(steps=4, callbacks=[
        {"name": "events_log", "options": {"path": str(events), "every": 2}}]))
    summary = execute(spec, tmp_path / "run", log=lambda m: None)
    assert summary["steps"] == 4
    # evaluations at steps 3 and 4 (eval_every 3, and the last step) reach it too
    assert events.read_text().splitlines() == ["step 2", "eval 3", "eval 4", "step 4", "end 4"]


def test_callbacks_that_are_not_callbacks_or_fail_name_their_plugin(tmp_path, tiny_spec,
                                                                    callback_plugin):
    from bitlm_core.app.run import execute
    from bitlm_core.errors import PluginError, SpecError
    from bitlm_core.spec import load_spec

    def run(name, folder):
        execute(load_spec(tiny_spec(steps=2, callbacks=[{"name": name}])), tmp_path / folder,
                log=lambda m: None)

    with pytest.raises(PluginError, match=r"callback 'no_events' from plugin 'fakecb' .*has no "
                                          r"on_fit_start, on_step"):
        run("no_events", "a")
    with pytest.raises(PluginError, match=r"training callback Raising \(fakecb_plugin\) raised "
                                          r"in on_step: RuntimeError: callback bug on purpose"):
        run("raising", "b")
    with pytest.raises(SpecError, match=r"callbacks\[0\]: 'evaluation' is one of bitlm's own"):
        run("evaluation", "c")


class MeanProb:
    """A telemetry metric of the model's predictions."""

    name = "mean_prob"

    def __call__(self, bits, probs=None):
        from bitlm_core.errors import BitlmError

        if probs is None:
            raise BitlmError("needs probs")
        return probs.mean(dim=1)


def test_telemetry_gives_a_causal_models_probabilities_to_the_metrics():
    model = tiny_model().eval()
    bits = torch.zeros(2, 72, dtype=torch.uint8)
    dataset = SimpleNamespace(val_batches=lambda b, n: iter([bits]))
    common = dict(telemetry={"mean_prob": MeanProb()}, dataset=dataset, model=model,
                  windows=lambda step, micro: (None, bits))
    causal = StandIn(spec(telemetry={"every": 1}), objective=SimpleNamespace(causal=True),
                     **common)
    values = cb.Telemetry().record(causal, 1)
    from bitlm_core.engine.telemetry import next_bit_probs

    expected = float(next_bit_probs(model, bits).mean())
    assert values == pytest.approx({"telemetry/train/mean_prob": expected,
                                    "telemetry/val/mean_prob": expected})
    blind = StandIn(spec(telemetry={"every": 1}), objective=SimpleNamespace(causal=False),
                    **common)
    assert cb.Telemetry().record(blind, 1) == {}  # a non-causal model gives no probabilities
