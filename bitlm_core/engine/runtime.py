"""Process-wide settings of a training or inference session (torch threads)."""

from __future__ import annotations


def set_threads(threads: int | str) -> None:
    """``train.threads``: an int pins torch's intra-op threads (1 is bitwise reproducible);
    ``"auto"`` keeps torch's default of one per core."""
    import torch

    if threads != "auto":
        torch.set_num_threads(int(threads))
