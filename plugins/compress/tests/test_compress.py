"""bitlm compress / decompress: exact round trips, sizes against `bitlm eval --coded`, and one
clear message (exit status 2, no output file) for every stream that cannot be restored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bitlm_compress.coder import RangeBitDecoder, RangeBitEncoder
from bitlm_compress.files import compress_file, decompress_file
from bitlm_core.app.coding import ONE, Adapt
from bitlm_core.cli.root import app

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
        + "a bird sang in the tree and the sun was warm. " * 40)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(folder: Path, local: str = "joint", seed: int = 0) -> Path:
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spec = {"name": "tiny", "data": {"corpus": {"name": "file",
                                                "options": {"path": str(corpus)}},
                                     "seq_len": 16, "val_fraction": 0.1},
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "local": local},
            "train": {"steps": 30, "batch_size": 8, "eval_every": 30, "checkpoint_every": 30,
                      "lr": 0.01, "seed": seed},
            "sample": {"count": 0}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    execute(load_spec(path), folder / "run", log=lambda m: None)
    return folder / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("joint"))


@pytest.fixture(scope="module")
def other_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("other"), seed=1)


def round_trip(run: Path, data: bytes, folder: Path, segment: int = 64, adapt=None) -> int:
    src, packed, back = folder / "in.bin", folder / "in.bitlm", folder / "out.bin"
    src.write_bytes(data)
    compress_file(run, src, packed, segment, adapt, force=True)
    decompress_file(packed, back, force=True)
    assert back.read_bytes() == data
    return packed.stat().st_size


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), segment=st.integers(1, 200), adapt=st.booleans())
def test_any_bytes_round_trip_exactly(run, tmp_path, data, segment, adapt):
    round_trip(run, data, tmp_path, segment, Adapt(every=16, lr=1e-3) if adapt else None)


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 3, b"\xff\xfe\x00\x80" * 50,
                                  b"a" * 30_000, TEXT.encode()[-3000:]],
                         ids=["empty", "one byte", "every byte", "not utf-8", "30 KB of a",
                              "text"])
def test_the_cases_that_must_round_trip(run, tmp_path, data):
    round_trip(run, data, tmp_path, segment=4096)


def test_adaptation_learns_a_file_unlike_the_training_text(run, tmp_path):
    """A run of one byte the model never saw: static coding pays bits for every byte;
    adapting, the model learns the file as it goes."""
    data = b"a" * 6000
    static = round_trip(run, data, tmp_path, segment=3000)
    adapted = round_trip(run, data, tmp_path, segment=3000, adapt=Adapt(every=64, lr=1e-2))
    assert adapted < static / 4


def test_a_stream_is_the_size_eval_predicts(run, tmp_path):
    text = (TEXT * 3).encode()
    src = tmp_path / "t.txt"
    src.write_bytes(text)
    report = compress_file(run, src, tmp_path / "t.bitlm", 1000)
    result = CliRunner().invoke(app, ["eval", str(run), "--text", str(src), "--coded",
                                      "--segment", "1000", "--json"])
    assert result.exit_code == 0, result.output
    coded = json.loads(result.output)["coded"]
    header = coded["header_bytes"]
    assert abs(report["stream_bytes"] - coded["stream_bytes"]) <= 0.01 * (
        coded["stream_bytes"] - header) + 8
    assert coded["code_bits_per_byte"] < 8


def test_adaptation_round_trips_and_eval_counts_it(run, tmp_path):
    text = (TEXT[:2000]).encode()
    size = round_trip(run, text, tmp_path, segment=500, adapt=Adapt(every=32, lr=1e-3))
    src = tmp_path / "in.bin"
    result = CliRunner().invoke(app, ["eval", str(run), "--text", str(src), "--adapt",
                                      "--adapt-every", "32", "--adapt-lr", "1e-3",
                                      "--segment", "500", "--json"])
    assert result.exit_code == 0, result.output
    coded = json.loads(result.output)["coded"]
    assert abs(size - coded["stream_bytes"]) <= 0.01 * size + 8


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_streams_that_cannot_be_restored_fail_with_one_message_and_no_output(run, other_run,
                                                                           tmp_path):
    src, packed, out = tmp_path / "in.txt", tmp_path / "in.bitlm", tmp_path / "out.txt"
    src.write_bytes(TEXT.encode()[:1500])
    result = cli("compress", str(run), str(src), str(packed), "--segment", "300")
    assert result.exit_code == 0, result.output
    blob = packed.read_bytes()

    result = cli("decompress", str(packed), str(out), "--run", str(other_run))
    assert result.exit_code == 2 and "compressed by another model" in result.output
    assert not out.exists()

    cases = {"truncated": blob[:len(blob) - 8], "cut mid-word": blob[:-3],
             "flipped payload": flip(blob, len(blob) - 20),
             "flipped checksum": flip(blob, blob.index(b'"sha256":"') + 20),
             "not a stream": b"hello", "empty": b""}
    for name, damaged in cases.items():
        bad = tmp_path / f"{name}.bitlm"
        bad.write_bytes(damaged)
        result = cli("decompress", str(bad), str(out))
        assert result.exit_code == 2, (name, result.output)
        assert "Traceback" not in result.output and str(bad.name) in result.output, name
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt")], name


def test_too_many_segments_are_refused_before_anything_is_allocated(run, tmp_path,
                                                                    monkeypatch):
    import bitlm_core.app.coding as coding

    src = tmp_path / "a.txt"
    src.write_bytes(b"abc" * 100)
    monkeypatch.setattr(coding, "MAX_DECODER_BYTES", 1 << 20)
    result = cli("compress", str(run), str(src), str(tmp_path / "a.bitlm"), "--segment", "1")
    assert result.exit_code == 2 and "longer --segment" in result.output
    assert not (tmp_path / "a.bitlm").exists()


def test_a_header_that_asks_for_too_many_segments_is_refused(run, tmp_path):
    import dataclasses

    from bitlm_core.store.stream import read_header

    src, packed = tmp_path / "a.txt", tmp_path / "a.bitlm"
    src.write_bytes(b"abc" * 100)
    assert cli("compress", str(run), str(src), str(packed)).exit_code == 0
    blob = packed.read_bytes()
    header, start = read_header(blob)
    hostile = dataclasses.replace(header, length=3_000_000, segment=1)
    packed.write_bytes(hostile.to_bytes() + blob[start:])
    result = cli("decompress", str(packed), str(tmp_path / "out"))
    assert result.exit_code == 2 and "longer --segment" in result.output
    assert not (tmp_path / "out").exists()


def test_files_are_never_overwritten_unless_asked(run, tmp_path):
    src, dst = tmp_path / "a.txt", tmp_path / "mine.txt"
    src.write_bytes(b"hello there")
    dst.write_bytes(b"precious")
    result = cli("compress", str(run), str(src), str(dst))
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert dst.read_bytes() == b"precious"
    result = cli("compress", str(run), str(src), str(src), "--force")
    assert result.exit_code == 2 and "also the input" in result.output
    assert src.read_bytes() == b"hello there"
    result = cli("compress", str(run), str(tmp_path / "missing"), str(tmp_path / "x"))
    assert result.exit_code == 2 and "not found" in result.output


def test_a_stream_names_its_run_and_claims_no_more_than_allowed(run, tmp_path):
    src, packed = tmp_path / "a.txt", tmp_path / "a.bitlm"
    src.write_bytes(b"x" * 2000)
    assert cli("compress", str(run), str(src), str(packed)).exit_code == 0
    result = cli("decompress", str(packed), str(tmp_path / "b"), "--max-bytes", "100")
    assert result.exit_code == 2 and "more than --max-bytes 100" in result.output
    assert not (tmp_path / "b").exists()
    moved = tmp_path / "moved"
    os.rename(run, moved)
    try:
        result = cli("decompress", str(packed), str(tmp_path / "b"))
        assert result.exit_code == 2 and "pass --run" in result.output
        result = cli("decompress", str(packed), str(tmp_path / "b"), "--run", str(moved))
        assert result.exit_code == 0, result.output
    finally:
        os.rename(moved, run)
    assert (tmp_path / "b").read_bytes() == b"x" * 2000


def test_a_diffusion_run_is_refused_with_a_reason(tmp_path):
    from bitlm_core.registry import get_registry

    if get_registry().get("objective", "diffusion") is None:
        pytest.skip("needs objective:diffusion: pip install plugins/diffusion")
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    execute(load_spec(None, [f"data.corpus.options.path={corpus}", "data.corpus.name=file",
                             "objective.name=diffusion", "train.steps=2", "model.n_layers=1",
                             "model.d_model=16", "model.n_heads=2", "data.seq_len=16",
                             "sample.count=0", "train.eval_every=2"]),
            tmp_path / "d", log=lambda m: None)
    result = cli("compress", str(tmp_path / "d"), str(corpus), str(tmp_path / "c.bitlm"))
    assert result.exit_code == 2 and "does not predict the next bit" in result.output


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, ONE - 1), st.integers(0, 1)), max_size=50),
       st.lists(st.integers(0, 255), max_size=20))
def test_the_range_coder_reads_back_what_it_wrote(bits, symbols):
    q = np.array([b[0] for b in bits], dtype=np.int64)
    x = np.array([b[1] for b in bits], dtype=np.uint8)
    rng = np.random.default_rng(len(symbols))
    w = rng.integers(1, 1000, (len(symbols), 256))
    s = np.array(symbols, dtype=np.uint8)
    enc = RangeBitEncoder()
    enc(q, x)
    enc.frames(w, s)
    dec = RangeBitDecoder(enc.words())
    assert np.array_equal(dec(q, None), x) and np.array_equal(dec.frames(w, None), s)
