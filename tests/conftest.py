"""Shared fixtures (a tiny corpus, a tiny spec that trains in seconds) and the ``needs`` marker.

Core's tests must pass with no plugin installed (``make test-core``). A test that uses a
plugin's component says so with ``@pytest.mark.needs("kind:name", ...)`` and is skipped, with
the plugin folder to install in the reason, when the component is not installed or disabled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: where in this repository each component the tests use comes from
PLUGIN_FOLDERS = {
    "attention:sdpa": "plugins/attention_sdpa",
    "compressor:rle": "plugins/compression_rle",
    "compressor:pack": "plugins/compression_pack",
    "telemetry:negentropy": "plugins/telemetry_kcs",
    "telemetry:lz_complexity": "plugins/telemetry_kcs",
    "telemetry:symbiosis": "plugins/telemetry_kcs",
    "safety:kcs": "plugins/telemetry_kcs",
    "objective:diffusion": "plugins/diffusion",
    "sampler:diffusion": "plugins/diffusion",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*components): skip unless every 'kind:name' "
                                       "component is installed and enabled")
    config.addinivalue_line("markers", "jobs: starts multi-process jobs (torchrun's launcher); "
                                       "core-only, run by make test, skipped by make test-core")


def pytest_runtest_setup(item):
    from bitlm_core.registry import get_registry

    wanted = [c for mark in item.iter_markers("needs") for c in mark.args]
    if not wanted:
        return
    registry = get_registry()
    missing = [c for c in wanted if registry.get(*c.split(":", 1)) is None]
    if missing:
        folders = sorted({PLUGIN_FOLDERS.get(c, "?") for c in missing})
        pytest.skip(f"needs {', '.join(missing)}: pip install {' '.join(folders)}")


TINY_TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
             + "a bird sang in the tree and the sun was warm. " * 40)


@pytest.fixture
def one_thread():
    """One torch thread inside the test (bitwise comparisons), the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
        # report.html and plots (bitlm-report, when installed) cost ~1.5 s per run: tests of
        # other things leave them out; tests of reports switch them on
        "output": {"report": False},
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
