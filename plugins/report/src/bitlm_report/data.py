"""What a report shows of one run, read (bounded) from its folder by core's readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bitlm_core.app.runs import (read_json_file, curves, json_safe, read_metrics, read_spec_dict,
                                 run_info)
from bitlm_core.errors import DataError
from bitlm_core.store.rundir import SUMMARY_FILE

MAX_RECORDS_BYTES = 512 << 20  # of metrics.jsonl read for one report


def load(run_dir: Path) -> dict[str, Any]:
    """``{"name", "info", "curves", "summary", "spec"}`` of a run folder."""
    from bitlm_core.app.runs import is_run

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(f"{run_dir} does not exist; give run folders written by `bitlm run`")
    if not is_run(run_dir):
        raise DataError(f"{run_dir} is not a bitlm run folder (no .bitlm-run and spec.yaml); "
                        "give folders written by `bitlm run`")
    records, offset = [], 0
    while offset < MAX_RECORDS_BYTES:
        chunk, new = read_metrics(run_dir, offset)
        records += chunk
        if new == offset:
            break
        offset = new
    return {"name": run_dir.name, "info": run_info(run_dir), "curves": curves(records),
            "summary": read_json_file(run_dir / SUMMARY_FILE) or {},
            "spec": read_spec_dict(run_dir) or {}}


def time_of(curves: dict[str, Any], steps: list[int]) -> list[float]:
    """Seconds at each of ``steps``, interpolated from the training steps' times."""
    import bisect

    ts, secs = curves["time"]["step"], curves["time"]["seconds"]
    if not ts:
        return [0.0 for _ in steps]
    out = []
    for s in steps:
        i = bisect.bisect_left(ts, s)
        if i < len(ts) and ts[i] == s:
            out.append(secs[i])
        elif i == 0:
            out.append(secs[0] * s / ts[0] if ts[0] else secs[0])
        elif i == len(ts):
            out.append(secs[-1])
        else:
            a, b = ts[i - 1], ts[i]
            out.append(secs[i - 1] + (secs[i] - secs[i - 1]) * (s - a) / (b - a))
    return out


def to_json(value: Any) -> str:
    """JSON safe to put inside a ``<script>`` element: every ``<`` escaped, so no ``</script>``
    or ``<!--`` in a sample's text can end or change the element."""
    return json.dumps(json_safe(value), allow_nan=False, default=str).replace("<", "\\u003c")
