"""Corpus -> encoded bits, stored packed (8 bits per byte) and memory-mapped, cut into windows.

Windows always start on a byte-frame boundary: measured, a one-position-per-bit model trained
on windows at random bit offsets learns nothing in minutes (FACTS.md: 8.9 bits per byte), while
frame-aligned windows learn. The held-out split is the tail ``val_fraction`` of the corpus.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitlm_core.errors import DataError


UTF8_CHUNK = 1 << 22  # bytes decoded at a time when checking UTF-8: memory stays flat


def check_text(data, source: str, require_utf8: bool = True) -> None:
    """``data`` (bytes, or anything sliced into bytes: a file read as needed) is not empty and,
    unless told otherwise, valid UTF-8, or a DataError naming the first bad byte. Checked a few
    MB at a time, so a file of any size can be checked in bounded memory."""
    import codecs

    if not len(data):
        raise DataError(f"{source} is empty: give a corpus with some text in it")
    if not require_utf8:
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    for begin in range(0, len(data), UTF8_CHUNK):
        chunk = bytes(data[begin: begin + UTF8_CHUNK])
        try:
            decoder.decode(chunk, final=begin + UTF8_CHUNK >= len(data))
        except UnicodeDecodeError as exc:
            at = max(0, begin + exc.start - len(decoder.getstate()[0]))
            raise DataError(
                f"{source} is not valid UTF-8 (byte {at}: {bytes(data[at:at + 4])!r}); convert "
                "it to UTF-8, or set data.require_utf8: false to model raw bytes") from None


class BitStore:
    """A packed, memory-mapped bit array on disk (``.bits`` + ``.json`` with the bit count)."""

    def __init__(self, path: Path):
        meta = json.loads(path.with_suffix(".json").read_text())
        self.n_bits = int(meta["n_bits"])
        self.frame_bits = int(meta["frame_bits"])
        self.packed = np.memmap(path, dtype=np.uint8, mode="r") if self.n_bits else \
            np.zeros(0, np.uint8)

    @staticmethod
    def write(path: Path, bits: np.ndarray, frame_bits: int) -> "BitStore":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".bits.tmp")
        np.packbits(bits).tofile(tmp)
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps({"n_bits": int(bits.size),
                                                         "frame_bits": frame_bits}))
        return BitStore(path)

    @property
    def n_frames(self) -> int:
        return self.n_bits // self.frame_bits

    def window(self, start_bit: int, n_bits: int) -> np.ndarray:
        lo, off = divmod(start_bit, 8)
        hi = (start_bit + n_bits + 7) // 8 + 1
        return np.unpackbits(self.packed[lo:hi])[off:off + n_bits]


@dataclass
class BitDataset:
    train: BitStore
    val: BitStore
    seq_frames: int

    @property
    def frame_bits(self) -> int:
        return self.train.frame_bits

    @property
    def window_bits(self) -> int:
        return self.seq_frames * self.frame_bits

    def train_batch(self, rng: np.random.Generator, batch_size: int,
                    shard: tuple[int, int] = (0, 1)):
        """(B, window_bits) uint8 tensor of windows starting at random frame boundaries.

        ``shard`` = (rank, processes): the batch is the rank's rows of a batch of ``B x
        processes`` windows drawn for all, so that the processes of a job together train on
        what one process with ``B x processes`` windows would (only the rank's own windows
        are read)."""
        import torch

        rank, size = shard
        starts = rng.integers(0, self.train.n_frames - self.seq_frames + 1,
                              size=batch_size * size)[rank * batch_size:(rank + 1) * batch_size]
        rows = [self.train.window(int(s) * self.frame_bits, self.window_bits) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def val_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        """How many batches :meth:`val_batches` gives."""
        n = -(-(self.val.n_frames // self.seq_frames) // batch_size)
        return n if max_batches is None else min(n, max_batches)

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        """Non-overlapping held-out windows, in order, as (B, window_bits) tensors."""
        import torch

        n = self.val.n_frames // self.seq_frames
        starts = list(range(0, n * self.seq_frames, self.seq_frames))
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            rows = [self.val.window(s * self.frame_bits, self.window_bits)
                    for s in starts[i:i + batch_size]]
            yield torch.from_numpy(np.stack(rows))


def open_dataset(store_dir: Path, seq_frames: int) -> BitDataset:
    """The dataset :func:`prepare_dataset` stored in ``store_dir`` (the other processes of a
    job read what rank 0 wrote)."""
    return BitDataset(BitStore(store_dir / "train.bits"), BitStore(store_dir / "val.bits"),
                      seq_frames)


def prepare_dataset(data: bytes, encoder, seq_frames: int, val_fraction: float,
                    store_dir: Path, source: str = "corpus",
                    require_utf8: bool = True) -> BitDataset:
    """Check and split the corpus, encode both parts, store them packed, return windows."""
    check_text(data, source, require_utf8)
    n_val = max(1, int(len(data) * val_fraction))
    train_bytes, val_bytes = data[:-n_val], data[-n_val:]
    for part, size in (("training", len(train_bytes)), ("held-out", len(val_bytes))):
        if size < seq_frames:
            raise DataError(
                f"{source} is too short: its {part} split has {size} bytes, fewer than one "
                f"window of data.seq_len={seq_frames} bytes (corpus: {len(data)} bytes, "
                f"val_fraction={val_fraction}); use a longer corpus or a smaller data.seq_len"
            )
    fb = encoder.frame_bits
    train = BitStore.write(store_dir / "train.bits", encoder.encode_np(train_bytes), fb)
    val = BitStore.write(store_dir / "val.bits", encoder.encode_np(val_bytes), fb)
    return BitDataset(train, val, seq_frames)
