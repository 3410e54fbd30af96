"""train.device, train.precision and train.compile: validated with messages that say what to
do, bf16 autocast on the CPU, fp16's gradient scaler, compile with its eager fallback, and
resume after a kill in each memory and precision mode."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from bitlm_core.app.run import execute
from bitlm_core.engine.device import PrecisionWarning, check_precision, resolve_device
from bitlm_core.errors import SpecError
from bitlm_core.spec import load_spec
from bitlm_core.store.checkpoint import latest_checkpoint

runner = CliRunner()


def cli(*args):
    from bitlm_core.cli import app

    return runner.invoke(app, [str(a) for a in args])


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def quiet(message: str) -> None:
    pass


class Killed(KeyboardInterrupt):
    """A kill between steps, as a signal lands (the loop saves, then stops)."""


def kill_at(monkeypatch, step: int) -> None:
    """Inside ``monkeypatch``'s context, training raises :class:`Killed` before ``step``."""
    from bitlm_core.engine.trainer import Trainer

    train_step = Trainer.step

    def killed(self, state):
        if state.step == step:
            raise Killed()
        return train_step(self, state)

    monkeypatch.setattr(Trainer, "step", killed)


# -- devices ----------------------------------------------------------------------------------
def test_auto_is_the_cpu_on_a_machine_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_what_was_found_and_how_to_install_it(name):
    with pytest.raises(SpecError) as exc:
        resolve_device(name)
    message = str(exc.value)
    assert message.startswith(f"train.device: {name} asked for")
    assert f"torch {torch.__version__}" in message
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu" in message
    assert "train.device: cpu" in message


def test_a_device_that_is_not_one_is_refused_by_the_spec(tiny_spec):
    result = cli("validate", tiny_spec(), "-o", "train.device=gpu")
    assert result.exit_code == 2
    assert "train.device" in result.output and "gpu" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_validate_and_run_refuse_cuda_here_before_writing_anything(tmp_path, tiny_spec):
    spec = tiny_spec()
    result = cli("validate", spec, "-o", "train.device=cuda")
    assert result.exit_code == 2, result.output
    assert "no usable CUDA" in result.output and "Traceback" not in result.output
    result = cli("run", spec, "--out", tmp_path / "r", "-o", "train.device=cuda")
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_eval_and_sample_take_a_device(tmp_path, tiny_spec, tiny_corpus):
    run = tmp_path / "r"
    execute(load_spec(tiny_spec(steps=2)), run, log=quiet)
    ok = cli("eval", run, "--text", tiny_corpus, "--device", "cpu", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["bits_per_byte"] > 0
    bad = cli("sample", run, "--bytes", "4", "--device", "cuda")
    assert bad.exit_code == 2
    assert "--device: cuda asked for" in bad.output


# -- precision --------------------------------------------------------------------------------
def test_fp16_on_the_cpu_is_warned_with_the_reason():
    with pytest.warns(PrecisionWarning, match="slower than fp32"):
        check_precision("fp16", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16", torch.device("cpu"))
        check_precision("fp32", torch.device("cpu"))


def test_bf16_runs_the_blocks_in_bf16_and_keeps_weights_and_loss_in_fp32(tmp_path, tiny_spec):
    from bitlm_core.app.build import build_model
    from bitlm_core.components import Components

    spec = load_spec(tiny_spec(), ["train.precision=bf16"])
    comps = Components.build(spec)
    model = build_model(spec, comps)
    seen = []
    model.blocks[0].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randint(0, 2, (2, 16 * 9))
    out = comps.objective(model, x)
    out.loss.backward()
    assert seen == [torch.bfloat16]
    assert out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_bf16_training_learns_and_differs_from_fp32(tmp_path, tiny_spec):
    path = tiny_spec(steps=8)
    fp32 = execute(load_spec(path), tmp_path / "a", log=quiet)
    bf16 = execute(load_spec(path, ["train.precision=bf16"]), tmp_path / "b", log=quiet)
    assert bf16["precision"] == "bf16"
    assert abs(bf16["held_out_bits_per_byte"] - fp32["held_out_bits_per_byte"]) < 0.5
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)  # autocast really changed the math


def test_fp16_trains_through_the_gradient_scaler_and_saves_its_state(tmp_path, tiny_spec):
    with pytest.warns(PrecisionWarning):
        summary = execute(load_spec(tiny_spec(steps=4), ["train.precision=fp16"]),
                          tmp_path / "r", log=quiet)
    assert summary["held_out_bits_per_byte"] < 20
    state = json.loads((latest_checkpoint(tmp_path / "r") / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0
    assert set(state["grad_scaler"]) >= {"scale", "growth_interval", "_growth_tracker"}


def test_a_resumed_fp16_run_takes_the_saved_gradient_scale(tmp_path, tiny_spec, monkeypatch):
    from bitlm_core.app.run import open_run
    from bitlm_core.components import Components

    spec = load_spec(tiny_spec(steps=4), ["train.precision=fp16"])
    with monkeypatch.context() as m, pytest.warns(PrecisionWarning):
        kill_at(m, 2)
        with pytest.raises(Killed):
            execute(spec, tmp_path / "r", log=quiet)
    state_file = latest_checkpoint(tmp_path / "r") / "state.json"
    state = json.loads(state_file.read_text())
    state["grad_scaler"]["scale"] = 1024.0
    state["grad_scaler"]["_growth_tracker"] = 7
    state_file.write_text(json.dumps(state))
    (state_file.parent / "checksums.json").unlink(missing_ok=True)
    with pytest.warns(PrecisionWarning):
        trainer, resumed, _ = open_run(Components.build(spec), tmp_path / "r", False, quiet,
                                       None)
    assert resumed.step == 2
    assert trainer.scaler.get_scale() == 1024.0
    assert trainer.scaler.state_dict()["_growth_tracker"] == 7


def test_a_damaged_grad_scaler_state_is_a_clear_error(tmp_path, tiny_spec):
    path = tiny_spec(steps=4)
    with pytest.warns(PrecisionWarning):
        execute(load_spec(path, ["train.precision=fp16", "train.steps=2"]), tmp_path / "r",
                log=quiet)
    state_file = latest_checkpoint(tmp_path / "r") / "state.json"
    state = json.loads(state_file.read_text())
    state["grad_scaler"] = {"scale": "lots"}
    state_file.write_text(json.dumps(state))
    (state_file.parent / "checksums.json").unlink(missing_ok=True)
    result = cli("run", path, "--out", tmp_path / "r", "-o", "train.precision=fp16")
    assert result.exit_code == 2, result.output
    assert "grad_scaler" in result.output and "Traceback" not in result.output


# -- resume after a kill, in every mode -----------------------------------------------------


@pytest.mark.parametrize("overrides", [
    ["model.reversible=true", "model.dropout=0.1"],
    ["model.checkpointing=every_k", "model.dropout=0.1"],
    ["train.precision=bf16"],
    ["train.precision=fp16"],
    ["model.act.enabled=true", "model.reversible=true", "model.checkpointing=blocks",
     "model.dropout=0.1"],
], ids=["reversible", "checkpointing", "bf16", "fp16", "act"])
def test_a_killed_run_resumes_to_the_uninterrupted_runs_weights(tmp_path, tiny_spec,
                                                                monkeypatch, overrides):
    path = tiny_spec(steps=6)
    warnings.simplefilter("ignore", PrecisionWarning)
    execute(load_spec(path, overrides), tmp_path / "straight", log=quiet)
    with monkeypatch.context() as m:
        kill_at(m, 3)
        with pytest.raises(Killed):
            execute(load_spec(path, overrides), tmp_path / "resumed", log=quiet)
    logs = []
    execute(load_spec(path, overrides), tmp_path / "resumed", log=logs.append)
    assert any("resuming from step-000003" in m for m in logs), logs
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- compile ----------------------------------------------------------------------------------
def test_compile_failure_warns_and_trains_eagerly(tmp_path, tiny_spec, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    logs = []
    path = tiny_spec(steps=4)
    summary = execute(load_spec(path, ["train.compile=true"]), tmp_path / "c", log=logs.append)
    assert any("train.compile: torch.compile failed, training eagerly" in m
               and "no C++ compiler found" in m for m in logs), logs
    execute(load_spec(path), tmp_path / "e", log=quiet)
    a, b = weights(tmp_path / "c"), weights(tmp_path / "e")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed attempt changed nothing
    assert summary["compile_seconds"] == 0


class CountingObjective:
    """An objective with state (as a curriculum that counts its calls)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.causal, self.is_bound = inner.causal, inner.is_bound

    def __call__(self, model, bits):
        self.calls += 1
        return self.inner(model, bits)


def test_the_compile_warm_up_changes_no_weight_gradient_or_objective_state(tmp_path, tiny_spec,
                                                                           monkeypatch):
    from bitlm_core.app.build import build_model
    from bitlm_core.app.run import load_dataset
    from bitlm_core.components import Components
    from bitlm_core.engine.trainer import Trainer, TrainState

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",  # the same numbers as eager, without a compiler
                        lambda model, mode=None: compile_(model, backend="eager"))
    spec = load_spec(tiny_spec(), ["train.compile=true"])
    comps = Components.build(spec)
    model = build_model(spec, comps)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset, _ = load_dataset(spec, comps, tmp_path / "r")
    objective = CountingObjective(comps.objective)
    trainer = Trainer(spec, model, objective, dataset, tmp_path / "r", lambda s: {},
                      log=quiet)
    trainer.compile(TrainState())
    assert trainer.net is not model and trainer.compile_seconds > 0
    assert objective.calls == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.step(TrainState())
    assert objective.calls == 1  # the training step called it, through the compiled model


def test_compiled_training_matches_eager_and_reports_compile_time(tmp_path, tiny_spec):
    path = tiny_spec(steps=3)
    logs = []
    compiled = execute(load_spec(path, ["train.compile=true", "sample.count=0"]),
                       tmp_path / "c", log=logs.append)
    eager = execute(load_spec(path, ["sample.count=0"]), tmp_path / "e", log=quiet)
    assert any(m.startswith("compiled the model in") for m in logs), logs
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] == 0
    assert compiled["held_out_bits_per_byte"] == pytest.approx(
        eager["held_out_bits_per_byte"], abs=1e-3)


def test_the_memory_estimate_follows_what_each_mode_keeps(tiny_spec):
    from bitlm_core.app.build import training_memory
    from bitlm_core.components import Components

    def activations(*overrides):
        spec = load_spec(tiny_spec(), list(overrides))
        return training_memory(spec, Components.build(spec))["activations"]

    def growth(*overrides):  # from 2 to 16 blocks
        return (activations("model.n_layers=16", *overrides)
                / activations("model.n_layers=2", *overrides))

    assert growth() > 2.5  # the framed local head does not grow with depth
    assert growth("model.reversible=true") < 1.2
    assert growth("model.checkpointing=blocks") < growth()
    assert growth("model.reversible=true", "model.act.enabled=true") > 2  # ACT keeps states


def test_a_device_name_from_the_command_line_is_quoted_bounded():
    with pytest.raises(SpecError) as exc:
        resolve_device("x" * 5000, "--device")
    assert "--device: 'xxxx" in str(exc.value) and len(str(exc.value)) < 200
