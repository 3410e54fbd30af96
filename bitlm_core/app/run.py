"""``bitlm run``: train (or resume), evaluate, sample, and write the run folder.

:func:`execute` is the whole command without the CLI around it, in four steps: build the
components, :func:`open_run` (folder, data, model, trainer, resumed state), ``Trainer.fit``,
:func:`finish_run` (final evaluation, samples, summary). The run folder's layout is
:mod:`bitlm_core.store.rundir`.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from bitlm_core.app.build import build_model, check_memory, fit_to_checkpoint, placement
from bitlm_core.app.generate import SampleResult, decompress_sample, generate
from bitlm_core.app.textstats import vocabulary, word_share
from bitlm_core.components import Components, build, check_interface
from bitlm_core.engine.callbacks import BUILTIN
from bitlm_core.engine.distributed import (SOLO, World, describe, lost, lost_process,
                                           micro_batch, start, stop)
from bitlm_core.engine.evaluation import evaluate
from bitlm_core.engine.runtime import set_threads, signals_as_interrupts
from bitlm_core.engine.trainer import Trainer, TrainState
from bitlm_core.registry import get_registry
from bitlm_core.spec import RunSpec
from bitlm_core.store.atomic import atomic_write_text
from bitlm_core.store.checkpoint import (load_optimizer, load_weights, read_state, step_of,
                                         step_path, usable_checkpoint)
from bitlm_core.store.lock import run_lock
from bitlm_core.store.rundir import (DATA_DIR, SAMPLES_FILE, SUMMARY_FILE, check_writable,
                                     prepare_run_dir)


def execute(spec: RunSpec, run_dir: Path | None = None, restart: bool = False,
            log: Callable[[str], None] = print, progress=None) -> dict[str, Any] | None:
    """Train (or resume), evaluate, sample; return the summary written to summary.json.

    Under torchrun every process calls it: rank 0 prepares and writes the run folder (and
    returns the summary), the others train beside it and return None."""
    comps = Components.build(spec)
    world, device = start(comps.spec, placement(comps.spec))
    try:
        check_job_memory(comps, world.size)
        if not world.main:  # rank 0 alone logs, shows progress and prints
            log, progress = (lambda message: None), None
        run_dir = Path(run_dir or comps.spec.run_dir())
        with signals_as_interrupts(), ExitStack() as lock:
            corpus = world.on_main("opening the run folder",
                                   lambda: _open_folder(comps, run_dir, lock))
            trainer, state, train_text = open_run(comps, run_dir, restart, log, progress,
                                                  corpus, device, world)
            try:
                if state.step < comps.spec.train.steps:
                    state = trainer.fit(state)
                return finish_run(trainer, state, comps, train_text)
            finally:
                trainer.release()  # DDP's hold on the process group goes before the group
    except Exception as exc:
        if world.group and lost_process(exc):
            raise lost(exc, "training") from None
        raise
    finally:
        stop(world)


def check_job_memory(comps: Components, processes: int) -> None:
    """The memory check for a job of ``processes`` (those on this machine counted: torchrun's
    LOCAL_WORLD_SIZE), FSDP's shards, a pipeline's stages and each process's micro-batch taken
    into account."""
    import os

    spec = comps.spec
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes)) if processes > 1 else 1
    check_memory(spec, comps, processes=local,
                 shards=processes if spec.distributed.strategy == "fsdp" else 1,
                 micro=micro_batch(spec, processes),
                 stages=processes if spec.distributed.strategy == "pipeline" else 1)


def _open_folder(comps: Components, run_dir: Path, lock: ExitStack) -> bytes:
    """Rank 0's first work: read the corpus (a corpus that cannot be used leaves no folder
    behind), check and create the folder, and take its run lock (held by ``lock``)."""
    corpus = read_corpus(comps)
    check_writable(run_dir)  # before anything is written, the lock file included
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.enter_context(run_lock(run_dir))
    return corpus


def read_corpus(comps: Components) -> bytes:
    """The run's corpus, read and checked (not empty; UTF-8 unless data.require_utf8 is off)."""
    from bitlm_core.engine.dataset import check_text

    spec = comps.spec
    data = build(comps.resolved["data.corpus"]).read()
    check_text(data, f"corpus '{spec.data.corpus.name}'", spec.data.require_utf8)
    return data


def load_dataset(spec: RunSpec, comps: Components, run_dir: Path, data: bytes | None = None):
    """The corpus (read now unless given) encoded into the run folder, and the training text
    (for the word share)."""
    from bitlm_core.engine.dataset import prepare_dataset

    data = read_corpus(comps) if data is None else data
    dataset = prepare_dataset(data, comps.encoder, spec.data.seq_len, spec.data.val_fraction,
                              run_dir / DATA_DIR, source=f"corpus '{spec.data.corpus.name}'",
                              require_utf8=spec.data.require_utf8)
    return dataset, data[: len(data) - dataset.val.n_frames]


def build_callbacks(comps: Components) -> list[Any]:
    """bitlm's own callbacks in their order, then the spec's ``callbacks``."""
    registry = get_registry()
    own = [registry.build("callback", name) for name in BUILTIN]
    return own + [check_interface(res.record, build(res)) for res in comps.resolved.values()
                  if res.kind == "callback"]


def open_run(comps: Components, run_dir: Path, restart: bool, log: Callable[[str], None],
             progress, corpus: bytes | None = None, device=None,
             world: World = SOLO) -> tuple[Trainer, TrainState, bytes]:
    """Prepare the folder (hold its run lock), data and model (on ``device``, default the
    spec's ``train.device``); resume from the newest usable checkpoint when there is one.
    Returns the trainer, the state to continue from, and the training text.

    In several processes rank 0 prepares the folder, stores the data and picks the checkpoint;
    the others then read the same."""
    spec = comps.spec
    device = placement(spec) if device is None else device
    set_threads(spec.train.threads)

    def prepare():
        resume = prepare_run_dir(spec, run_dir, restart)
        dataset, train_text = load_dataset(spec, comps, run_dir, corpus)
        ckpt = usable_checkpoint(run_dir, log) if resume else None
        return dataset, train_text, ckpt

    dataset, train_text, ckpt = world.on_main("opening the run folder", prepare) or \
        (None, b"", None)
    step = world.broadcast(-1 if ckpt is None else step_of(ckpt))
    if not world.main:
        from bitlm_core.engine.dataset import open_dataset

        dataset = open_dataset(run_dir / DATA_DIR, spec.data.seq_len)
        ckpt = None if step < 0 else step_path(run_dir, step)
    model = build_model(spec, comps)
    attention = getattr(comps.attention, "name", spec.attention.name)
    log(f"run folder {run_dir}  |  {spec.model.layout} model, {model.num_parameters():,} "
        f"parameters, attention {attention}  |  {dataset.train.n_frames:,} training bytes, "
        f"{dataset.val.n_frames:,} held-out  |  {device}"
        + (f", {spec.train.precision}" if spec.train.precision != "fp32" else ""))
    if world.group:
        log(describe(world, spec, micro_batch(spec, world.size)))

    def meta(state: TrainState) -> dict[str, Any]:
        return {"model_config": model.cfg.to_dict(), "spec": spec.to_dict(),
                "elapsed": state.elapsed, "metrics": state.metrics,
                "processes": world.size, "replicas": world.part[1]}

    saved = read_state(ckpt) if ckpt is not None else None
    if saved is not None:
        fit_to_checkpoint(model, saved, ckpt)  # before the optimizer is built over its parameters
        dataset = dataclasses.replace(dataset, seq_frames=model.cfg.max_frames)
    model.to(device)  # before the optimizer is built; checkpoints are saved from CPU copies
    trainer = Trainer(spec, model, comps.objective, dataset, run_dir, meta,
                      compressor=comps.compressor if spec.compression.prob > 0 else None,
                      encoder=comps.encoder, telemetry=comps.telemetry,
                      regularisers=comps.regularisers, scaling=comps.scaling,
                      callbacks=build_callbacks(comps), progress=progress, log=log,
                      world=world)
    state = TrainState()
    if saved is not None:
        resume_from(trainer, ckpt, saved)
        state = TrainState(step=saved["step"], elapsed=saved.get("elapsed", 0.0),
                           metrics=saved.get("metrics", {}))
        were = saved.get("processes", 1)
        log(f"resuming from {ckpt.name} (step {state.step} of {spec.train.steps})"
            + (f", saved by {were} process{'es' if were != 1 else ''}"
               if were != world.size else ""))
        replicas = saved.get("replicas", were)  # processes sharing a step's windows
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            replicas = were
        if replicas != world.part[1] and spec.distributed.global_batch is None:
            per_step = spec.train.batch_size * spec.train.grad_accum
            log(f"note: a step now trains on {per_step * world.part[1]} windows, it was "
                f"{per_step * replicas} with {were} process{'es' if were != 1 else ''}; "
                "distributed.global_batch keeps a step's windows whatever the process count")
        if world.main:
            dropped = trainer.metrics.truncate(state.step)
            if dropped:
                log(f"dropped {dropped} records of metrics.jsonl past step {state.step}: the "
                    "steps after the checkpoint are trained again")
    return trainer, state, train_text


def resume_from(trainer: Trainer, ckpt: Path, saved: dict[str, Any]) -> None:
    """The weights, optimizer state and gradient scaler of ``ckpt`` into ``trainer``: from
    shards (for however this job shards the model) or from whole files."""
    from bitlm_core.errors import CheckpointError
    from bitlm_core.store.sharded import is_sharded, load_sharded

    if trainer.world.sharded:
        if not is_sharded(ckpt):
            raise CheckpointError(f"{ckpt} holds whole weights, not the shards that "
                                  f"distributed.strategy {trainer.world.strategy} resumes "
                                  "from; resume with the strategy the run was trained with, "
                                  "or --restart")
        load_sharded(ckpt, trainer.model, trainer.optimizer,
                     saved.get("optimizer_param_groups", []))
    else:
        load_weights(ckpt, trainer.model)
        load_optimizer(ckpt, trainer.optimizer, saved)
    load_grad_scaler(trainer.scaler, saved, ckpt)


def load_grad_scaler(scaler, saved: dict[str, Any], ckpt: Path) -> None:
    """fp16: the gradient scaler's state from state.json (numbers only, checked), so that a
    resumed run scales its loss as the uninterrupted one would."""
    from bitlm_core.errors import CheckpointError

    held = saved.get("grad_scaler")
    if not scaler.is_enabled() or held is None:
        return
    keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    if (not isinstance(held, dict) or set(held) != keys
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in held.values())):
        raise CheckpointError(f"{ckpt / 'state.json'}: grad_scaler is not the state of a "
                              "gradient scaler; the checkpoint is damaged")
    scaler.load_state_dict(held)


def finish_run(trainer: Trainer, state: TrainState, comps: Components,
               train_text: bytes) -> dict[str, Any] | None:
    """Score the whole held-out split, write samples and the summary; return the summary (on
    rank 0; None on the other processes of a job, which only take part in the scoring)."""
    spec, world = comps.spec, trainer.world
    if spec.train.qat is not None:  # the mode of the last step, as loading the run gives
        from bitlm_core.model.quant import qat_for_step

        qat_for_step(trainer.model, spec.train.qat, state.step)
    final = evaluate(trainer.whole_model(), comps.objective, trainer.dataset,
                     spec.train.batch_size, world=world)
    model = trainer.inference_model()  # rank 0's whole model (every process takes part)
    if not world.main:
        return None
    trainer.write_metrics({"split": "val", "step": state.step, "final": True, **final})
    samples = [generate(model, comps.encoder, comps.sampler, spec.sample.prompt,
                        spec.sample.bytes, seed=spec.sample.seed + i, gate=comps.gate,
                        telemetry=comps.telemetry, strict=spec.safety.strict)
               for i in range(spec.sample.count)]
    vocab = vocabulary(train_text)
    shares = [word_share(s.text.encode("utf-8"), vocab) for s in samples]
    shares = [x for x in shares if x is not None]
    words_known = sum(shares) / len(shares) if shares else None
    write_samples(trainer.run_dir, samples, comps)
    summary = {
        "run_dir": str(trainer.run_dir), "steps": state.step,
        "train_seconds": round(state.elapsed, 2), "parameters": model.num_parameters(),
        "compile_seconds": round(trainer.compile_seconds, 2),
        "device": str(trainer.device), "precision": spec.train.precision,
        "processes": world.size, "strategy": spec.distributed.strategy,
        "layout": spec.model.layout, "held_out_bits_per_byte": final["bits_per_byte"],
        "held_out_bytes": final["bytes"], "is_bound": final["bound"],
        **({"act_blocks": final["act_blocks"]} if "act_blocks" in final else {}),
        "samples": [s.text for s in samples], "sample_words_in_training_text": words_known,
        "sample_verdicts": [{"seed": spec.sample.seed + i, "allowed": bool(s.decision),
                             "reasons": list(s.decision.reasons),
                             "metrics": {k: float(v) for k, v in s.decision.metrics.items()}}
                            for i, s in enumerate(samples)],
        "gate": {"name": spec.safety.gate.name,
                 "floors": dict(getattr(comps.gate, "floors", None) or {})},
    }
    atomic_write_text(trainer.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    if spec.output.report:
        write_reports([trainer.run_dir], trainer.run_dir, trainer.log)
    return summary


def write_reports(runs: list[Path], out: Path, log: Callable[[str], None]) -> list[Path]:
    """Every installed reporter's files about ``runs``, written into ``out``; a reporter that
    fails is logged (the run is complete without it) and the others go on."""
    from bitlm_core.registry import get_registry

    registry, written = get_registry(), []
    for name in registry.names("reporter"):
        try:
            written += registry.build("reporter", name).write(list(runs), Path(out))
        except Exception as exc:  # noqa: BLE001 - a report is never worth a failed run
            log(f"warning: reporter '{name}' failed ({type(exc).__name__}: {str(exc)[:300]}); "
                f"the run is complete; `bitlm report {out}` tries again")
    return written


def write_samples(run_dir: Path, samples: list[SampleResult], comps: Components) -> None:
    """``samples.txt``: each sample with its seed and gate verdict (and, with
    ``compression.decompress_output``, what it decompresses to)."""
    spec = comps.spec
    decompressed = ([decompress_sample(s, comps) for s in samples]
                    if spec.compression.decompress_output else [None] * len(samples))
    parts = []
    for i, (s, d) in enumerate(zip(samples, decompressed)):
        parts.append(f"--- sample {i} (seed {spec.sample.seed + i}"
                     f"{', blocked: ' + '; '.join(s.decision.reasons) if not s.decision else ''})"
                     f" ---\n{s.text}\n")
        if d is not None:
            parts.append(f"--- sample {i} read as a {spec.compression.name} stream ---\n{d}\n")
    atomic_write_text(run_dir / SAMPLES_FILE, "".join(parts))
