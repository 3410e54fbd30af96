"""``bitlm eval``: bits per byte of a run's model on any text, however long."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from bitlm_core.app.loading import LoadedRun
from bitlm_core.errors import DataError


MAX_PIPED_BYTES = 256 << 20  # what is read from a pipe or device (files are memory-mapped)
MAX_CODED_BYTES = 1 << 30  # what --coded counts (the most `bitlm compress` takes)


class TextFile:
    """A file's bytes, read a slice at a time (``os.pread``) when sliced: a text of any size
    is scored in memory that does not grow with it."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.size)
        parts, at = [], start
        while at < stop:
            part = os.pread(self.fd, stop - at, at)
            if not part:  # the file shrank under us
                break
            parts.append(part)
            at += len(part)
        return b"".join(parts)

    def __del__(self) -> None:
        os.close(self.fd)


def read_text_file(path: Path):
    """A text file as a :class:`TextFile` (read as needed, never all held at once), or for a
    pipe or device (``/dev/stdin``, a shell's ``<(...)``) its bytes, up to
    :data:`MAX_PIPED_BYTES`."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a text file")
    if not path.exists():
        raise DataError(f"text file not found: {path}")
    try:
        if path.is_file():
            return TextFile(path)
        with open(path, "rb") as f:
            data = f.read(MAX_PIPED_BYTES + 1)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PIPED_BYTES:
        raise DataError(f"{path} streams more than {MAX_PIPED_BYTES:,} bytes; save it to a file "
                        "(files of any size are read as needed)")
    return data


def evaluate_bytes(run: LoadedRun, data, source: str, batch_size: int = 16,
                   stride: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Bits per byte of ``run``'s model on any text, however long: ``data`` is bytes or a
    :class:`TextFile` (:func:`read_text_file`), read and encoded a batch of windows at a time,
    so memory does not grow with the text.

    A causal model scores the text with a sliding window of its context (``data.seq_len``
    bytes, or what ``scaling`` grew it to) moved by ``stride`` bytes (default half the
    context): every byte is scored once, with at least ``context - stride`` bytes before it,
    so the figure does not depend on where windows happen to start. A bound (diffusion)
    objective scores non-overlapping windows.
    """
    import torch

    from bitlm_core.engine.dataset import check_text
    from bitlm_core.engine.evaluation import HaltingDepth, score_batches, score_windows

    check_text(data, source, run.spec.data.require_utf8)
    enc, objective = run.comps.encoder, run.comps.objective
    Fb, W = enc.frame_bits, run.model.cfg.max_frames  # data.seq_len, or more if it grew
    depth = HaltingDepth(run.model)
    n = len(data)

    def read(begin: int, count: int):
        return torch.from_numpy(enc.encode_np(bytes(data[begin: begin + count])))

    is_bound = bool(objective.is_bound)
    if objective.causal and not is_bound:
        stride = max(1, W // 2) if stride is None else stride
        if not 1 <= stride <= W:
            raise DataError(f"--stride must be between 1 and the model's context ({W} bytes), "
                            f"got {stride}")
        bpb, n_bytes = score_windows(run.model, read, n, Fb, W, stride, batch_size, progress,
                                     depth)
        return {"bits_per_byte": bpb, "bytes": n_bytes, "is_bound": False,
                "window": W, "stride": stride, **depth.figures()}
    if stride is not None:
        raise DataError(f"--stride applies to causal models; this run's objective "
                        f"'{run.spec.objective.name}' is scored in non-overlapping windows of "
                        f"{W} bytes (its figure is a bound); leave --stride out")
    starts = list(range(0, n, W))  # the last window may be shorter

    def batches():
        for i in range(0, len(starts), batch_size):
            group = starts[i: i + batch_size]
            if progress is not None:
                progress(min(i + batch_size, len(starts)), len(starts))
            full = [b for b in group if b + W <= n]
            if full:
                yield torch.stack([read(b, W) for b in full])
            if len(full) < len(group):
                yield read(group[-1], n - group[-1]).view(1, -1)

    bpb, n_bytes = score_batches(run.model, objective, batches(), Fb, depth)
    return {"bits_per_byte": bpb, "bytes": n_bytes, "is_bound": is_bound,
            "window": W, "stride": W, **depth.figures()}


def coded_size(run: LoadedRun, data, segment: int, adapt=None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """What ``bitlm compress`` (the ``bitlm-compress`` plugin) would write for ``data``: the
    ideal code length of its quantised probabilities (:mod:`bitlm_core.app.coding`), as 32-bit
    words plus the range coder's final word, and the stream's header. The run's model is not
    changed (adaptation trains a copy)."""
    import copy
    import hashlib
    from pathlib import Path

    from bitlm_core.app.coding import (CODER, FrameTable, code_length, environment,
                                       fingerprint)
    from bitlm_core.store.stream import StreamHeader

    if not getattr(run.comps.objective, "causal", False):
        raise DataError(f"--coded needs a causal model; this run's objective "
                        f"'{run.spec.objective.name}' does not predict the next bit")
    if len(data) > MAX_CODED_BYTES:
        raise DataError(f"--coded counts texts of up to {MAX_CODED_BYTES:,} bytes (what "
                        f"`bitlm compress` takes); this one has {len(data):,}")
    raw = bytes(data[0:len(data)])
    model = copy.deepcopy(run.model) if adapt is not None else run.model
    table = FrameTable(run.comps.encoder, run.model.frame_bits)
    header = StreamHeader(length=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                          model=fingerprint(run.model), segment=segment,
                          run=str(Path(run.run_dir).resolve()), step=run.step,
                          adapt=adapt.to_dict() if adapt else None,
                          environment=environment(), coder=CODER,
                          words=len(raw) // 4, payload="0" * 64).to_bytes()
    bits = code_length(model, table, raw, segment, adapt, progress)
    payload = 4 * (-(-int(bits) // 32) + 1) if raw else 4
    total = len(header) + payload
    return {"code_bits_per_byte": bits / len(raw) if raw else None,
            "stream_bytes": total, "header_bytes": len(header),
            "stream_bits_per_byte": 8 * total / len(raw) if raw else None,
            "segment": segment, "adapt": adapt.to_dict() if adapt else None}
