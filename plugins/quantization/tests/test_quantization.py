"""bitlm-quantization: int4 packing and files (exact round trips, tampered files), 4-bit QAT
stored as it computed, and int8-dynamic inference (eval, sample, compress)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bitlm_core.errors import CheckpointError
from bitlm_quantization.int4 import GROUP, SCALE, Int4, pack, unpack

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 40
        + "a bird sang in the tree and the sun was warm. " * 30)


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 41), seed=st.integers(0, 2**31 - 1))
def test_two_weights_per_byte_unpack_to_what_was_packed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    packed = pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 1) // 2)
    assert torch.equal(unpack(packed, cols), q)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 45), group=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_int4_stores_the_qat_grid_exactly_for_odd_sizes_and_short_last_groups(rows, cols, group,
                                                                             seed):
    from bitlm_core.model.quant import rounded

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(cols, rows), nn.Linear(rows, 3, bias=False))
    tensors, names = Int4(group).quantize(model)
    assert names[:2] == ["0.weight", "1.weight"]
    assert tensors["0.weight"].dtype == torch.uint8
    assert tensors["0.weight" + SCALE].shape == (rows, -(-cols // group))
    back = Int4().dequantize(tensors, model, "test")
    assert set(back) == set(model.state_dict())
    for name in ("0.weight", "1.weight"):
        assert torch.equal(back[name], rounded(model.state_dict()[name], 4, group))
    assert torch.equal(back["0.bias"], model[0].bias.detach())


def train(folder: Path, steps: int = 20, **train_options) -> Path:
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spec = {"name": "tiny", "data": {"corpus": {"name": "file",
                                                "options": {"path": str(corpus)}},
                                     "seq_len": 16, "val_fraction": 0.1},
            "model": {"d_model": 64, "n_layers": 1, "n_heads": 2},
            "train": {"steps": steps, "batch_size": 8, "eval_every": 10,
                      "checkpoint_every": steps,
                      "lr": 0.01, "threads": 1, **train_options},
            "sample": {"count": 0}, "output": {"report": False}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    execute(load_spec(path), folder / "run", log=lambda m: None)
    return folder / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("qat"),
                 qat={"bits": 4, "group_size": 16, "start_step": 10})


def held_out(run_dir: Path) -> float:
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import load_dataset
    from bitlm_core.engine.evaluation import evaluate

    loaded = load_run(run_dir, log=lambda m: None, device="cpu")
    dataset, _ = load_dataset(loaded.spec, loaded.comps, run_dir)
    with torch.no_grad():
        return evaluate(loaded.model, loaded.comps.objective, dataset, 8)["bits_per_byte"]


def quantized(run: Path, folder: Path, scheme: str) -> Path:
    from bitlm_core.app.quantize import quantize_run

    report = quantize_run(run, folder / scheme, scheme=scheme)
    assert report["scheme"] == scheme and report["bytes_after"] < report["bytes_before"]
    return folder / scheme


def test_an_int4_run_loads_back_exactly_the_weights_it_stored(run, tmp_path):
    from bitlm_core.app.loading import load_run
    from bitlm_core.model.quant import linear_weights, rounded

    q = quantized(run, tmp_path, "int4")
    original = load_run(run, log=lambda m: None).model.state_dict()
    loaded = load_run(q, log=lambda m: None)
    assert loaded.state.get("quantized") == "int4"
    state = loaded.model.state_dict()
    linears = linear_weights(loaded.model)
    assert linears
    for name in linears:
        assert torch.equal(state[name], rounded(original[name], 4, 32))
    again = load_run(q, log=lambda m: None).model.state_dict()  # and the same every time
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_a_qat_run_is_stored_in_4_bits_as_it_computed(qat_run, tmp_path):
    """Its linear layers come back as the very weights they computed with in training; only
    the embedding tables (not trained on a grid) are rounded, to int8, which costs little."""
    from bitlm_core.app.loading import load_run
    from bitlm_core.model.quant import QATLinear, qat_layers, rounded

    trained = load_run(qat_run, log=lambda m: None)
    assert any(isinstance(m, QATLinear) for m in trained.model.modules())
    q = quantized(qat_run, tmp_path, "int4")
    weights = load_file(str(next((q / "checkpoints").glob("step-*")) / "model.safetensors"))
    assert {int(t) for n, t in weights.items() if n.endswith(GROUP)} == {16}  # the run's groups
    stored = load_run(q, log=lambda m: None).model.state_dict()
    state = trained.model.state_dict()
    for layer in qat_layers(trained.model):
        name = f"{layer}.weight"
        assert torch.equal(stored[name], rounded(state[name], 4, 16)), name
    assert held_out(q) == pytest.approx(held_out(qat_run), rel=1e-3)


def test_4_bit_post_training_quantization_changes_predictions_a_little(run, tmp_path):
    fp32 = held_out(run)
    post = held_out(quantized(run, tmp_path / "a", "int4"))
    assert post != fp32  # rounding a float model's weights changes its predictions
    assert abs(post - fp32) / fp32 < 0.1  # (QAT against it: benchmarks/quantization.py)


def test_a_coarser_qat_grid_is_stored_exactly_and_a_finer_one_refused(tmp_path):
    from bitlm_core.app.loading import load_run
    from bitlm_core.model.quant import qat_layers, rounded

    three = train(tmp_path / "three", qat={"bits": 3, "group_size": 8})
    trained = load_run(three, log=lambda m: None).model
    stored = load_run(quantized(three, tmp_path / "a", "int4"), log=lambda m: None).model
    for layer in qat_layers(trained):
        name = f"{layer}.weight"
        assert torch.equal(stored.state_dict()[name],
                           rounded(trained.state_dict()[name], 3, 8)), name
    six = train(tmp_path / "six", steps=4, qat={"bits": 6})
    with pytest.raises(CheckpointError, match="6-bit grid.*int8-rowwise"):
        quantized(six, tmp_path / "b", "int4")
    assert not (tmp_path / "b" / "int4").exists()


def test_quantized_runs_cannot_be_trained_further(run, tmp_path):
    from bitlm_core.app.run import execute
    from bitlm_core.store.rundir import read_run_spec

    for scheme in ("int4", "int8-dynamic"):
        q = quantized(run, tmp_path, scheme)
        with pytest.raises(CheckpointError, match="quantized by `bitlm quantize`"):
            execute(read_run_spec(q), q, log=lambda m: None)


def tamper(q: Path, change) -> None:
    ckpt = next((q / "checkpoints").glob("step-*"))
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    change(tensors)
    (ckpt / "checksums.json").unlink(missing_ok=True)  # crafted to pass the checksums
    save_file(tensors, str(path), metadata=meta)


def first_matrix(tensors) -> str:
    return next(n for n, t in tensors.items() if t.dtype == torch.uint8)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__(first_matrix(t), t[first_matrix(t)][:, :-1].contiguous()),
     "packed tensor .* has shape"),
    (lambda t: t.pop(first_matrix(t) + SCALE), "has no scales"),
    (lambda t: t.pop(first_matrix(t) + GROUP), "has no group size"),
    (lambda t: t.__setitem__(first_matrix(t) + SCALE, t[first_matrix(t) + SCALE].half()),
     "float16, not float32"),
    (lambda t: t.__setitem__(first_matrix(t) + SCALE, t[first_matrix(t) + SCALE][:, :1]
                             .contiguous()), "scales tensor .* has shape"),
    (lambda t: t.__setitem__(first_matrix(t) + GROUP, torch.tensor([7.0])), "one int32"),
    (lambda t: t.__setitem__(first_matrix(t) + GROUP, torch.tensor([2**31 - 1], dtype=torch.int32)),
     "one int32 from 1 to 4096"),
    (lambda t: t.__setitem__("ln_f.bias" + SCALE, torch.ones(1)), "no 4-bit matrix beside it"),
    (lambda t: t.__setitem__(first_matrix(t) + SCALE, torch.full_like(
        t[first_matrix(t) + SCALE], float("nan"))), "not all finite"),
    (lambda t: t.__setitem__("stray" + SCALE, torch.ones(2)), "no 4-bit matrix beside it"),
    (lambda t: t.__setitem__("ln_f.weight", torch.zeros(2, 2, dtype=torch.uint8)),
     "no weight matrix of the model"),
])
def test_a_tampered_int4_file_is_one_clear_message(run, tmp_path, change, message):
    from bitlm_core.app.loading import load_run

    q = quantized(run, tmp_path, "int4")
    tamper(q, change)
    with pytest.raises(CheckpointError, match=message):
        load_run(q, log=lambda m: None)


def test_int8_dynamic_runs_integer_layers_close_to_the_float_model(run, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from bitlm_core.app.generate import generate
    from bitlm_core.app.loading import load_run

    q = quantized(run, tmp_path, "int8-dynamic")
    loaded = load_run(q, log=lambda m: None, device="cpu")
    assert any(isinstance(m, DynamicLinear) for m in loaded.model.modules())
    stored = load_file(str(next((q / "checkpoints").glob("step-*")) / "model.safetensors"))
    layers = dict(loaded.model.named_modules())
    checked = 0
    for name, t in stored.items():  # each integer layer computes with the file's int8 weights
        layer = layers.get(name.removesuffix(".weight"))
        if t.dtype == torch.int8 and isinstance(layer, DynamicLinear):
            assert torch.equal(layer.weight().int_repr(), t), name
            checked += 1
    assert checked
    assert not any(type(m) is nn.Linear for m in loaded.model.modules())
    assert abs(held_out(q) / held_out(run) - 1) < 0.01
    result = generate(loaded.model, loaded.comps.encoder, loaded.comps.sampler, "the ", 12)
    assert result.text.startswith("the ") and len(result.bits) == 16 * 9


def test_int8_dynamic_elsewhere_than_the_cpu_runs_as_float_and_says_so(run, tmp_path):
    from bitlm_core.app.loading import load_run
    from bitlm_quantization.dynamic import Int8Dynamic

    q = quantized(run, tmp_path, "int8-dynamic")
    model = load_run(q, log=lambda m: None, device="cpu", prepare=False).model
    with pytest.warns(RuntimeWarning, match="on meta the model runs with its weights as float"):
        same = Int8Dynamic().prepare(model, "meta")
    assert same is model and any(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("scheme", ["int4", "int8-dynamic"])
def test_quantized_runs_load_on_any_device(run, tmp_path, monkeypatch, scheme):
    """Weights are read on the CPU and the model moved where it runs: emulated here with the
    meta device standing for a GPU (the device a run names is checked before, by placement)."""
    import bitlm_core.app.loading as loading

    q = quantized(run, tmp_path, scheme)
    monkeypatch.setattr(loading, "placement", lambda spec, device, key: torch.device("meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # int8-dynamic: float off the CPU
        loaded = loading.load_run(q, log=lambda m: None)
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    assert any(type(m) is nn.Linear for m in loaded.model.modules())


def test_the_model_compressor_codes_with_int8_dynamic_and_refuses_to_adapt_it(run, tmp_path):
    pytest.importorskip("bitlm_compress")
    from bitlm_compress.files import compress_file, decompress_file
    from bitlm_core.app.coding import Adapt
    from bitlm_core.errors import DataError

    q = quantized(run, tmp_path, "int8-dynamic")
    src, packed, back = tmp_path / "in.txt", tmp_path / "in.bitlm", tmp_path / "out.txt"
    src.write_bytes(TEXT[:300].encode())
    report = compress_file(q, src, packed, 64)
    baseline = compress_file(run, src, tmp_path / "fp32.bitlm", 64)  # its float original
    # about the float model's size (a 20-step model; the header names each its own run)
    assert abs(report["stream_bytes"] / baseline["stream_bytes"] - 1) < 0.1
    decompress_file(packed, back)
    assert back.read_bytes() == src.read_bytes()
    with pytest.raises(DataError, match="int8-dynamic layers, which have no gradients"):
        compress_file(q, src, tmp_path / "adapt.bitlm", 64, Adapt(every=16, lr=1e-3))
    assert not (tmp_path / "adapt.bitlm").exists()


def test_the_quantize_command_takes_a_scheme(run, tmp_path):
    from typer.testing import CliRunner

    from bitlm_core.cli.root import app

    result = CliRunner().invoke(app, ["quantize", str(run), "--out", str(tmp_path / "q"),
                                      "--scheme", "int4", "--json"])
    assert result.exit_code == 0, result.output
    assert '"scheme": "int4"' in result.output
    result = CliRunner().invoke(app, ["quantize", str(run), "--out", str(tmp_path / "r"),
                                      "--scheme", "int2"])
    assert result.exit_code == 2
    assert "int2" in result.output and "int8-dynamic" in result.output
