"""The dashboard: its API and its safety (http.client), and its page in a real headless browser
(Playwright driving the system's Chromium)."""

from __future__ import annotations

import ast
import http.client
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from bitlm_dashboard.server import Dashboard

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
        + "a bird sang in the tree and the sun was warm. " * 40)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "a-token-of-twenty-characters"


def tiny_spec(tmp: Path, steps: int = 30) -> dict:
    corpus = tmp / "tiny.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    from bitlm_core.registry import get_registry

    registry = get_registry()
    spec = {"name": "tiny",
            "data": {"corpus": {"name": "file", "options": {"path": str(corpus)}},
                     "seq_len": 16, "val_fraction": 0.1},
            "model": {"layout": "framed", "d_model": 32, "n_layers": 2, "n_heads": 2},
            "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2, "eval_every": 10,
                      "eval_batches": 2, "checkpoint_every": 10, "log_every": 1, "lr": 0.003},
            "sample": {"prompt": "the ", "bytes": 16},
            "output": {"report": False}}
    if registry.get("safety", "kcs") is not None:
        spec["telemetry"] = {"metrics": "all", "every": 10}
        spec["safety"] = {"gate": {"name": "kcs"}}
    return spec


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """A runs folder with one tiny finished run, ``base``."""
    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec

    tmp = tmp_path_factory.mktemp("dash")
    runs = tmp / "runs"
    runs.mkdir()
    execute(validate_spec(tiny_spec(tmp)), runs / "base", log=lambda m: None)
    return runs


class Server:
    def __init__(self, runs: Path, **options):
        self.dash = Dashboard(runs, "127.0.0.1", 0, **options)
        self.thread = threading.Thread(target=self.dash.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.dash.port

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"X-Bitlm-Dashboard": "1", "Content-Type": "application/json", **(headers or {})}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        text = response.read()
        conn.close()
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        return response.status, value

    def close(self):
        self.dash.shutdown()
        self.dash.server_close()


@pytest.fixture
def server(runs_dir):
    s = Server(runs_dir)
    yield s
    s.close()


def test_runs_table_and_metrics(server):
    status, answer = server.request("GET", "/api/runs")
    assert status == 200
    (row,) = [r for r in answer["runs"] if r["name"] == "base"]
    assert row["status"] == "finished" and row["d_model"] == 32 and row["last_step"] == 30
    assert row["held_out_bits_per_byte"] > 0
    status, part = server.request("GET", "/api/runs/base/metrics?offset=0")
    assert status == 200 and part["offset"] > 0
    assert part["series"]["train/bits_per_byte"]["step"][:3] == [1, 2, 3]
    status, again = server.request("GET", f"/api/runs/base/metrics?offset={part['offset']}")
    assert again["series"] == {} and again["offset"] == part["offset"]  # nothing read twice


# -- safety ----------------------------------------------------------------------------------
def test_paths_outside_the_runs_folder_are_refused(server, runs_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs_dir / "base", outside, ignore=shutil.ignore_patterns(".bitlm-lock"))
    (runs_dir / "link").symlink_to(outside)
    try:
        for path in ("/api/runs/..%2F..%2Fetc/metrics", "/api/runs/../metrics",
                     "/api/runs/link/metrics", "/api/runs/.hidden/spec",
                     "/api/runs/link/metrics.jsonl"):
            status, answer = server.request("GET", path)
            assert status in (400, 404), path
            assert answer["error"], path
        status, answer = server.request("GET", "/api/runs/link/metrics")
        assert "symbolic link" in answer["error"]
        for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/server.py"):
            assert server.request("GET", path)[0] == 404, path
        status, answer = server.request("GET", "/api/runs")
        assert "link" not in [r["name"] for r in answer["runs"]]
    finally:
        (runs_dir / "link").unlink()


def test_oversized_and_malformed_requests_are_refused(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/api/runs")  # says 1 MiB follows: refused before it is read
    for key, value in (("Content-Type", "application/json"), ("X-Bitlm-Dashboard", "1"),
                       ("Content-Length", str(1 << 20))):
        conn.putheader(key, value)
    conn.endheaders()
    conn.send(b"{" + b" " * 1000)
    response = conn.getresponse()
    assert response.status == 413 and "limited" in json.loads(response.read())["error"]
    conn.close()
    status, answer = server.request("POST", "/api/runs", raw=b"not json")
    assert status == 400 and "JSON" in answer["error"]
    status, answer = server.request("POST", "/api/runs/base/sample",
                                    body={"bytes": 10 ** 9})
    assert status == 400 and "bytes" in answer["error"]
    status, answer = server.request("POST", "/api/runs/base/sample", body={"code": "1+1"})
    assert status == 400 and "unknown field(s) code" in answer["error"]
    assert server.request("DELETE", "/api/runs")[0] == 405
    status, answer = server.request("POST", "/api/runs", body={
        "base": "base", "name": "x", "overridez": {"train.steps": 2}})
    assert status == 400 and "overridez" in answer["error"]
    status, answer = server.request("POST", "/api/runs", raw=b'{"a":' * 5000 + b"1" +
                                    b"}" * 5000)
    assert status == 400 and "nested" in answer["error"]
    status, answer = server.request("GET", "/api/runs/nobody/metrics?offset=0")
    assert status == 404 and "no run named 'nobody'" in answer["error"]
    status, answer = server.request("POST", "/api/runs", body={"name": "x"})
    assert status == 400 and "give a run's name" in answer["error"]


def test_specs_are_validated_like_bitlm_validate(server, runs_dir):
    status, answer = server.request("POST", "/api/runs", body={
        "base": "base", "name": "typo", "overrides": {"train.stepz": 5}})
    assert status == 400 and "stepz" in answer["error"]
    assert not (runs_dir / "typo").exists()
    status, answer = server.request("POST", "/api/validate",
                                    body={"spec": "train: {steps: 5, bogus: 1}\n"})
    assert status == 400 and "bogus" in answer["error"]
    for key in ("data.corpus.options.path", " data.corpus.options.path", "data..corpus",
                "data.corpus .options.path"):
        status, answer = server.request("POST", "/api/runs", body={
            "base": "base", "name": "steal", "overrides": {key: "/etc/passwd"}})
        assert status == 400 and ("data.corpus" in answer["error"]
                                  or "dotted spec key" in answer["error"]), key
    status, answer = server.request("POST", "/api/runs", body={
        "base": "base", "name": "steal", "overrides": {"objective.name": "distill",
                                                        "objective.options.teacher": "/"}})
    assert status == 400 and "outside the runs folder" in answer["error"]
    assert not (runs_dir / "steal").exists()
    status, answer = server.request("POST", "/api/runs", body={
        "base": "base", "name": "../escape", "overrides": {}})
    assert status == 400 and "name" in answer["error"]
    status, answer = server.request("POST", "/api/runs", body={
        "base": "base", "name": "base", "overrides": {}})
    assert status == 400 and "exists" in answer["error"]
    status, answer = server.request("POST", "/api/validate", body={
        "base": "base", "overrides": {"train.steps": 7}})
    assert status == 200 and answer["spec"]["train"]["steps"] == 7


def test_a_token_is_required_when_one_is_set(runs_dir):
    s = Server(runs_dir, token=TOKEN)
    try:
        for path in ("/api/runs", "/", "/static/app.js", "/api/runs/base/events"):
            assert s.request("GET", path)[0] == 401, path
        assert s.request("GET", "/api/runs", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.request("GET", "/api/runs",
                         headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert s.request("GET", f"/api/runs?token={TOKEN}")[0] == 200
        assert s.request("POST", "/api/runs/base/stop", body={})[0] == 401
        # the page opened with ?token= gets a cookie, which its scripts and styles then carry
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", f"/?token={TOKEN}")
        response = conn.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie")
        assert response.status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        conn.close()
        jar = {"Cookie": cookie.split(";")[0]}
        assert s.request("GET", "/static/app.js", headers=jar)[0] == 200
        assert s.request("GET", "/static/app.js",
                         headers={"Cookie": "bitlm_dashboard_token=wrong"})[0] == 401
    finally:
        s.close()


def test_files_in_run_folders_are_read_only_when_regular(server, runs_dir, tmp_path):
    """A run folder from elsewhere must not make the server read through a link or hang."""
    secret = tmp_path / "secret.txt"
    secret.write_text('{"split": "train", "step": 1, "loss": 42}\n')
    bad = runs_dir / "planted"
    shutil.copytree(runs_dir / "base", bad, ignore=shutil.ignore_patterns(".bitlm-lock",
                                                                           "checkpoints"))
    (bad / "metrics.jsonl").unlink()
    (bad / "metrics.jsonl").symlink_to(secret)
    (bad / "summary.json").unlink()
    os.mkfifo(bad / "summary.json")
    try:
        status, answer = server.request("GET", "/api/runs")  # the FIFO does not block it
        assert status == 200
        (row,) = [r for r in answer["runs"] if r["name"] == "planted"]
        assert row["last_step"] is None and row["status"] == "stopped"
        assert server.request("GET", "/api/runs/planted/metrics.jsonl")[0] == 404
        status, answer = server.request("GET", "/api/runs/planted/metrics?offset=0")
        assert status == 400 and "cannot read" in answer["error"]
    finally:
        shutil.rmtree(bad)


def test_loopback_refuses_other_hosts_and_cross_site_posts(server):
    status, answer = server.request("GET", "/api/runs", headers={"Host": "evil.example:80"})
    assert status == 403 and "loopback" in answer["error"]
    status, answer = server.request("POST", "/api/runs/base/stop", body={},
                                    headers={"X-Bitlm-Dashboard": ""})
    assert status == 403
    status, answer = server.request("POST", "/api/runs/base/stop", body={},
                                    headers={"Content-Type": "text/plain"})
    assert status == 403


def test_trainings_are_bounded(runs_dir):
    s = Server(runs_dir, max_trainings=0)
    try:
        status, answer = s.request("POST", "/api/runs", body={
            "base": "base", "name": "over-limit", "overrides": {"train.steps": 2}})
        assert status == 429 and "limit" in answer["error"]
        assert not (runs_dir / "over-limit").exists()
    finally:
        s.close()


def test_the_command_refuses_a_public_address_without_a_token(runs_dir):
    from typer.testing import CliRunner

    from bitlm_core.cli.root import app

    result = CliRunner().invoke(app, ["dashboard", str(runs_dir), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output


SERVING = ["bitlm_dashboard", "bitlm_core.app.control", "bitlm_core.app.runs"]


def test_nothing_serving_evaluates_or_unpickles():
    import importlib

    forbidden_calls = {"eval", "exec", "compile", "__import__", "execfile", "load_module"}
    forbidden_modules = {"pickle", "marshal", "shelve", "importlib", "dill", "cloudpickle"}
    files = []
    for name in SERVING:
        module = importlib.import_module(name)
        path = Path(module.__file__)
        files += sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    assert len(files) >= 5
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name):
                    called = f.id
                    assert called not in forbidden_calls, f"{path.name}:{node.lineno} {called}"
                else:  # re.compile is fine; builtins.eval is not
                    called = f.attr if isinstance(f, ast.Attribute) else ""
                    assert called not in forbidden_calls - {"compile"}, \
                        f"{path.name}:{node.lineno} {called}"
                if called in ("load", "unsafe_load", "full_load") and isinstance(
                        f, ast.Attribute) and getattr(f.value, "id", "") == "yaml":
                    raise AssertionError(f"{path.name}:{node.lineno} yaml.{called}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] not in forbidden_modules, f"{path.name} imports {n}"


# -- the page, in a browser ------------------------------------------------------------------
@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium on this machine: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def wait(page, expression: str, timeout: float = 60_000):
    page.wait_for_function(f"() => {expression}", timeout=timeout)


def test_the_page_in_a_browser(server, runs_dir, browser, tmp_path):
    from bitlm_core.store.checkpoint import latest_checkpoint

    errors: list[str] = []
    # The page's Content-Security-Policy forbids eval; Playwright's waits evaluate
    # expressions, so this test (only) lets them through.
    page = browser.new_context(bypass_csp=True, viewport={"width": 1200, "height": 1600}) \
        .new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"http://127.0.0.1:{server.port}/")

    # the runs table, and a curve with data points
    page.wait_for_selector("#runs-table tbody tr[data-run=base]")
    assert page.inner_text("tr[data-run=base] td.status") == "finished"
    page.click("#runs-table th[data-key=name]")  # sortable
    page.check("tr[data-run=base] input[type=checkbox]")
    wait(page, "window.bitlm.points() > 30")
    assert page.locator("#chart canvas").count() == 1

    # the form starts a run, whose curve grows while it trains; then it is stopped
    page.select_option("#base", "base")
    page.fill("#start-form input[name=name]", "from-form")
    page.fill("#start-form input[name='train.steps']", "100000")
    page.fill("#start-form input[name='safety.gate.options.c_floor']", "0.2")
    page.click("#start-form button[type=submit]")
    wait(page, "document.getElementById('start-result').textContent.startsWith('started')")
    wait(page, "window.bitlm.updates('from-form') >= 1", 120_000)
    first = page.evaluate("window.bitlm.state.data['from-form'].series"
                          "['train/bits_per_byte'].step.length")
    wait(page, "window.bitlm.updates('from-form') >= 3", 120_000)
    later = page.evaluate("window.bitlm.state.data['from-form'].series"
                          "['train/bits_per_byte'].step.length")
    assert later > first > 0
    page.wait_for_selector("button[data-stop='from-form']", timeout=30_000)
    page.click("button[data-stop='from-form']")
    wait(page, "document.getElementById('start-result').textContent.includes('stopping')")
    deadline = time.monotonic() + 60
    while server.dash.trainings.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.dash.trainings.running(), server.dash.trainings.log_tail("from-form")
    assert latest_checkpoint(runs_dir / "from-form") is not None  # stopped cleanly
    spec = yaml.safe_load((runs_dir / "from-form" / "spec.yaml").read_text())
    assert spec["train"]["steps"] == 100000 and spec["data"] == yaml.safe_load(
        (runs_dir / "base" / "spec.yaml").read_text())["data"]

    # the table sorts; the ticked runs compare at a chosen step
    names = lambda: page.eval_on_selector_all(  # noqa: E731
        "#runs-table tbody tr", "rows => rows.map(r => r.dataset.run)")
    page.wait_for_selector("tr[data-run='from-form']")
    page.click("#runs-table th[data-key=name]")
    first_order = names()
    page.click("#runs-table th[data-key=name]")
    assert names() == list(reversed(first_order)) and set(first_order) >= {"base", "from-form"}
    page.fill("#compare-step", "10")
    page.click("#compare")
    row = page.inner_text("#compare-table tr[data-run=base]")
    base_10 = next(json.loads(line)["bits_per_byte"] for line in
                   (runs_dir / "base" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["split"] == "train" and json.loads(line)["step"] == 10)
    assert f"{base_10:.4g}" in row

    # sampling with the gate: the verdict, every attempt, the metrics against their floors
    page.select_option("#sample-run", "base")
    page.fill("#sample-form input[name=bytes]", "40")
    page.fill("#sample-form input[name=max_retries]", "1")
    if spec["safety"]["gate"]["name"] == "kcs":
        page.fill("#sample-form input[name=c_floor]", "5")  # C never gets near 5: blocked
    page.click("#sample-form button[type=submit]")
    page.wait_for_selector("#sample-verdict", timeout=60_000)
    verdict = page.inner_text("#sample-verdict")
    if spec["safety"]["gate"]["name"] == "kcs":
        assert verdict.startswith("blocked")
        assert page.locator("#attempts tr").count() == 3  # a header and two attempts
        assert "floor 5" in page.inner_text("#attempts")
        assert page.locator("#attempts td.below").count() >= 2
        assert "blocked every attempt" in page.inner_text("#sample-result")
    else:
        assert verdict.startswith("allowed")
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert errors == []
    assert all(u.startswith(f"http://127.0.0.1:{server.port}/") for u in requests), requests
    shutil.rmtree(runs_dir / "from-form")


def test_a_sample_that_does_not_decompress_says_so_plainly(tmp_path):
    """A run trained to write codec streams (compression.decompress_output) whose sample is
    not a valid stream: the page gets the raw text and a message, not an error."""
    from bitlm_core.app import control
    from bitlm_core.app.run import execute
    from bitlm_core.registry import get_registry
    from bitlm_core.spec import validate_spec

    if get_registry().get("compressor", "rle") is None:
        pytest.skip("needs plugins/compression_rle")
    spec = tiny_spec(tmp_path, steps=4)
    spec["compression"] = {"name": "rle", "prob": 0.5, "direct": True,
                           "decompress_output": True}
    runs = tmp_path / "runs"
    execute(validate_spec(spec), runs / "streams", log=lambda m: None)
    got = control.sample_run(control.LoadedRuns(), runs, "streams", prompt="", n_bytes=12)
    assert got["text"] is not None
    assert got["decompressed"].startswith("(not a valid stream")  # 4 steps: not a codec yet
    assert "could not be decompressed" in got["message"] and "rle" in got["message"]
    assert "raw text is shown" in got["message"]
