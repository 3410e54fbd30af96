"""The ``html`` reporter: ``report.html`` and ``plots/*.png`` for one run or several overlaid.

``report.html`` is one self-contained file: the PNGs are embedded (base64), the data behind
them is embedded as JSON (``<script type="application/json" id="bitlm-data">``, with buttons
that save it as JSON or CSV), and it references nothing outside itself, so it opens offline and
can be mailed. It shows the runs' settings and figures, the curves, growth events and alerts,
and each sample with its gate verdict, metric values and floors.

A report replaces only files it wrote before (``report.html`` carries a generator tag, each PNG
a ``Software`` entry): anything else of the same name in the folder is left alone and the
report refused with a message.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

from bitlm_core.errors import DataError
from bitlm_core.store.rundir import PLOTS_DIR, REPORT_FILE

from bitlm_report import plots
from bitlm_report.data import load, to_json

GENERATOR = '<meta name="generator" content="bitlm-report">'
COLUMNS = ("name", "status", "layout", "d_model", "layers", "heads", "seq_len", "steps",
           "batch", "lr", "objective", "compression", "compression_prob", "gate", "last_step",
           "train_bits_per_byte", "held_out_bits_per_byte", "parameters", "train_seconds")


def is_ours(path: Path, mark: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return mark in f.read(4096)
    except OSError:
        return False


def check_out(out: Path) -> None:
    """Refuse to replace a report.html or plot that this plugin did not write."""
    report = out / REPORT_FILE
    if report.exists() and not is_ours(report, GENERATOR.encode()):
        raise DataError(f"{report} exists and was not written by bitlm-report; move it or "
                        "choose another folder with --out")
    for name in plots.FIGURES:
        png = out / PLOTS_DIR / name
        if png.exists() and not is_ours(png, plots.SOFTWARE.encode()):
            raise DataError(f"{png} exists and was not written by bitlm-report; move it or "
                            "choose another folder with --out")


class HtmlReport:
    name = "html"

    def write(self, runs: Sequence[Path], out: Path) -> list[Path]:
        out = Path(out)
        if not runs:
            raise DataError("give at least one run folder")
        given = [Path(r).resolve() for r in runs]
        if len(set(given)) < len(given):
            raise DataError("a run folder is given twice; give each run once")
        from bitlm_core.app.runs import is_run

        if is_run(out) and out.resolve() not in given:
            raise DataError(f"{out} is another run's folder, whose report is its own; write "
                            "this report to a folder of its own with --out")
        loaded = [load(Path(r)) for r in runs]
        if out.exists() and not out.is_dir():
            raise DataError(f"{out} is a file; --out must be a folder")
        out.mkdir(parents=True, exist_ok=True)
        check_out(out)
        (out / PLOTS_DIR).mkdir(exist_ok=True)
        written, images = [], {}
        for name, draw in plots.FIGURES.items():
            fig = draw(loaded)
            path = out / PLOTS_DIR / name
            if fig is None:
                if path.exists():  # ours (checked above), from an earlier report
                    path.unlink()
                continue
            images[name] = plots.save(fig, path)
            written.append(path)
        from bitlm_core.store.atomic import atomic_write_text

        atomic_write_text(out / REPORT_FILE, page(loaded, images))
        written.append(out / REPORT_FILE)
        return written


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(runs: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(r['info'].get(c))}</td>" for c in COLUMNS)
                   + "</tr>" for r in runs)
    return f"<table class='runs'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _samples(run: dict[str, Any]) -> str:
    summary = run["summary"]
    texts = summary.get("samples") or []
    verdicts = summary.get("sample_verdicts") or []
    gate = summary.get("gate") or {}
    floors = gate.get("floors") or {} if isinstance(gate, dict) else {}
    if not texts:
        return "<p>No samples yet (the run has not finished).</p>"
    parts = []
    for i, text in enumerate(texts):
        v = verdicts[i] if i < len(verdicts) and isinstance(verdicts[i], dict) else {}
        allowed = v.get("allowed", True)
        verdict = ("allowed" if allowed else "blocked: " + "; ".join(map(str, v.get(
            "reasons", []))))
        metrics = v.get("metrics") or {}
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{_cell(val)}</td>"
            f"<td>{_cell(floors.get(k))}</td><td>"
            f"{'' if k not in floors else ('ok' if val >= floors[k] else 'below')}</td></tr>"
            for k, val in metrics.items() if isinstance(val, (int, float)))
        parts.append(
            f"<div class='sample {'ok' if allowed else 'blocked'}'><h4>sample {i} "
            f"(seed {_cell(v.get('seed'))}, gate {html.escape(str(gate.get('name', 'none')))}"
            f"): {html.escape(verdict)}</h4><pre>{html.escape(str(text))}</pre>"
            + (f"<table><tr><th>metric</th><th>value</th><th>floor</th><th></th></tr>{rows}"
               "</table>" if rows else "") + "</div>")
    return "".join(parts)


def _events(runs: list[dict[str, Any]]) -> str:
    items = [f"<li>{html.escape(r['name'])} step {e['step']}: {html.escape(e['kind'])} "
             f"({html.escape(e['text'])})</li>" for r in runs for e in r["curves"]["events"]]
    return f"<ul>{''.join(items)}</ul>" if items else "<p>None.</p>"


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;
font-size:12px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.runs{display:block;overflow-x:auto}img{max-width:100%;border:1px solid #eee}
.sample{border-left:4px solid #3a3;padding:0 .8em;margin:1em 0}.sample.blocked{border-color:#c33}
pre{white-space:pre-wrap;background:#fafafa;padding:.5em}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('bitlm-data').textContent);
  function save(name, text, type){
    var a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([text], {type: type}));
    a.download = name; document.body.appendChild(a); a.click(); a.remove();
  }
  document.getElementById('save-json').onclick = function(){
    save('bitlm-report.json', JSON.stringify(data, null, 1), 'application/json');
  };
  document.getElementById('save-csv').onclick = function(){
    var lines = ['run,series,step,value'];
    data.runs.forEach(function(r){
      Object.keys(r.curves.series).forEach(function(k){
        var s = r.curves.series[k];
        for (var i = 0; i < s.step.length; i++)
          lines.push([r.name, k, s.step[i], s.value[i]].join(','));
      });
    });
    save('bitlm-report.csv', lines.join('\\n') + '\\n', 'text/csv');
  };
})();
"""


def page(runs: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    title = "bitlm report: " + ", ".join(r["name"] for r in runs)
    figures = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(data).decode('ascii')}'></figure>" for name, data in images.items())
    samples = "".join(f"<h3>{html.escape(r['name'])}</h3>{_samples(r)}" for r in runs)
    data = {"runs": [{"name": r["name"], "info": r["info"], "curves": r["curves"],
                      "summary": r["summary"]} for r in runs]}
    return (f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR}"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{_table(runs)}"
            "<p><button id='save-json'>Save data as JSON</button> "
            "<button id='save-csv'>Save curves as CSV</button></p>"
            f"<h2>Curves</h2>{figures or '<p>No metrics logged yet.</p>'}"
            f"<h2>Growth events and alerts</h2>{_events(runs)}"
            f"<h2>Samples</h2>{samples}"
            f"<script type='application/json' id='bitlm-data'>{to_json(data)}</script>"
            f"<script>{SCRIPT}</script></body></html>")
