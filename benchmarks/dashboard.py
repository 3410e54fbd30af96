"""The dashboard with many runs: does it stay responsive with 200 runs in the folder?

One tiny run is trained (its metrics.jsonl has ``--steps`` records, a long run's worth), then
copied to make folders of 1 and of 200 runs (spec, metrics, summary, marker: what the page
reads). For each folder, measured in the same run:

* ``/api/runs`` cold (nothing cached) and warm (the next refresh the page makes every 3 s);
* the page in headless Chromium: from navigation until every row of the runs table is drawn;
* ticking one run, and ten: until their curves are fetched and drawn.

Each figure is the median of ``--repeats`` tries; the last column is the 200-run figure over
the 1-run one.

    apt-get install -y chromium; pip install playwright
    python benchmarks/dashboard.py
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
        + "a bird sang in the tree and the sun was warm. " * 40)
COPIED = (".bitlm-run", "spec.yaml", "metrics.jsonl", "summary.json")


def train_one(tmp: Path, steps: int) -> Path:
    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec

    corpus = tmp / "tiny.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spec = {"name": "tiny", "data": {"corpus": {"name": "file", "options": {"path": str(corpus)}},
                                     "seq_len": 16, "val_fraction": 0.1},
            "model": {"layout": "framed", "d_model": 32, "n_layers": 2, "n_heads": 2},
            "train": {"steps": steps, "batch_size": 4, "eval_every": max(1, steps // 20),
                      "eval_batches": 2, "checkpoint_every": steps, "log_every": 1},
            "sample": {"bytes": 16}, "output": {"report": False}}
    execute(validate_spec(spec), tmp / "source", log=lambda m: None)
    return tmp / "source"


def make_folder(source: Path, root: Path, count: int) -> Path:
    root.mkdir()
    for i in range(count):
        run = root / f"run-{i:03d}"
        run.mkdir()
        for name in COPIED:
            shutil.copy(source / name, run / name)
    return root


def timed_get(port: int, path: str) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200, response.status
    return time.perf_counter() - start


def measure(folder: Path, count: int, repeats: int, browser) -> dict[str, float]:
    from bitlm_dashboard.server import Dashboard

    figures: dict[str, list[float]] = {"cold": [], "warm": [], "page": [], "overlay1": [],
                                       "overlay10": []}
    for _ in range(repeats):
        server = Dashboard(folder, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            figures["cold"].append(timed_get(server.port, "/api/runs"))
            figures["warm"].append(timed_get(server.port, "/api/runs"))
            if browser is not None:
                page = browser.new_context(bypass_csp=True).new_page()
                start = time.perf_counter()
                page.goto(f"http://127.0.0.1:{server.port}/")
                page.wait_for_function(
                    f"() => document.querySelectorAll('#runs-table tbody tr').length === {count}",
                    timeout=120_000)
                figures["page"].append(time.perf_counter() - start)
                boxes = page.locator("#runs-table tbody input[type=checkbox]")
                for key, ticked in (("overlay1", 1), ("overlay10", 10)):
                    if ticked > count:
                        continue
                    start = time.perf_counter()
                    for i in range(ticked):
                        boxes.nth(i).check()
                    page.wait_for_function(  # a run's raw, smoothed and held-out lines
                        "() => window.bitlm.state.chart && "
                        f"window.bitlm.state.chart.series.length === {1 + 3 * ticked}",
                        timeout=120_000)
                    figures[key].append(time.perf_counter() - start)
                    for i in range(ticked):
                        boxes.nth(i).uncheck()
                page.context.close()
        finally:
            server.shutdown()
            server.server_close()
    return {k: statistics.median(v) for k, v in figures.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000, help="records in each metrics.jsonl")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bitlm-bench-dashboard-"))
    try:
        source = train_one(tmp, args.steps)
        size = (source / "metrics.jsonl").stat().st_size
        folders = {1: make_folder(source, tmp / "one", 1),
                   args.runs: make_folder(source, tmp / "many", args.runs)}
        browser = context = None
        chromium = shutil.which("chromium")
        if chromium:
            from playwright.sync_api import sync_playwright

            context = sync_playwright().start()
            browser = context.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
        results = {n: measure(f, n, args.repeats, browser) for n, f in folders.items()}
        if browser is not None:
            browser.close()
            context.stop()
        print(f"each run: metrics.jsonl of {args.steps} steps ({size / 1024:.0f} KB); median "
              f"of {args.repeats}")
        print(f"| what | 1 run | {args.runs} runs | ratio |")
        print("|---|---:|---:|---:|")
        names = {"cold": "/api/runs, first", "warm": "/api/runs, refresh (every 3 s)",
                 "page": "page load until the table is drawn",
                 "overlay1": "tick a run until its curve is drawn",
                 "overlay10": "tick 10 runs until their curves are drawn"}
        for key, label in names.items():
            many = results[args.runs].get(key)
            if many is None:
                continue
            one = results[1].get(key)
            print(f"| {label} | {'' if one is None else f'{one * 1000:.0f} ms'} | "
                  f"{many * 1000:.0f} ms | {'' if one is None else f'{many / one:.1f}x'} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
