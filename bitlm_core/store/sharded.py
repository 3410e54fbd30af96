"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) in safetensors, never pickles.

A run with ``distributed.strategy: fsdp`` saves every checkpoint as shards: each process writes
the part of the weights and optimizer moments it holds into
``checkpoints/step-N/sharded/shard-0000R-model-00001-of-00001.safetensors`` through DCP's
safetensors writer (``HuggingFaceStorageWriter``, each shard's header records where its slices
sit in the whole tensor, as JSON). DCP's default format keeps its index in a pickle; this one
does not, so nothing here ever unpickles. Reading goes through DCP's safetensors reader, which
reassembles the slices for whatever sharding the reader has: a checkpoint saved by 2 processes
resumes in 1, 2 or 4 (the ``resharding`` of DCP), and one process reads it into a plain model
(:func:`consolidated_weights`) for ``bitlm eval``, ``sample`` and ``quantize``. A
``pipeline`` run saves the same way: every stage writes the optimizer moments of its own
parameters (the weights, shared beforehand, are the same in every process and written once).

Tensor names: ``model/<parameter>`` and ``optim/<parameter>/<exp_avg|exp_avg_sq|step>``. The
optimizer's hyper-parameters (learning rate, betas...) go into state.json, as for full
checkpoints.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bitlm_core.errors import CheckpointError

SHARDED_DIR = "sharded"
SHARD_FILE = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors")
MODEL, OPTIM = "model/", "optim/"


def shard_files(folder: Path) -> list[Path]:
    """The shard files of a checkpoint folder (``sharded/shard-...safetensors``), by name."""
    root = Path(folder) / SHARDED_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and SHARD_FILE.fullmatch(p.name))


def is_sharded(folder: Path) -> bool:
    return bool(shard_files(folder))


@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns, in one process, that it assumes one process: that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


def flat_state(model, optimizer=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(tensors by name, the optimizer's parameter groups) of a model (sharded by FSDP or
    whole) and its optimizer: what a sharded save writes and a sharded load fills in."""
    import torch
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    flat = {MODEL + k: v for k, v in get_model_state_dict(model).items()}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        for fqn, state in osd["state"].items():
            for key, value in state.items():
                flat[f"{OPTIM}{fqn}/{key}"] = value if torch.is_tensor(value) else \
                    torch.tensor(value)
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in osd["param_groups"]]
    return flat, groups


def save_shards(folder: Path, flat: dict[str, Any]) -> None:
    """This process's part of ``flat`` into ``folder/sharded`` (collective: every process of
    the group calls it with its own part; one process alone writes the whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with _quiet():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(Path(folder) / SHARDED_DIR),
                                                               save_distributed=True))


def _reader(folder: Path):
    """DCP's safetensors reader over the shards bitlm wrote, and nothing else: it would read
    every ``*.safetensors`` file of the folder, and one put there by someone else must not
    change the weights."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(Path(folder) / SHARDED_DIR))
    listing = reader.fs.ls
    reader.fs.ls = lambda path: [p for p in listing(path)
                                 if SHARD_FILE.fullmatch(Path(str(p)).name)]
    return reader


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's whole shape in a sharded checkpoint, by name, from the shards' headers
    (no tensor is read)."""
    if not is_sharded(folder):
        raise CheckpointError(f"{folder} holds no shards ({SHARDED_DIR}/ is missing or empty)")
    try:
        with _quiet():
            meta = _reader(folder).read_metadata()
        return {name: tuple(int(n) for n in md.size)
                for name, md in meta.state_dict_metadata.items()}
    except Exception as exc:  # safetensors, JSON or DCP errors of a damaged header
        raise CheckpointError(f"cannot read the shards of {folder}: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The model's tensors' whole shapes in a sharded checkpoint, by parameter name."""
    return {k[len(MODEL):]: v for k, v in stored_shapes(folder).items() if k.startswith(MODEL)}


def _load(folder: Path, flat: dict[str, Any], what: str) -> dict[str, Any]:
    """Fill ``flat`` (tensors, plain or sharded) from the shards; return the part that was
    stored (optimizer moments of a parameter that never had a gradient are not)."""
    import torch.distributed.checkpoint as dcp

    shapes = stored_shapes(folder)
    missing = sorted(k[len(MODEL):] for k in flat if k.startswith(MODEL) and k not in shapes)
    if missing:
        raise CheckpointError(f"the shards of {folder} do not fit {what} (missing: "
                              f"{missing[:5]}); resume with the spec the run was trained with, "
                              "or start again with --restart")
    wrong = [k for k, v in flat.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"the shards of {folder} do not fit {what}: {k} is "
                              f"{list(shapes[k])} there and {list(flat[k].shape)} in the model "
                              "built from the spec; resume with the spec the run was trained "
                              "with, or start again with --restart")
    present = {k: v for k, v in flat.items() if k in shapes}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(present, storage_reader=_reader(folder))
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointError(f"cannot read the shards of {folder}: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return present


def load_sharded(folder: Path, model, optimizer, groups: list[dict[str, Any]]) -> None:
    """Resume: the model's weights and the optimizer's moments from a sharded checkpoint, for
    however the model is sharded now (collective under FSDP: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    flat, current = flat_state(model, optimizer)
    if len(groups) == len(current):  # the hyper-parameters saved, for this optimizer's own
        groups = [{**g, "params": c["params"]}  # parameters (a pipeline's stage saved its own)
                  for g, c in zip(groups, current)]
    present = _load(folder, flat, "the model built from the spec")
    weights = {k[len(MODEL):]: v for k, v in present.items() if k.startswith(MODEL)}
    state: dict[str, dict[str, Any]] = {}
    for name, value in present.items():
        if name.startswith(OPTIM):
            fqn, _, key = name[len(OPTIM):].rpartition("/")
            state.setdefault(fqn, {})[key] = value
    try:
        set_model_state_dict(model, weights)
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(strict=False))
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"the optimizer state of {folder} does not fit the model: "
                              f"{str(exc)[:200]}") from None


def consolidated_weights(folder: Path, model) -> dict[str, Any]:
    """The whole weights of a sharded checkpoint as a plain state dict for ``model`` (built
    from the run's spec, in one process): the shards consolidated in memory."""
    flat = {MODEL + k: v.detach().clone() for k, v in model.state_dict().items()}
    present = _load(folder, flat, "the model built from the run's spec")
    return {k[len(MODEL):]: v for k, v in present.items()}
