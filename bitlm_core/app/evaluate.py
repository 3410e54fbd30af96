"""``bitlm eval``: bits per byte of a run's model on any text, however long."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bitlm_core.app.loading import LoadedRun
from bitlm_core.errors import DataError


def read_text_file(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    return path.read_bytes()


def evaluate_bytes(run: LoadedRun, data: bytes, source: str, batch_size: int = 16,
                   stride: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Bits per byte of ``run``'s model on any text, however long.

    A causal model scores the text with a sliding window of its context (``data.seq_len``
    bytes, or what ``scaling`` grew it to) moved by ``stride`` bytes (default half the
    context): every byte is scored once, with at least ``context - stride`` bytes before it,
    so the figure does not depend on where windows happen to start. A bound (diffusion)
    objective scores non-overlapping windows.
    """
    import torch

    from bitlm_core.engine.dataset import check_text
    from bitlm_core.engine.evaluation import score_batches, score_sliding

    check_text(data, source, run.spec.data.require_utf8)
    enc, objective = run.comps.encoder, run.comps.objective
    Fb, W = enc.frame_bits, run.model.cfg.max_frames  # data.seq_len, or more if it grew
    bits = torch.from_numpy(enc.encode_np(data))
    is_bound = bool(objective.is_bound)
    if objective.causal and not is_bound:
        stride = max(1, W // 2) if stride is None else stride
        if not 1 <= stride <= W:
            raise DataError(f"--stride must be between 1 and the model's context ({W} bytes), "
                            f"got {stride}")
        bpb, n_bytes = score_sliding(run.model, bits, Fb, W, stride, batch_size, progress)
        return {"bits_per_byte": bpb, "bytes": n_bytes, "is_bound": False,
                "window": W, "stride": stride}
    if stride is not None:
        raise DataError(f"--stride applies to causal models; this run's objective "
                        f"'{run.spec.objective.name}' is scored in non-overlapping windows of "
                        f"{W} bytes (its figure is a bound); leave --stride out")
    full = (len(data) // W) * W
    rows = bits[: full * Fb].view(-1, W * Fb)
    batches = list(rows.split(batch_size))
    if full < len(data):
        batches.append(bits[full * Fb:].view(1, -1))  # the last, shorter window
    bpb, n_bytes = score_batches(run.model, objective, batches, Fb)
    return {"bits_per_byte": bpb, "bytes": n_bytes, "is_bound": is_bound,
            "window": W, "stride": W}
