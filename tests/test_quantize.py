"""Weight quantization: the int8 row scheme's error bound, damaged files, quantized run folders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.errors import CheckpointError
from bitlm_core.app.quantize import quantize_run
from bitlm_core.store.quantized import MIN_ELEMENTS, SCALE_SUFFIX, dequantize_state, quantize_state


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(26, 80), log_scale=st.floats(-6, 3),
       zero_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_every_weight_comes_back_within_half_a_step(rows, cols, log_scale, zero_row, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10.0 ** log_scale
    if zero_row:
        w[0] = 0.0
    tensors, names = quantize_state({"m": w})
    if w.numel() < MIN_ELEMENTS:
        assert names == [] and torch.equal(tensors["m"], w)
        return
    assert names == ["m"] and tensors["m"].dtype == torch.int8
    scale = tensors["m" + SCALE_SUFFIX]
    back = dequantize_state(tensors, "test")["m"]
    assert back.shape == w.shape
    bound = scale[:, None] / 2 * (1 + 1e-5)
    assert ((back - w).abs() <= bound).all()
    if zero_row:
        assert not back[0].any()


def test_vectors_and_small_matrices_stay_float():
    weights = {"bias": torch.randn(4096), "small": torch.randn(8, 8),
               "big": torch.randn(64, 32), "ids": torch.arange(2000)}
    tensors, names = quantize_state(weights)
    assert names == ["big"]
    for name in ("bias", "small", "ids"):
        assert torch.equal(tensors[name], weights[name])
    with pytest.raises(CheckpointError, match="already looks quantized"):
        quantize_state(tensors)


def test_damaged_quantized_tensors_are_named():
    tensors, _ = quantize_state({"big": torch.randn(64, 32)})
    with pytest.raises(CheckpointError, match="no matching row scales"):
        dequantize_state({"big": tensors["big"]}, "f")
    with pytest.raises(CheckpointError, match="no matching row scales"):
        dequantize_state({"big": tensors["big"], "big.qscale": torch.ones(3)}, "f")
    with pytest.raises(CheckpointError, match="no int8 matrix"):
        dequantize_state({"other.qscale": torch.ones(3)}, "f")
    with pytest.raises(CheckpointError, match="no int8 matrix"):  # beside a float tensor
        dequantize_state({"bias": torch.ones(3), "bias.qscale": torch.ones(3)}, "f")
    for bad in (torch.full((64,), float("nan")), torch.ones(64, dtype=torch.float64)):
        with pytest.raises(CheckpointError, match="not finite float32"):
            dequantize_state({"big": tensors["big"], "big.qscale": bad}, "f")


@pytest.fixture
def trained_run(tmp_path, tiny_spec):
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    spec = load_spec(tiny_spec(steps=6, model={"d_model": 64}))
    execute(spec, tmp_path / "run", log=lambda m: None)
    return spec, tmp_path / "run"


def test_a_quantized_run_scores_like_the_original_and_refuses_training(tmp_path, trained_run,
                                                                      tiny_corpus):
    from bitlm_core.app.evaluate import evaluate_bytes
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute

    spec, run_dir = trained_run
    report = quantize_run(run_dir, tmp_path / "q")
    assert report["quantized_tensors"] > 0 and report["bytes_after"] < report["bytes_before"] / 2
    text = tiny_corpus.read_bytes()
    original = evaluate_bytes(load_run(run_dir), text, "t")["bits_per_byte"]
    quantized_run = load_run(tmp_path / "q")
    assert quantized_run.step == 6
    quantized = evaluate_bytes(quantized_run, text, "t")["bits_per_byte"]
    assert abs(quantized - original) < 0.01
    with pytest.raises(CheckpointError, match="quantized by `bitlm quantize`.*original run"):
        execute(spec, tmp_path / "q", log=lambda m: None)


def test_quantize_refuses_to_overwrite_without_force(tmp_path, trained_run):
    _, run_dir = trained_run
    with pytest.raises(CheckpointError, match="own"):
        quantize_run(run_dir, run_dir)
    quantize_run(run_dir, tmp_path / "q")
    with pytest.raises(CheckpointError, match="--force"):
        quantize_run(run_dir, tmp_path / "q")
    assert quantize_run(run_dir, tmp_path / "q", force=True)["step"] == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_run(run_dir, tmp_path / "other", force=True)  # not a run folder: never removed
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    import shutil

    shutil.copytree(run_dir, tmp_path / "another")
    with pytest.raises(CheckpointError, match="only replaces a folder written by bitlm quantize"):
        quantize_run(run_dir, tmp_path / "another", force=True)  # a training run: never replaced
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_run(tmp_path / "q", tmp_path / "qq")
    with pytest.raises(CheckpointError, match="inside it nor around it"):
        quantize_run(run_dir, run_dir.parent, force=True)  # would delete the source
    assert (run_dir / "spec.yaml").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        quantize_run(run_dir, tmp_path / "file")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left behind


def test_integer_weights_without_a_scheme_are_refused(tmp_path, trained_run):
    from safetensors.torch import load_file, save_file

    from bitlm_core.store.checkpoint import latest_checkpoint
    from bitlm_core.app.loading import load_run

    _, run_dir = trained_run
    quantize_run(run_dir, tmp_path / "q")
    path = latest_checkpoint(tmp_path / "q") / "model.safetensors"
    save_file(load_file(str(path)), str(path))  # the same tensors, the header's scheme gone
    (path.parent / "checksums.json").unlink()  # crafted to pass for a checkpoint of 0.1
    with pytest.raises(CheckpointError, match="integer weight tensors"):
        load_run(tmp_path / "q")
