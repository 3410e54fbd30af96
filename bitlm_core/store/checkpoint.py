"""Checkpoints: safetensors tensors plus JSON metadata, written atomically, never unpickled.

Layout inside a run folder::

    checkpoints/step-000200/model.safetensors      model weights (float, or int8 with row
                                                   scales after `bitlm quantize`)
    checkpoints/step-000200/optimizer.safetensors  AdamW moments (tensors only)
    checkpoints/step-000200/state.json             step, model config, resolved spec, metrics,
                                                   optimizer hyper-parameters
    checkpoints/step-000200/sharded/shard-*.safetensors   instead of the two files above, with
                                                   distributed.strategy fsdp: each process's
                                                   part (bitlm_core.store.sharded); the last
                                                   checkpoint of a run adds model.safetensors
    checkpoints/step-000200/checksums.json         size and SHA-256 of each file above
    checkpoints/latest                             name of the newest complete step folder

A step folder is written under a temporary name (``.tmp-step-...``) and renamed into place when
complete; then ``latest`` is replaced atomically, and the oldest folders beyond
``output.keep_checkpoints`` are deleted (by step number, under the checkpoints lock of
:mod:`bitlm_core.store.lock`). A crash at any moment leaves the previous checkpoint usable.
Loading takes the newest checkpoint whose files match their checksums: a damaged one (a
truncated or flipped file) is skipped, saying so, for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from bitlm_core.errors import CheckpointError
from bitlm_core.store.atomic import atomic_write_text, fsync_dir
from bitlm_core.store.lock import checkpoint_lock
from bitlm_core.store.sharded import is_sharded, shard_files

FORMAT = "bitlm-checkpoint"
VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
CHECKSUMS = "checksums.json"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")  # what checksums cover
STEP = re.compile(r"step-(\d+)")
TEMPORARY = re.compile(r"\.tmp-step-\d+-\d+")
MAX_JSON_BYTES = 64 << 20  # a state.json or checksums.json larger than this is not bitlm's


def step_of(folder: Path) -> int | None:
    """The step a checkpoint folder is named for (``step-001200`` -> 1200), else None."""
    match = STEP.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def step_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is (``checkpoints/step-000200``)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def step_folders(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest step first (by number: step-1000000 after
    step-999999)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def optimizer_tensors(optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able groups."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer, tensors: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, t in tensors.items():
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"optimizer state does not match the model: {exc}") from None


def file_digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict[str, Any],
                    keep: int = 2, weights: dict[str, Any] | None = None,
                    weights_metadata: dict[str, str] | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically and point ``latest`` at it.

    ``weights`` replaces the model's own state dict (a quantized run saves int8 tensors);
    ``weights_metadata`` goes into the safetensors header (strings only).
    """
    tmp = temporary_folder(run_dir, step, os.getpid())
    with saving(run_dir, step, tmp):
        prepare_temporary(tmp)
        write_weights(tmp, model, weights, weights_metadata)
        groups: list[dict[str, Any]] = []
        if optimizer is not None:
            from safetensors.torch import save_file

            tensors, groups = optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        return commit_checkpoint(run_dir, step, tmp, meta, groups, keep)


def temporary_folder(run_dir: Path, step: int, pid: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (``pid``: of the
    process that commits it, so that two savers never share one)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-step-{step:06d}-{pid}"


def prepare_temporary(tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    remove_step_folder(tmp)
    tmp.mkdir(exist_ok=True)


def write_weights(tmp: Path, model, weights: dict[str, Any] | None = None,
                  weights_metadata: dict[str, str] | None = None) -> None:
    """``model.safetensors``: the model's weights, or ``weights`` instead (on the CPU)."""
    from safetensors.torch import save_file

    held = model.state_dict() if weights is None else weights
    save_file({k: v.detach().contiguous().cpu() for k, v in held.items()},
              str(tmp / "model.safetensors"), metadata=weights_metadata)


@contextmanager
def saving(run_dir: Path, step: int, tmp: Path) -> Iterator[None]:
    """Inside: a failure to write (a full disk, a folder gone read-only...) removes what was
    written of ``tmp`` and becomes a CheckpointError saying the previous checkpoint is
    intact."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        try:
            remove_step_folder(tmp)
        except OSError:
            pass
        previous = latest_checkpoint(Path(run_dir))
        kept = f"; {previous.name} is intact" if previous is not None else ""
        raise CheckpointError(f"cannot write the checkpoint of step {step} in "
                              f"{Path(run_dir) / CHECKPOINTS_DIR}: "
                              f"{getattr(exc, 'strerror', None) or exc}{kept}. Free some "
                              "space and run again to resume") from None


def commit_checkpoint(run_dir: Path, step: int, tmp: Path, meta: dict[str, Any],
                      groups: list[dict[str, Any]], keep: int) -> Path:
    """Complete a checkpoint whose tensors are in ``tmp``: state.json, checksums of every
    file, fsync, the rename into ``step-NNNNNN``, ``latest``, and the pruning of the oldest
    folders beyond ``keep``. Call it inside :func:`saving`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = step_path(run_dir, step)
    name = final.name
    state = {"format": FORMAT, "version": VERSION, "step": step,
             "optimizer_param_groups": groups, **meta}
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    sums = {f: file_digest(tmp / f) for f in payload_names(tmp)}
    (tmp / CHECKSUMS).write_text(json.dumps({"format": "bitlm-checksums", "files": sums},
                                            indent=2), encoding="utf-8")
    for f in [tmp / CHECKSUMS, *(tmp / n for n in sums)]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    with checkpoint_lock(run_dir, shared=False):
        remove_step_folder(final)
        if final.exists():  # it holds something bitlm did not write: move in beside it, one
            # file at a time, state.json and then the checksums last (a folder is complete
            # with a state.json, and sharded ones are trusted only with their checksums)
            names = sorted(payload_names(tmp), key=lambda n: n == "state.json")
            for entry in (*names, CHECKSUMS):
                (final / entry).parent.mkdir(exist_ok=True)
                os.replace(tmp / entry, final / entry)
            remove_step_folder(tmp)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, name + "\n")
        complete = [f for f in step_folders(run_dir) if is_complete(f)]
        for old in complete[:-keep]:  # a folder of someone else's files is not counted, and
            if old != final:  # the checkpoint just written is never pruned
                remove_step_folder(old)
    return final


def payload_names(folder: Path) -> list[str]:
    """The files of a checkpoint folder that its checksums cover, as relative names: those of
    :data:`FILES` that are there, and the shards of a sharded save."""
    from bitlm_core.store.sharded import SHARDED_DIR

    names = [f for f in FILES if (folder / f).is_file()]
    return names + [f"{SHARDED_DIR}/{p.name}" for p in shard_files(folder)]


def is_payload_name(name: str) -> bool:
    from bitlm_core.store.sharded import SHARD_FILE, SHARDED_DIR

    head, _, tail = name.partition("/")
    return name in FILES or (head == SHARDED_DIR and SHARD_FILE.fullmatch(tail) is not None)


def remove_step_folder(folder: Path) -> None:
    """Delete a checkpoint folder's files (only the ones bitlm writes), then the folder if
    that left it empty."""
    from bitlm_core.store.sharded import SHARDED_DIR

    if not folder.is_dir():
        return
    for name in (*FILES, CHECKSUMS):
        (folder / name).unlink(missing_ok=True)
    for shard in shard_files(folder):
        shard.unlink(missing_ok=True)
    for empty in (folder / SHARDED_DIR, folder):
        try:
            empty.rmdir()
        except OSError:  # something bitlm did not write is in it (or it is not there): leave it
            pass


def remove_temporary_folders(run_dir: Path) -> int:
    """Delete the ``.tmp-step-*`` folders an interrupted save left; how many there were. Call
    it only while holding the run lock (a running save's folder looks the same)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return 0
    leftovers = [p for p in root.iterdir() if p.is_dir() and TEMPORARY.fullmatch(p.name)]
    for p in leftovers:
        remove_step_folder(p)
    return len(leftovers)


def only_shards(folder: Path) -> bool:
    """A sharded checkpoint without the whole weights (saved during an FSDP run)."""
    return not (folder / "model.safetensors").is_file() and is_sharded(folder)


def is_complete(folder: Path) -> bool:
    """A folder with a state.json and weights: whole (model.safetensors) or sharded."""
    return (folder / "state.json").is_file() and ((folder / "model.safetensors").is_file()
                                                  or is_sharded(folder))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (files are not verified: see
    :func:`usable_checkpoint`)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        name = ""
    if STEP.fullmatch(name) and is_complete(root / name):
        return root / name
    complete = [p for p in step_folders(run_dir) if is_complete(p)]
    return complete[-1] if complete else None


def damage(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be trusted, or None when it can.

    With ``checksums.json`` every file must have the size and SHA-256 it was saved with; an
    older checkpoint without one must at least have a state.json and safetensors headers that
    parse.
    """
    if not is_complete(folder):
        return "its files are missing"
    if is_sharded(folder) and not (folder / CHECKSUMS).is_file():
        return f"its {CHECKSUMS} is missing (bitlm writes one with every sharded checkpoint)"
    if (folder / CHECKSUMS).is_file():
        try:
            files = _read_json(folder / CHECKSUMS)["files"]
            for name, expected in files.items():
                if not is_payload_name(name):
                    return f"{CHECKSUMS} names an unknown file {name[:40]!r}"
                path = folder / name
                if not path.is_file():
                    return f"{name} is missing"
                if path.stat().st_size != expected["bytes"]:
                    return (f"{name} has {path.stat().st_size:,} bytes, it was saved with "
                            f"{expected['bytes']:,}")
                if file_digest(path)["sha256"] != expected["sha256"]:
                    return f"{name} does not match its checksum (its bytes changed)"
        except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
            return f"{CHECKSUMS} is damaged ({exc})"
        return None
    try:
        read_state(folder)
        from safetensors import SafetensorError, safe_open

        for name in ("model.safetensors", "optimizer.safetensors"):
            if (folder / name).is_file():
                with safe_open(str(folder / name), framework="pt") as f:
                    f.keys()
    except CheckpointError as exc:
        return str(exc)
    except (SafetensorError, OSError) as exc:
        return f"its weights cannot be read ({exc})"
    return None


def usable_checkpoint(run_dir: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that is not damaged (:func:`damage`); a damaged newer one is
    skipped with a log line naming it and why. None when the run has no checkpoint; a
    CheckpointError when it has only damaged ones."""
    candidates = [p for p in reversed(step_folders(run_dir)) if is_complete(p)]
    latest = latest_checkpoint(run_dir)
    if latest is not None and latest in candidates:  # `latest` first: it names the newest save
        candidates.remove(latest)
        candidates.insert(0, latest)
    reasons = []
    for folder in candidates:
        reason = damage(folder)
        if reason is None:
            if reasons and log is not None:
                log(f"checkpoint {'; '.join(reasons)}: using {folder.name} instead")
            return folder
        reasons.append(f"{folder.name} is damaged ({reason})")
    if reasons:
        raise CheckpointError(f"every checkpoint of {run_dir} is damaged: {'; '.join(reasons)}."
                              " Train again with --restart")
    return None


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB; it is not "
                                  "a file bitlm wrote")
        return json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def read_state(ckpt: Path) -> dict[str, Any]:
    state = _read_json(ckpt / "state.json")
    if (not isinstance(state, dict) or state.get("format") != FORMAT
            or state.get("version") != VERSION):
        raise CheckpointError(f"{ckpt} is not a bitlm checkpoint of version {VERSION}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{ckpt / 'state.json'} has step {str(step)[:40]!r}, not a "
                              "step count; the file is damaged")
    for key, kind in (("elapsed", (int, float)), ("metrics", dict), ("model_config", dict),
                      ("optimizer_param_groups", list), ("processes", int)):
        value = state.get(key)
        if key in state and (isinstance(value, bool) or not isinstance(value, kind)):
            raise CheckpointError(f"{ckpt / 'state.json'} has a {key} of the wrong type; the "
                                  "file is damaged")
    return state


def weight_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a checkpoint's weights, read from the safetensors header (no
    tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    if only_shards(ckpt):
        from bitlm_core.store import sharded

        return sharded.weight_shapes(ckpt)
    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights from {ckpt}: {exc}") from None


def load_weights(ckpt: Path, model) -> str | None:
    """Load ``ckpt``'s weights into ``model``; returns the name of the quantizer that stored
    them (``None`` for float weights), whose ``prepare`` gives the model to run."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from bitlm_core.store.quantized import METADATA_KEY

    path = str(ckpt / "model.safetensors")
    if only_shards(ckpt):
        from bitlm_core.store.sharded import consolidated_weights

        weights, scheme = consolidated_weights(ckpt, model), None  # shards, in one process
    else:
        try:
            with safe_open(path, framework="pt") as f:
                scheme = (f.metadata() or {}).get(METADATA_KEY)
            weights = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read weights from {ckpt}: {exc}") from None
    if scheme is not None:
        weights = quantizer_call(scheme, ckpt, "dequantize", weights, model, str(ckpt))
    own = model.state_dict()
    for name, t in weights.items():
        if name in own and own[name].is_floating_point() and not t.is_floating_point():
            raise CheckpointError(
                f"{ckpt} holds integer weight tensors ({name!r}: {str(t.dtype)[6:]}) " + (
                    "but does not say how they were quantized; the file is damaged or not "
                    "written by bitlm" if scheme is None else
                    f"left over after reading it as {scheme}; the file is damaged"))
    missing, unexpected = set(own) - set(weights), set(weights) - set(own)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit the model built from its spec (missing: "
            f"{sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}). If an older bitlm "
            f"wrote it (framed models gained a frame-value input table and the 'joint' local "
            f"predictor), train it again: bitlm run SPEC --restart")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {ckpt} has tensors of the wrong shape: "
                              f"{str(exc).splitlines()[-1]}") from None
    return scheme


def quantizer(scheme: str, where: Path):
    """The installed quantizer that reads weights stored as ``scheme``, or a CheckpointError
    saying which plugin provides it."""
    from bitlm_core.registry import get_registry

    registry = get_registry()
    if registry.get("quantizer", scheme) is None:
        known = ", ".join(registry.names("quantizer"))
        raise CheckpointError(f"{where} holds weights in the format {scheme[:40]!r}, which no "
                              f"installed quantizer reads (installed: {known}); install the "
                              "plugin that wrote it (int8-dynamic and int4: pip install "
                              "plugins/quantization)")
    from bitlm_core.components import check_interface

    return check_interface(registry.get("quantizer", scheme),
                           registry.build("quantizer", scheme, path="--scheme"))


def quantizer_call(scheme: str, where: Path, method: str, *args):
    """``quantizer(scheme, where).method(*args)``; a failure that is not one of bitlm's own
    errors is the plugin's, named as such (a PluginError), not a traceback."""
    from bitlm_core.errors import BitlmError, PluginError
    from bitlm_core.plugins import describe_exception
    from bitlm_core.registry import get_registry

    component = quantizer(scheme, where)
    try:
        return getattr(component, method)(*args)
    except BitlmError:
        raise
    except Exception as exc:
        origin = get_registry().get("quantizer", scheme).origin
        raise PluginError(f"quantizer '{scheme}' from {origin} failed to {method} the weights "
                          f"of {where}: {describe_exception(exc)}") from exc


def load_optimizer(ckpt: Path, optimizer, state: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt / "optimizer.safetensors"
    if state.get("quantized"):
        raise CheckpointError(f"{ckpt} holds weights quantized by `bitlm quantize` and no "
                              "optimizer state: it is for eval and sample. Train on from the "
                              "original run folder")
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no optimizer state; cannot resume training from it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read the optimizer state of {ckpt}: {exc}") from None
    restore_optimizer(optimizer, tensors, state.get("optimizer_param_groups", []))

