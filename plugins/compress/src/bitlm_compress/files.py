"""Compressing and decompressing files: read, check, code, verify, write whole or not at all.

A stream (:mod:`bitlm_core.store.stream`) names the model that wrote it by a fingerprint of
its weights, so decompressing with another model (another run, or the same run trained on
since) is refused before anything is decoded; the original's SHA-256 is checked after
decoding, and the output file appears only once it matched. Inputs are bounded: the file to
compress by ``MAX_INPUT``, a stream's claimed length by the caller's ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from bitlm_core.app.coding import (CODER, PRECISION, Adapt, FrameTable, code_segments,
                                   environment, fingerprint, segment_lengths)
from bitlm_core.errors import CodecError, DataError
from bitlm_core.store.atomic import atomic_write_bytes
from bitlm_core.store.stream import StreamHeader, read_header

MAX_INPUT = 1 << 30  # bytes a file to compress may have
MAX_STREAM = 2 << 30  # bytes a stream may have
Progress = Optional[Callable[[int, int], None]]


def read_input(path: Path, limit: int, what: str) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise DataError(f"{path} has more than {limit:,} bytes, the most a {what} may have")
    return data


def check_output(src: Path, dst: Path, force: bool) -> None:
    if Path(dst).exists() and Path(dst).resolve() == Path(src).resolve():
        raise DataError(f"{dst} is also the input; write the output to another file")
    if Path(dst).is_dir():
        raise DataError(f"{dst} is a folder; give the output file's name")
    if Path(dst).exists() and not force:
        raise DataError(f"{dst} already exists; pass --force to replace it")
    if not Path(dst).parent.is_dir():
        raise DataError(f"the folder of {dst} does not exist")
    if not os.access(Path(dst).parent, os.W_OK):
        raise DataError(f"cannot write into the folder of {dst}")


def write_output(dst: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(Path(dst), data)
    except OSError as exc:
        raise DataError(f"cannot write {dst}: {exc.strerror or exc}; nothing was written") \
            from None


def _model_of(loaded) -> tuple[Any, FrameTable]:
    if not getattr(loaded.comps.objective, "causal", False):
        raise DataError(f"{loaded.run_dir} was trained with the objective "
                        f"{loaded.spec.objective.name!r}, which does not predict the next bit; "
                        "compress with a run of a causal objective")
    return loaded.model, FrameTable(loaded.comps.encoder, loaded.model.frame_bits)


def compress_file(run_dir: Path, src: Path, dst: Path, segment: int,
                  adapt: Optional[Adapt] = None, force: bool = False,
                  progress: Progress = None) -> dict[str, Any]:
    """Compress ``src`` into the stream ``dst`` with the model of ``run_dir``."""
    from bitlm_compress.coder import RangeBitEncoder
    from bitlm_core.app.loading import load_run

    check_output(src, dst, force)
    data = read_input(src, MAX_INPUT, "file to compress")
    loaded = load_run(run_dir, log=lambda m: None, device="cpu")
    model, table = _model_of(loaded)
    weights = fingerprint(model)  # before adaptation changes them
    lengths = segment_lengths(len(data), segment)
    started = time.perf_counter()
    coder = RangeBitEncoder()
    code_segments(model, table, lengths, coder, data, adapt, progress)
    seconds = time.perf_counter() - started
    payload = coder.words().astype("<u4").tobytes()
    header = StreamHeader(length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                          model=weights, segment=segment, precision=PRECISION,
                          run=str(Path(run_dir).resolve()), step=loaded.step,
                          adapt=adapt.to_dict() if adapt else None, environment=environment(),
                          coder=CODER, words=len(payload) // 4,
                          payload=hashlib.sha256(payload).hexdigest())
    stream = header.to_bytes() + payload
    write_output(Path(dst), stream)
    return {"input_bytes": len(data), "stream_bytes": len(stream),
            "bits_per_byte": 8 * len(stream) / len(data) if data else None,
            "seconds": round(seconds, 3), "segment": segment, "adapt": header.adapt,
            "run": header.run, "step": header.step}


def _threads(env: dict[str, Any]) -> int:
    n = env.get("threads", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4096 else 1


def differences(env: dict[str, Any]) -> list[str]:
    """What differs between the environment a stream was written in and this one."""
    here = environment()
    return [f"{k} {env.get(k)!r} there, {here[k]!r} here" for k in ("torch", "machine", "cpu")
            if env.get(k) != here[k]]


def decompress_file(src: Path, dst: Path, run_dir: Optional[Path] = None, force: bool = False,
                    max_bytes: int = MAX_INPUT, progress: Progress = None,
                    log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Restore the original of the stream ``src`` into ``dst``."""
    import torch

    from bitlm_compress.coder import RangeBitDecoder
    from bitlm_core.app.loading import load_run

    check_output(src, dst, force)
    blob = read_input(src, MAX_STREAM, "stream")
    header, start = read_header(blob, str(src))
    if header.length > max_bytes:
        raise CodecError(f"{src} says it holds {header.length:,} bytes, more than --max-bytes "
                         f"{max_bytes:,}; raise --max-bytes if you expect a file that large")
    if header.coder != CODER or header.precision != PRECISION:
        raise CodecError(f"{src} was coded with {header.coder}; this bitlm-compress codes "
                         f"{CODER}")
    payload = blob[start:]
    if len(payload) != 4 * header.words or \
            hashlib.sha256(payload).hexdigest() != header.payload:
        why = (f"its payload is {len(payload):,} bytes and the header says "
               f"{4 * header.words:,}" if len(payload) != 4 * header.words else
               "its payload does not match the header's checksum")
        raise CodecError(f"{src} is truncated or damaged: {why}; nothing was decoded")
    run = Path(run_dir) if run_dir is not None else Path(header.run)
    if not run.is_dir():
        raise CodecError(f"the run that compressed {src} ({header.run}) is not there; pass "
                         "--run with that run's folder" if run_dir is None else
                         f"--run {run} is not a run folder")
    loaded = load_run(run, log=lambda m: None, device="cpu")
    model, table = _model_of(loaded)
    if fingerprint(model) != header.model:
        raise CodecError(f"{src} was compressed by another model (weights {header.model}, "
                         f"step {header.step} of {header.run}); {run} now holds weights "
                         f"{fingerprint(model)} at step {loaded.step}. Pass --run with the run "
                         "folder that compressed it, unchanged since")
    torch.set_num_threads(_threads(header.environment))
    unlike = differences(header.environment)
    if unlike:
        log("warning: this machine differs from the one that compressed the stream ("
            + "; ".join(unlike) + "): decoding needs the same floating-point results, and "
            "may fail")
    adapt = Adapt(**header.adapt) if header.adapt else None
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    data = code_segments(model, table, segment_lengths(header.length, header.segment),
                         RangeBitDecoder(words), None, adapt, progress)
    if hashlib.sha256(data).hexdigest() != header.sha256:
        why = ("; it was compressed on another machine (" + "; ".join(unlike) + ")"
               if unlike else ": the stream is damaged or truncated")
        raise CodecError(f"{src} decodes to bytes whose SHA-256 is not the original's{why}. "
                         f"Nothing was written to {dst}")
    write_output(Path(dst), data)
    return {"output_bytes": len(data), "stream_bytes": len(blob), "run": str(run),
            "step": loaded.step}
