"""report.html and the PNGs: written at the end of a run and by `bitlm report`, self-contained,
carrying the data, overlaying several runs, and never replacing a file they did not write."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bitlm_core.cli.root import app

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
        + "a bird sang in the tree and the sun was warm. " * 40)
PNG = b"\x89PNG\r\n\x1a\n"


def _installed(*components: str) -> bool:
    from bitlm_core.registry import get_registry

    return all(get_registry().get(*c.split(":")) is not None for c in components)


#: the runs use K/C/S telemetry with the kcs gate, and one of them the rle codec
needs_plugins = pytest.mark.skipif(
    not _installed("safety:kcs", "compressor:rle"),
    reason="needs plugins/telemetry_kcs and plugins/compression_rle installed")


def spec_file(tmp: Path, name: str, **sections) -> Path:
    corpus = tmp / "tiny.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spec = {"name": name,
            "data": {"corpus": {"name": "file", "options": {"path": str(corpus)}},
                     "seq_len": 16, "val_fraction": 0.1},
            "model": {"layout": "framed", "d_model": 32, "n_layers": 2, "n_heads": 2},
            "train": {"steps": 20, "batch_size": 4, "warmup_steps": 2, "eval_every": 10,
                      "eval_batches": 2, "checkpoint_every": 10, "log_every": 2},
            "telemetry": {"metrics": "all", "every": 10},
            "safety": {"gate": {"name": "kcs"}},
            "sample": {"prompt": "the ", "bytes": 16, "count": 2}, **sections}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def embedded(html: str) -> dict:
    match = re.search(r"<script type='application/json' id='bitlm-data'>(.*?)</script>", html,
                      re.S)
    assert match, "report.html does not embed its data"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    a = run("run", str(spec_file(tmp, "a")), "--out", str(tmp / "a"), "-q")
    assert a.exit_code == 0, a.output
    b = run("run", str(spec_file(tmp, "b", compression={"name": "rle", "prob": 0.5})),
            "--out", str(tmp / "b"), "-q")
    assert b.exit_code == 0, b.output
    return tmp


@needs_plugins
def test_a_run_ends_with_its_report(two_runs):
    folder = two_runs / "a"
    html = (folder / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (folder / "plots").iterdir())
    assert pngs == ["bits_per_byte.png", "bits_per_byte_time.png", "lr.png", "telemetry.png"]
    files = set()
    for name in pngs:
        data = (folder / "plots" / name).read_bytes()
        assert data.startswith(PNG) and b"bitlm-report" in data[:4096]
        files.add(data)
    shown = {base64.b64decode(b) for b in re.findall(r"base64,([A-Za-z0-9+/=]+)'", html)}
    assert shown == files  # the page embeds exactly the plots beside it
    # self-contained: nothing is loaded from anywhere
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", html, re.I)
    assert "<link" not in html and "@import" not in html
    data = embedded(html)
    (one,) = data["runs"]
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logged if r["split"] == "train"]
    assert one["curves"]["series"]["train/bits_per_byte"]["step"] == train_steps
    assert one["curves"]["series"]["final/bits_per_byte"]["value"] == [
        json.loads((folder / "summary.json").read_text())["held_out_bits_per_byte"]]
    assert "telemetry/val/lz_complexity" in one["curves"]["series"]
    # the samples with their verdicts and the floors
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["sample_verdicts"]) == 2
    assert summary["gate"] == {"name": "kcs", "floors": {"lz_complexity": 0.3,
                                                         "symbiosis": 0.5}}
    assert html.count("<div class='sample") == 2 and "floor" in html
    verdict = "allowed" if summary["sample_verdicts"][0]["allowed"] else "blocked"
    assert f"): {verdict}" in html


@needs_plugins
def test_report_overlays_runs_and_draws_compression(two_runs):
    out = two_runs / "both"
    result = run("report", str(two_runs / "a"), str(two_runs / "b"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (two_runs / "b" / "plots" / "compression.png").is_file()  # b compressed
    assert (out / "plots" / "compression.png").is_file()
    data = embedded((out / "report.html").read_text(encoding="utf-8"))
    assert [r["name"] for r in data["runs"]] == ["a", "b"]
    assert "train/compressed/ratio" in data["runs"][1]["curves"]["series"]
    assert "train/compressed/ratio" not in data["runs"][0]["curves"]["series"]
    # again: it replaces its own files
    assert run("report", str(two_runs / "a"), str(two_runs / "b"), "--out",
               str(out)).exit_code == 0


@needs_plugins
def test_report_leaves_files_it_did_not_write(two_runs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my own notes")
    result = run("report", str(two_runs / "a"), "--out", str(mine))
    assert result.exit_code == 2 and "not written by bitlm-report" in result.output
    assert (mine / "report.html").read_text() == "my own notes"
    (mine / "report.html").unlink()
    (mine / "plots").mkdir()
    (mine / "plots" / "lr.png").write_bytes(PNG + b"a picture of mine")
    result = run("report", str(two_runs / "a"), "--out", str(mine))
    assert result.exit_code == 2 and "lr.png" in result.output
    assert not (mine / "report.html").exists()


def test_report_needs_run_folders_and_a_place_for_several(tmp_path):
    result = run("report", str(tmp_path))
    assert result.exit_code == 2 and "not a bitlm run folder" in result.output
    result = run("report", str(tmp_path), str(tmp_path))
    assert result.exit_code == 2 and "--out" in result.output


@needs_plugins
def test_the_report_opens_offline_in_a_browser(two_runs):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        asked: list[str] = []

        def route(r):
            asked.append(r.request.url)
            return r.continue_() if r.request.url.startswith("file:") else r.abort()

        page.route("**/*", route)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((two_runs / "both" / "report.html").as_uri()
                  if (two_runs / "both").exists() else (two_runs / "a" / "report.html").as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        browser.close()
    assert images and all(w > 100 for w in images)  # every plot decoded
    assert all(u.startswith("file:") for u in asked) and errors == []


def test_growth_events_are_marked_and_floors_drawn():
    """On synthetic curves: a growth is a dotted vertical line at its step, and a gate's floor
    a horizontal line on its telemetry metric."""
    from bitlm_core.app.runs import curves

    from bitlm_report import plots

    records = [{"split": "train", "step": s, "time": s / 10, "bits_per_byte": 8 - s / 50,
                "lr": 1e-3} for s in range(1, 200)]
    records += [{"split": "scaling", "step": 120, "change": "depth 2 -> 3"},
                {"split": "telemetry", "step": 100, "telemetry/val/symbiosis": 0.7}]
    run = {"name": "g", "curves": curves(records), "summary": {"gate": {
        "name": "kcs", "floors": {"symbiosis": 0.5}}}}
    for against in ("step", "time"):
        fig = plots.bits_per_byte([run], against)
        (ax,) = fig.axes
        vertical = [line for line in ax.lines if line.get_linestyle() == ":"]
        expected = 120 if against == "step" else 12.0
        assert [line.get_xdata()[0] for line in vertical] == [expected]
        assert any(t.get_text() == "grew" for t in ax.texts)
    fig = plots.telemetry([run])
    (ax,) = fig.axes
    assert any(line.get_ydata()[0] == 0.5 for line in ax.lines if line.get_linestyle() == ":")
    assert plots.compression([run]) is None  # compression off: no figure


@needs_plugins
def test_report_refuses_another_runs_folder_and_a_run_given_twice(two_runs):
    before = (two_runs / "b" / "report.html").read_bytes()
    result = run("report", str(two_runs / "a"), "--out", str(two_runs / "b"))
    assert result.exit_code == 2 and "another run's folder" in result.output
    assert (two_runs / "b" / "report.html").read_bytes() == before
    result = run("report", str(two_runs / "a"), str(two_runs / "a"), "--out",
                 str(two_runs / "twice"))
    assert result.exit_code == 2 and "given twice" in result.output
    result = run("report", str(two_runs / "nowhere"))
    assert result.exit_code == 2 and "does not exist" in result.output
