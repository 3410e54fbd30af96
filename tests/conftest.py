"""Shared fixtures: a tiny corpus and a tiny spec that trains in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
             + "a bird sang in the tree and the sun was warm. " * 40)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def tiny_spec_dict(corpus: Path, layout: str = "framed", steps: int = 6) -> dict:
    return {
        "name": "tiny",
        "data": {"corpus": {"name": "file", "options": {"path": str(corpus)}},
                 "seq_len": 16, "val_fraction": 0.1},
        "model": {"layout": layout, "d_model": 32, "n_layers": 2, "n_heads": 2},
        "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2, "eval_every": 3,
                  "eval_batches": 2, "checkpoint_every": 2, "log_every": 1, "lr": 0.003},
        "sample": {"prompt": "the ", "bytes": 8},
    }


@pytest.fixture
def tiny_spec(tmp_path: Path, tiny_corpus: Path):
    """Write a tiny spec file; returns a function (layout=..., **section overrides) -> path."""

    def make(layout: str = "framed", steps: int = 6, **sections) -> Path:
        data = tiny_spec_dict(tiny_corpus, layout, steps)
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        path = tmp_path / f"spec-{layout}-{steps}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return make
