"""Driving runs from a server: what the dashboard and the MCP server do on a client's behalf.

Both serve one runs folder and must not let a client reach past it, so every operation here
takes run *names* (resolved by :func:`bitlm_core.app.runs.resolve_run`) and plain data, and
returns plain data (JSON-ready dicts). Nothing a client sends is evaluated, imported or
executed: a spec is parsed as safe YAML and validated exactly as ``bitlm validate`` does
(:func:`check_spec`), and a training runs as its own ``bitlm run`` process, started with a fixed
argument list (:class:`Trainings`).

* :func:`check_spec` — the checks of ``bitlm validate``: keys, types, components and their
  options, memory, device.
* :func:`new_run_spec` — a spec for a new run made from an existing run's spec and a mapping
  of dotted overrides (the dashboard's form); the corpus and the output folder cannot be
  changed, so a client trains only on data the runs folder's owner chose, and only inside it.
* :class:`Trainings` — start (bounded in number) and stop (SIGINT: the run checkpoints and
  stays resumable) training processes.
* :func:`sample_run`, :func:`evaluate_text` — gated sampling, with every attempt, and bits per
  byte of a text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

from bitlm_core.app.runs import interrupt_holder, read_spec_dict, resolve_run
from bitlm_core.errors import BitlmError, DataError, SpecError

MAX_OVERRIDES = 64
MAX_SPEC_TEXT = 64 << 10
MAX_TEXT_BYTES = 1 << 20  # evaluate_text
MAX_SAMPLE_BYTES = 4096
MAX_RETRIES = 8
#: keys a client may not change: the data trained on and where the run is written
FIXED_KEYS = ("data.corpus", "output")
OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,8}")


def check_spec(spec: Any, source: str = "spec"):
    """Validate a spec (a RunSpec, or a mapping validated first) as ``bitlm validate`` does,
    building no tensors; returns its :class:`~bitlm_core.components.Components`."""
    from bitlm_core.app.build import check_memory, placement
    from bitlm_core.app.run import build_callbacks
    from bitlm_core.components import Components
    from bitlm_core.spec import RunSpec, validate_spec

    if not isinstance(spec, RunSpec):
        spec = validate_spec(dict(spec), source)
    comps = Components.build(spec)
    build_callbacks(comps)
    check_memory(comps.spec, comps)
    placement(comps.spec)
    return comps


def parse_spec_text(text: Any, source: str = "the submitted spec") -> dict[str, Any]:
    """A spec given as YAML text by a client (bounded; safe YAML)."""
    from bitlm_core.spec import parse_yaml

    if not isinstance(text, str):
        raise SpecError(f"{source} must be YAML text")
    if len(text.encode("utf-8", "replace")) > MAX_SPEC_TEXT:
        raise SpecError(f"{source} is larger than {MAX_SPEC_TEXT >> 10} KB")
    return parse_yaml(text, source)


def _outside(text: str, root: Path) -> bool:
    """Whether ``text`` names a file or folder outside ``root``: it looks like a path (a
    separator, a leading ``~`` or ``.``) or names something that exists from the server's
    folder, and resolves (links followed) outside ``root``."""
    candidate = Path(text).expanduser()
    try:
        pathlike = any(c in text for c in "/\\") or text.startswith(("~", ".")) \
            or candidate.exists()
        target = candidate.resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long: not a path we allow
        return True
    return pathlike and target != root and root not in target.parents


def check_paths(data: Any, runs_dir: Path, where: str = "", in_options: bool = False) -> None:
    """Refuse text in a component's ``options`` (where components take paths: a corpus file,
    a distillation teacher) that names a file or folder outside ``runs_dir``: a client may
    point a component at another run of the folder, never elsewhere on the machine."""
    root = Path(runs_dir).resolve()
    if isinstance(data, dict):
        for key, value in data.items():
            check_paths(value, runs_dir, f"{where}.{key}" if where else str(key),
                        in_options or key == "options")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            check_paths(value, runs_dir, f"{where}[{i}]", in_options)
    elif in_options and isinstance(data, str) and data and _outside(data, root):
        raise SpecError(f"{where}: {data[:80]!r} names a path outside the runs folder {root}; "
                        "a spec sent to this server may only name paths inside it")


def check_submitted(runs_dir: Path, text: Any, source: str = "the submitted spec"):
    """A whole spec sent by a client, validated: its paths inside ``runs_dir``
    (:func:`check_paths`), its output folder ignored; returns the Components."""
    raw = parse_spec_text(text, source)
    raw.pop("output", None)
    check_paths(raw, runs_dir)
    return check_spec(raw, source)


def _nested(items: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}`` (for :func:`check_paths`)."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return out


def _override_items(overrides: Any) -> list[str]:
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise SpecError("overrides must be a mapping of dotted keys to values, e.g. "
                        '{"train.steps": 200}')
    if len(overrides) > MAX_OVERRIDES:
        raise SpecError(f"at most {MAX_OVERRIDES} overrides at once")
    items = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not OVERRIDE_KEY.fullmatch(key):
            raise SpecError(f"override key {str(key)[:80]!r} is not a dotted spec key (letters, "
                            "digits and '_' between dots, e.g. train.steps)")
        if any(key == k or key.startswith(k + ".") for k in FIXED_KEYS):
            raise SpecError(f"override {key}: a run started here trains on its base run's "
                            "corpus and is written inside the runs folder; data.corpus and "
                            "output cannot be changed")
        if isinstance(value, (dict, list)) or not (value is None or isinstance(
                value, (str, int, float, bool))):
            raise SpecError(f"override {key}: give a single value (number, text, true/false)")
        items.append(f"{key}={json.dumps(value)}")
    return items


def new_run_spec(runs_dir: Path, base: str, name: str, overrides: Any = None,
                 validate_only: bool = False) -> tuple[Any, Path]:
    """The validated spec of a new run ``name`` made from run ``base``'s spec with
    ``overrides`` (dotted keys), and its folder (inside ``runs_dir``, new unless
    ``validate_only``)."""
    from bitlm_core.spec import apply_overrides

    base_dir = resolve_run(runs_dir, base)
    out = resolve_run(runs_dir, name, must_exist=False)
    if out.exists() and not validate_only:
        raise DataError(f"a run named {name!r} exists already; choose another name")
    base_raw = read_spec_dict(base_dir)
    if base_raw is None:
        raise DataError(f"run {base!r} has no readable spec.yaml")
    items = _override_items(overrides)
    check_paths(_nested(dict(overrides or {})), runs_dir)
    raw = apply_overrides(base_raw, items)
    if (raw.get("data") or {}).get("corpus") != (base_raw.get("data") or {}).get("corpus"):
        raise SpecError("the overrides change data.corpus; a run started here trains on its "
                        "base run's corpus")
    raw["output"] = {**(base_raw.get("output") or {}), "dir": str(out)}
    return check_spec(raw, f"the spec of run {base!r} with the overrides given").spec, out


class Trainings:
    """Training processes started by a server: at most ``limit`` at once.

    Each is ``python -m bitlm_core run SPEC --out RUN -q`` with the spec written to a private
    temporary folder (the run folder must be new when it starts) and its output logged there.
    """

    def __init__(self, runs_dir: Path, limit: int = 1):
        self.runs_dir = Path(runs_dir)
        self.limit = limit
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._scratch: Optional[Path] = None  # made at the first start
        self._lock = threading.Lock()

    @property
    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="bitlm-trainings-"))
        return self._scratch

    def running(self) -> list[str]:
        with self._lock:
            for name, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    del self.procs[name]
            return sorted(self.procs)

    def start(self, spec, out: Path) -> dict[str, Any]:
        """Start training ``spec`` (validated) into ``out``."""
        import yaml

        name = out.name
        spec_path = self.scratch / f"{name}.yaml"
        log = self.scratch / f"{name}.log"
        with self._lock:  # the count and the name checked and taken at once
            for other, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    del self.procs[other]
            if len(self.procs) >= self.limit:
                raise DataError(f"{self.limit} training run(s) started here are still going "
                                "(the limit); stop one or wait for it to finish")
            if name in self.procs or out.exists():
                raise DataError(f"a run named {name!r} exists already; choose another name")
            spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False),
                                 encoding="utf-8")
            with open(log, "wb") as f:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "bitlm_core", "run", str(spec_path), "--out",
                     str(out), "-q"], stdin=subprocess.DEVNULL, stdout=f,
                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.logs[name] = log
            threading.Thread(target=self.procs[name].wait, daemon=True).start()  # reaped
            return {"name": name, "pid": self.procs[name].pid, "started": True}

    def log_tail(self, name: str, limit: int = 4000) -> str:
        path = self.logs.get(name)
        if path is None:
            return ""
        try:
            data = path.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def stop(self, name: str) -> dict[str, Any]:
        """Ask run ``name`` to stop as Ctrl-C does: it checkpoints and can be resumed."""
        run_dir = resolve_run(self.runs_dir, name)
        pid = interrupt_holder(run_dir)
        if pid is None:
            with self._lock:
                proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                raise DataError(f"run {name!r} is not training")
            proc.send_signal(signal.SIGINT)  # started here, still starting up
            pid = proc.pid
        return {"name": name, "pid": pid, "stopping": True,
                "resume": f"bitlm run {run_dir / 'spec.yaml'} --out {run_dir}"}

    def close(self, timeout: float = 30.0) -> None:
        """Stop what was started here (each checkpoints) and wait for it."""
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        import shutil

        if self._scratch is not None:  # its specs and logs: ours alone
            shutil.rmtree(self._scratch, ignore_errors=True)


class LoadedRuns:
    """Loaded models by run folder and checkpoint (a few, least recently used dropped)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()  # one model use at a time: CPU-bound, not thread-safe

    def get(self, run_dir: Path):
        from bitlm_core.app.loading import load_run
        from bitlm_core.store.checkpoint import latest_checkpoint

        key = (str(run_dir), str(latest_checkpoint(run_dir)))
        if key not in self.cache:
            self.cache[key] = load_run(run_dir, log=lambda m: None, device="cpu")
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


def _bounded_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DataError(f"{name} must be a whole number from {low} to {high}, got "
                        f"{str(value)[:40]}")
    return value


def _floors(floors: Any) -> dict[str, float]:
    if floors is None:
        return {}
    if not isinstance(floors, Mapping) or len(floors) > 16:
        raise DataError("floors must be a mapping such as {\"c_floor\": 0.3, \"s_floor\": 0.5}")
    out = {}
    for key, value in floors.items():
        if not isinstance(key, str) or isinstance(value, bool) \
                or not isinstance(value, (int, float)):
            raise DataError(f"floor {str(key)[:40]!r} must be a number")
        out[key] = float(value)
    return out


def sample_run(loaded: LoadedRuns, runs_dir: Path, name: str, prompt: Any = "",
               n_bytes: Any = 200, seed: Any = 0, gate: Optional[str] = None,
               floors: Any = None, max_retries: Any = 0) -> dict[str, Any]:
    """A gated sample of run ``name``: the text, the verdict, every attempt with its metric
    values and reasons, and the gate's floors. A blocked sample is a result, not an error.
    ``gate`` (e.g. ``kcs``) with ``floors`` (its options) replaces the run's own gate."""
    from bitlm_core.app.generate import SafetyWarning, decompress_sample, safe_sample_with_retry
    from bitlm_core.registry import get_registry

    if not isinstance(prompt, str) or len(prompt.encode("utf-8", "replace")) > 4096:
        raise DataError("prompt must be text of at most 4096 bytes")
    n_bytes = _bounded_int(n_bytes, "bytes", 0, MAX_SAMPLE_BYTES)
    seed = _bounded_int(seed, "seed", 0, 2**63 - 1)
    max_retries = _bounded_int(max_retries, "max_retries", 0, MAX_RETRIES)
    floors = _floors(floors)
    run_dir = resolve_run(runs_dir, name)
    import warnings

    with loaded.lock:
        run = loaded.get(run_dir)
        comps, registry = run.comps, get_registry()
        telemetry = dict(comps.telemetry)
        the_gate = comps.gate
        if gate is not None or floors:
            gate_name = gate or run.spec.safety.gate.name
            if not isinstance(gate_name, str):
                raise DataError("gate must be the name of a safety gate, e.g. kcs")
            options = {**(run.spec.safety.gate.options
                          if gate_name == run.spec.safety.gate.name else {}), **floors}
            the_gate = registry.build("safety", gate_name, options, path="floors")
            for metric in registry.names("telemetry"):
                telemetry.setdefault(metric, registry.build("telemetry", metric))
        samplers = [comps.sampler]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SafetyWarning)
            tried = safe_sample_with_retry(run.model, comps.encoder, samplers, prompt, n_bytes,
                                           gate=the_gate, telemetry=telemetry, seed=seed,
                                           max_retries=max_retries, strict=False)
        result = {
            "run": name, "step": run.step, "text": tried.result.text,
            "allowed": tried.allowed, "gate": getattr(the_gate, "name", "none"),
            "floors": dict(getattr(the_gate, "floors", {}) or {}),
            "attempts": [{"number": a.number, "sampler": a.sampler, "seed": a.seed,
                          "allowed": a.allowed, "reasons": list(a.reasons),
                          "metrics": {k: float(v) for k, v in a.metrics.items()}}
                         for a in tried.attempts],
            "parity_fixed": int(tried.result.parity_fixed),
        }
        if run.spec.compression.decompress_output:
            text = decompress_sample(tried.result, comps)
            result["decompressed"] = text
            if text.startswith("(not a valid stream") or (
                    text.startswith("(") and " bits that are not " in text):
                result["message"] = (f"The sample is not a valid {run.spec.compression.name} "
                                     f"stream, so it could not be decompressed: {text[1:-1]}. "
                                     "The raw text is shown instead.")
        if not tried.allowed:
            result["message"] = ("The safety gate blocked every attempt: "
                                 + "; ".join(tried.attempts[-1].reasons)
                                 + ". Lower a floor or allow more retries to accept such text.")
            if run.spec.safety.strict:  # as `bitlm sample` prints nothing then
                result["text"] = None
                result.pop("decompressed", None)
                result["message"] += (" The text is withheld: the run has safety.strict "
                                      "(a blocked sample is an error, not an output).")
        return result


def evaluate_text(loaded: LoadedRuns, runs_dir: Path, name: str, text: Any) -> dict[str, Any]:
    """Bits per byte of run ``name``'s model on ``text`` (at most 1 MiB)."""
    from bitlm_core.app.evaluate import evaluate_bytes

    if not isinstance(text, str) or not text:
        raise DataError("text must be non-empty text")
    data = text.encode("utf-8")
    if len(data) > MAX_TEXT_BYTES:
        raise DataError(f"text is larger than {MAX_TEXT_BYTES >> 20} MiB; use `bitlm eval`")
    run_dir = resolve_run(runs_dir, name)
    with loaded.lock:
        run = loaded.get(run_dir)
        figures = evaluate_bytes(run, data, "the text")
    return {"run": name, "step": run.step, **{k: v for k, v in figures.items()
                                              if isinstance(v, (int, float, bool, str))}}


def describe(exc: BaseException) -> str:
    """The one-paragraph message a client is shown for an error."""
    if isinstance(exc, BitlmError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc)[:300]}"
