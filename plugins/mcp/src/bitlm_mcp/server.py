"""The MCP server: one tool per operation of :mod:`bitlm_core.app.control` and
:mod:`bitlm_core.app.runs`, on the official SDK's ``MCPServer``.

Each tool takes run *names* (kept inside the runs folder) and plain values; arguments are typed
(the SDK checks them against each tool's schema) and then checked by the same functions the
dashboard and the CLI use, so a bad spec or value gets the CLI's message. A
:class:`~bitlm_core.errors.BitlmError` becomes a tool error carrying that message; nothing a
client sends is evaluated or executed. stdout carries the protocol only: the SDK points the
process's stdout at stderr while it serves, trainings log to files, and logging goes to stderr.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from bitlm_core.app import control
from bitlm_core.app.runs import (curves, flock_holders, list_runs, read_metrics, resolve_run,
                                 run_info)
from bitlm_core.errors import BitlmError

MAX_POINTS = 2000  # per series in one read_metrics answer
METRICS_CHUNK = 8 << 20  # bytes of metrics.jsonl read per answer (ask again from its offset)
MAX_OFFSET = 1 << 53


def _thin(series: dict[str, Any], max_points: int) -> dict[str, Any]:
    """Every series cut down to at most ``max_points`` evenly spaced points (the last kept)."""
    out = {}
    for name, s in series.items():
        n = len(s["step"])
        if n <= max_points:
            out[name] = s
            continue
        keep = [n - 1] if max_points == 1 else sorted(
            {round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
        out[name] = {"step": [s["step"][i] for i in keep], "value": [s["value"][i] for i in keep]}
    return out


def _tool_errors(fn):
    """A BitlmError (bad input) is a tool error with bitlm's one-paragraph message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BitlmError as exc:
            raise ToolError(str(exc)) from None

    return wrapper


def build(runs_dir: Path, max_trainings: int = 1):
    """The server over ``runs_dir``, and its :class:`~bitlm_core.app.control.Trainings`
    (close it when the server ends: the trainings it started checkpoint and stop)."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    runs_dir = Path(runs_dir).resolve()
    trainings = control.Trainings(runs_dir, max_trainings)
    models = control.LoadedRuns()
    server = MCPServer("bitlm", instructions=(
        f"bitlm runs in {runs_dir}: bit-level language models. Figures are bits per byte "
        "(lower is better). Start runs from an existing run's spec with overrides; a stopped "
        "run keeps its checkpoint and resumes when started again with `bitlm run`."),
        log_level="WARNING")

    @server.tool(name="list_runs")
    @_tool_errors
    def list_runs_tool() -> list[dict[str, Any]]:
        """Every run in the runs folder: status (running, finished, stopped), the spec's main
        settings, the last training step's figures and the held-out bits per byte."""
        holders = flock_holders()
        return [run_info(r, holders) for r in list_runs(runs_dir)]

    @server.tool(name="read_metrics")
    @_tool_errors
    def read_metrics_tool(run: str, offset: int = 0, series: Optional[list[str]] = None,
                          max_points: int = 200) -> dict[str, Any]:
        """A run's logged curves from byte ``offset`` of its metrics.jsonl on (give the
        returned ``offset`` next time to get only new records). ``series`` picks names such as
        train/bits_per_byte, val/bits_per_byte, train/lr, telemetry/val/symbiosis (default:
        all); each series is thinned to ``max_points`` points. ``events`` are growths and
        alerts."""
        if not 1 <= max_points <= MAX_POINTS:
            raise BitlmError(f"max_points must be from 1 to {MAX_POINTS}")
        if not 0 <= offset <= MAX_OFFSET:
            raise BitlmError(f"offset must be from 0 to {MAX_OFFSET} (bytes of metrics.jsonl)")
        records, new = read_metrics(resolve_run(runs_dir, run), offset, METRICS_CHUNK)
        got = curves(records)
        chosen = {k: v for k, v in got["series"].items() if series is None or k in series}
        return {"run": run, "offset": new, "series": _thin(chosen, max_points),
                "events": got["events"], "available": sorted(got["series"])}

    @server.tool(name="validate_spec")
    @_tool_errors
    def validate_spec_tool(spec: str) -> dict[str, Any]:
        """Check a run spec given as YAML text, as `bitlm validate` does (keys, types,
        components, options, memory); returns the resolved spec, or an error saying what to
        fix. Paths in it must be inside the runs folder."""
        comps = control.check_submitted(runs_dir, spec, "the spec")
        return {"valid": True, "spec": comps.spec.model_dump(mode="json")}

    @server.tool(name="start_run")
    @_tool_errors
    def start_run_tool(base: str, name: str,
                       overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Start training a new run ``name`` from run ``base``'s spec with ``overrides``
        (dotted keys, e.g. {"train.steps": 200, "compression.prob": 0.5}); it trains on the
        base run's corpus, in its own process. Returns at once; follow it with
        read_metrics."""
        spec, out = control.new_run_spec(runs_dir, base, name, overrides)
        return trainings.start(spec, out)

    @server.tool(name="stop_run")
    @_tool_errors
    def stop_run_tool(run: str) -> dict[str, Any]:
        """Stop a training run as Ctrl-C does: it writes a checkpoint first and can be resumed
        with `bitlm run`."""
        return trainings.stop(run)

    @server.tool(name="evaluate_text")
    @_tool_errors
    def evaluate_text_tool(run: str, text: str) -> dict[str, Any]:
        """Bits per byte of a run's model on ``text`` (at most 1 MiB)."""
        return control.evaluate_text(models, runs_dir, run, text)

    @server.tool(name="sample")
    @_tool_errors
    def sample_tool(run: str, prompt: str = "", bytes: int = 200, seed: int = 0,
                    gate: Optional[str] = None, floors: Optional[dict[str, float]] = None,
                    max_retries: int = 0) -> dict[str, Any]:
        """Generate text from a run's model, judged by its safety gate (or ``gate`` with
        ``floors``, e.g. gate "kcs" with {"c_floor": 0.3, "s_floor": 0.5}); retries with new
        seeds up to ``max_retries``. Returns the text, whether it was allowed, and every
        attempt with its metric values and reasons."""
        return control.sample_run(models, runs_dir, run, prompt, bytes, seed, gate, floors,
                                  max_retries)

    return server, trainings
