import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.builtins.corpora import FileCorpus, QuickstartCorpus
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.engine.dataset import prepare_dataset
from bitlm_core.errors import DataError


def test_quickstart_corpus_is_english_text():
    data = QuickstartCorpus().read()
    assert len(data) > 500_000 and data.decode("utf-8").count(" the ") > 1000


def test_file_corpus_reads_gzip_and_limits(tmp_path):
    path = tmp_path / "c.txt.gz"
    path.write_bytes(gzip.compress(b"hello world " * 10))
    assert FileCorpus(str(path), max_bytes=5).read() == b"hello"


def test_missing_file_corpus(tmp_path):
    with pytest.raises(DataError, match="corpus file not found"):
        FileCorpus(str(tmp_path / "nope.txt")).read()


def test_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        prepare_dataset(b"", Parity9Encoder(), 8, 0.1, tmp_path)


def test_corpus_shorter_than_a_window(tmp_path):
    with pytest.raises(DataError, match=r"too short.*data\.seq_len=64"):
        prepare_dataset(b"short text, far below two windows", Parity9Encoder(), 64, 0.1,
                        tmp_path)


def test_non_utf8_corpus_is_refused_with_the_offset(tmp_path):
    with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 6.*require_utf8"):
        prepare_dataset(b"hello \xff\xfe world" * 10, Parity9Encoder(), 8, 0.1, tmp_path)
    ds = prepare_dataset(b"hello \xff\xfe world" * 10, Parity9Encoder(), 8, 0.1, tmp_path,
                         require_utf8=False)
    assert ds.train.n_frames > 0


def test_windows_are_frame_aligned_and_match_the_text(tmp_path):
    text = bytes(range(32, 127)) * 20
    ds = prepare_dataset(text, Parity9Encoder(), 16, 0.1, tmp_path)
    batch = ds.train_batch(np.random.default_rng(0), 8)
    assert batch.shape == (8, 16 * 9)
    enc = Parity9Encoder()
    for row in batch:
        assert enc.decode(row) in text  # decodes (parity valid) to a substring
    val = next(ds.val_batches(4))
    n_val = len(text) - int(len(text) * 0.9)
    assert enc.decode(val[0]) == text[-n_val:][:16]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=64), chunk=st.integers(1, 9))
def test_utf8_is_checked_in_chunks_exactly_as_python_decodes(data, chunk):
    import re

    from bitlm_core.engine import dataset
    from bitlm_core.errors import DataError

    saved = dataset.UTF8_CHUNK
    dataset.UTF8_CHUNK = chunk
    try:
        try:
            data.decode("utf-8")
            expected = None
        except UnicodeDecodeError as exc:
            expected = exc.start
        if not data:
            return
        try:
            dataset.check_text(data, "t")
            got = None
        except DataError as exc:
            got = int(re.search(r"byte (\d+)", str(exc)).group(1))
        assert got == expected
    finally:
        dataset.UTF8_CHUNK = saved
