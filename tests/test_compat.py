"""Run folders written by bitlm-core 0.1 (before the layered core) still load and compute the
same outputs.

``tests/data/v0.1-runs/{framed,flat}`` are tiny runs trained for 3 steps by bitlm-core 0.1 (their
spec, weights, optimizer state and metadata; not the encoded corpus, which a resumed run writes
again), with the logits that version's model gave on a fixed input (``expected.safetensors``).
Float
kernels differ between CPUs, so the comparison allows 1e-5; a weight loaded into the wrong
place, or a layout that computes differently, misses by orders of magnitude more.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitlm_core.app.generate import generate
from bitlm_core.app.loading import load_run

RUNS = Path(__file__).with_name("data") / "v0.1-runs"


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_a_run_folder_of_version_0_1_loads_and_gives_its_outputs(layout):
    run = load_run(RUNS / layout)
    assert run.step == 3 and run.model.cfg.layout == layout
    expected = load_file(str(RUNS / layout / "expected.safetensors"))
    with torch.no_grad():
        logits = run.model(expected["bits"].view(1, -1), causal=True)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    sample = generate(run.model, run.comps.encoder, run.comps.sampler, "the ", 4, seed=0)
    assert sample.text.startswith("the ") and sample.bits.numel() == 8 * 9


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_running_the_same_spec_into_a_run_folder_of_version_0_1_resumes_it(layout, tmp_path,
                                                                           monkeypatch):
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    folder = shutil.copytree(RUNS / layout, tmp_path / layout)
    monkeypatch.chdir(tmp_path)  # the spec names its corpus relative to where it ran
    (tmp_path / "tiny.txt").write_text("the cat sat on the mat. the dog sat on the log. " * 60)
    logs = []
    summary = execute(load_spec(folder / "spec.yaml"), folder, log=logs.append)
    assert "resuming from step-000003 (step 3 of 3)" in logs
    assert summary["steps"] == 3 and summary["samples"][0].startswith("The ")
