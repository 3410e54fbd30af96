"""The PNG plots of a report, drawn with matplotlib's Agg backend (no screen needed).

One function per figure; each takes the loaded runs (:func:`bitlm_report.data.load`) so several
runs are overlaid, one colour per run. Training curves are drawn twice: the raw values faint,
a centred moving average over them; held-out evaluations are points joined by a line;
growth events are dotted vertical lines. Each function returns the figure, or None when the
runs have nothing to show in it (no telemetry, compression off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from bitlm_report.data import time_of


def smooth(values: list[float]) -> list[float]:
    """A centred moving average over about a 30th of the curve (no lag behind a falling
    loss, unlike an exponential average); the ends average what they have."""
    k = len(values) // 60
    if k == 0:
        return list(values)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    n = len(values)
    return [(sums[min(n, i + k + 1)] - sums[max(0, i - k)]) / (min(n, i + k + 1) - max(0, i - k))
            for i in range(n)]


#: PNG metadata that marks a file as this plugin's (so it may be replaced on the next report)
SOFTWARE = "bitlm-report"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _series(run: dict[str, Any], name: str) -> tuple[list, list]:
    s = run["curves"]["series"].get(name)
    return (s["step"], s["value"]) if s else ([], [])


def _mark_events(ax, run: dict[str, Any], colour: str, x_of=None) -> None:
    for event in run["curves"]["events"]:
        if event["kind"] == "growth":
            x = event["step"] if x_of is None else x_of([event["step"]])[0]
            ax.axvline(x, color=colour, linestyle=":", linewidth=1)
            ax.annotate("grew", (x, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color=colour, rotation=90, va="top", ha="right")


def bits_per_byte(runs: list[dict[str, Any]], against: str = "step"):
    """Training (raw and smoothed) and held-out bits per byte against steps or seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    shown = False
    for i, run in enumerate(runs):
        c, label = _colour(i), run["name"]
        steps, values = _series(run, "train/bits_per_byte")

        def x_of(s, run=run):
            return s if against == "step" else time_of(run["curves"], s)

        if steps:
            xs = x_of(steps)
            ax.plot(xs, values, color=c, alpha=0.25, linewidth=1)
            ax.plot(xs, smooth(values), color=c, linewidth=1.8, label=f"{label} train")
            shown = True
        vsteps, vvalues = _series(run, "val/bits_per_byte")
        if vsteps:
            ax.plot(x_of(vsteps), vvalues, color=c, marker="o", linestyle="--", markersize=4,
                    label=f"{label} held-out")
            shown = True
        fsteps, fvalues = _series(run, "final/bits_per_byte")
        if fsteps:
            ax.plot(x_of(fsteps[-1:]), fvalues[-1:], color=c, marker="*", markersize=12,
                    linestyle="none", label=f"{label} final {fvalues[-1]:.3f}")
        _mark_events(ax, run, c, None if against == "step" else x_of)
    if not shown:
        plt.close(fig)
        return None
    ax.set_xlabel("step" if against == "step" else "seconds of training")
    ax.set_ylabel("bits per byte")
    ax.set_title("Bits per byte" + (" against time" if against != "step" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _clip_start(ax, runs)
    fig.tight_layout()
    return fig


def _clip_start(ax, runs) -> None:
    """Keep the first steps' (very high) losses from squashing the rest of the curve."""
    values = [v for run in runs for v in _series(run, "train/bits_per_byte")[1][5:]]
    values += [v for run in runs for v in _series(run, "val/bits_per_byte")[1]]
    if values:
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or 0.1
        ax.set_ylim(low - pad, high + pad)


def learning_rate(runs: list[dict[str, Any]]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    shown = False
    for i, run in enumerate(runs):
        steps, values = _series(run, "train/lr")
        if steps:
            ax.plot(steps, values, color=_colour(i), label=run["name"])
            _mark_events(ax, run, _colour(i))
            shown = True
    if not shown:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _floors(run: dict[str, Any]) -> dict[str, float]:
    gate = run["summary"].get("gate") or {}
    floors = gate.get("floors") if isinstance(gate, dict) else None
    return {k: v for k, v in (floors or {}).items() if isinstance(v, (int, float))}


def telemetry(runs: list[dict[str, Any]]):
    """Each telemetry metric on training (solid) and held-out (dashed) batches, with the gate's
    floor where the run has one."""
    metrics = sorted({name.split("/", 2)[2] for run in runs for name in run["curves"]["series"]
                      if name.startswith("telemetry/")})
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.4 * len(metrics)), dpi=100,
                             sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for i, run in enumerate(runs):
            c = _colour(i)
            for split, style in (("train", "-"), ("val", "--")):
                steps, values = _series(run, f"telemetry/{split}/{metric}")
                if steps:
                    ax.plot(steps, values, color=c, linestyle=style, marker=".",
                            label=f"{run['name']} {split}")
            floor = _floors(run).get(metric)
            if floor is not None:
                ax.axhline(floor, color=c, linestyle=":", linewidth=1.2)
                ax.annotate(f"floor {floor:g}", (0, floor), xycoords=("axes fraction", "data"),
                            fontsize=7, color=c, va="bottom")
            _mark_events(ax, run, c)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title("Telemetry (K negentropy, C LZ complexity, S symbiosis)")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def compression(runs: list[dict[str, Any]]):
    """With compression on: loss on raw against compressed batches, and the ratio."""
    on = [run for run in runs if _series(run, "train/compressed/bits_per_byte")[0]]
    if not on:
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), dpi=100, sharex=True)
    for i, run in enumerate(runs):
        if run not in on:
            continue
        c = _colour(i)
        for name, style, what in (("train/raw/bits_per_byte", "-", "raw batches"),
                                  ("train/compressed/bits_per_byte", "--",
                                   "compressed batches")):
            steps, values = _series(run, name)
            if steps:
                top.plot(steps, smooth(values), color=c, linestyle=style,
                         label=f"{run['name']} {what}")
        steps, values = _series(run, "train/compressed/ratio")
        if steps:
            bottom.plot(steps, values, color=c, marker=".", label=run["name"])
    top.set_ylabel("bits per byte")
    top.set_title("Raw and compressed batches")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("compression ratio\n(input / output bits)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


#: file name in plots/ -> figure function (names also listed in core's rundir.PLOT_FILES)
FIGURES = {
    "bits_per_byte.png": lambda runs: bits_per_byte(runs, "step"),
    "bits_per_byte_time.png": lambda runs: bits_per_byte(runs, "time"),
    "lr.png": learning_rate,
    "telemetry.png": telemetry,
    "compression.png": compression,
}


def save(fig, path: Path) -> Optional[bytes]:
    """Write ``fig`` as a PNG marked as this plugin's; returns the PNG's bytes."""
    import io

    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": SOFTWARE})
    plt.close(fig)
    data = buf.getvalue()
    from bitlm_core.store.atomic import atomic_write_bytes

    atomic_write_bytes(path, data)
    return data
