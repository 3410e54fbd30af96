"""Callbacks: what happens around the training loop, one concern each.

A callback is an object with the six methods of :class:`Callback` (subclass it and override
the ones you need). Each is called with the :class:`~bitlm_core.engine.trainer.Trainer` (the
model, optimizer, dataset, spec, run folder, log and metrics writer) and the
:class:`~bitlm_core.engine.trainer.TrainState` (step, elapsed seconds, and ``metrics``, which
every checkpoint saves):

``on_fit_start(trainer, state)``
    before the first step of this session (a resumed run starts at ``state.step``).
``on_step(trainer, state, record)``
    after every optimizer step; ``record`` holds the step's figures (``loss``,
    ``bits_per_byte``, ``lr``, ``grad_norm``, ``step``, ``time``, ...).
``on_eval(trainer, state, result)``
    after each held-out evaluation; ``result`` has ``bits_per_byte``, ``bytes``, ``bound``.
``on_checkpoint(trainer, state, path)``
    after a checkpoint folder is complete.
``on_interrupt(trainer, state)``
    on Ctrl-C, before the interrupt goes on.
``on_end(trainer, state)``
    after the last step, or after a step at which a callback called ``request_stop``.

Callbacks run in the order they are given; bitlm's own come first (:data:`BUILTIN`) and a
spec's ``callbacks`` follow. In a job of several processes every process runs every callback
(a sharded model needs all of them in each forward pass); ``trainer.world.main`` is true in the
one process that writes files, and ``trainer.write_metrics`` and ``trainer.log`` already write
only there. A callback that reads the model's weights takes it from
:func:`current_model` (under ``strategy: pipeline`` each process trains one stage, and the
others' weights in its copy are current only once they are shared). Building one must be cheap
and do nothing: do the work in the events. Plugins provide callbacks through the
``bitlm_callbacks`` hook.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bitlm_core.engine.distributed import SOLO

#: bitlm's own callbacks, by record name, in the order they run at every step.
BUILTIN = ("log", "evaluation", "growth", "attention_maps", "telemetry", "progress",
           "checkpoint", "time_limit", "qat")


def current_model(trainer):
    """The trainer's model with every weight current (collective in a pipeline: every process
    calls it at the same step)."""
    whole = getattr(trainer, "whole_model", None)
    return whole() if whole is not None else trainer.model


def due(step: int, every: int, last: int) -> bool:
    """Whether something done every ``every`` steps (and at the last step) is done now."""
    return step % every == 0 or step == last


class Callback:
    """The events of a training run (see the module docs); every method does nothing here."""

    def on_fit_start(self, trainer, state) -> None:
        pass

    def on_step(self, trainer, state, record: dict[str, Any]) -> None:
        pass

    def on_eval(self, trainer, state, result: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer, state, path) -> None:
        pass

    def on_interrupt(self, trainer, state) -> None:
        pass

    def on_end(self, trainer, state) -> None:
        pass


class TrainLog(Callback):
    """``log``: every ``train.log_every`` steps, a ``train`` record with the step's figures and
    the means of the batches since the previous one (``raw/loss``, ``compressed/ratio``...),
    over every process of a job."""

    def on_step(self, trainer, state, record):
        t = trainer.spec.train
        if due(state.step, t.log_every, t.steps):
            means = trainer.means.drain()
            world = getattr(trainer, "world", SOLO)
            if world.group:
                means = world.mean_of(means)
            trainer.write_metrics({"split": "train", **record, **means})


class Evaluation(Callback):
    """``evaluation``: every ``train.eval_every`` steps and at the last, held-out bits per byte
    on ``train.eval_batches`` batches: a ``val`` record, ``state.metrics["val_bits_per_byte"]``,
    an ``on_eval`` event for the other callbacks, and a log line."""

    def on_step(self, trainer, state, record):
        from bitlm_core.engine.evaluation import evaluate

        t = trainer.spec.train
        if not due(state.step, t.eval_every, t.steps):
            return
        result = evaluate(current_model(trainer), trainer.objective, trainer.dataset, t.batch_size,
                          t.eval_batches, world=getattr(trainer, "world", SOLO))
        bpb = result["bits_per_byte"]
        trainer.write_metrics({"split": "val", "step": state.step, "bits_per_byte": bpb,
                               "bytes": result["bytes"],
                               **({"act/blocks": result["act_blocks"]}
                                  if "act_blocks" in result else {})})
        state.metrics.update(val_bits_per_byte=bpb)
        trainer.emit("on_eval", state, result)
        trainer.log(f"step {state.step:>6}  train loss {record['loss']:.4f}  "
                    f"held-out {bpb:.3f} bits/byte")


class Growth(Callback):
    """``growth``: grow the model with ``scaling.strategy`` after ``scaling.patience``
    evaluations without an improvement of ``min_delta``, at most ``max_growths`` times.

    The counters live in ``state.metrics`` (so a resumed run keeps them). The optimizer is
    rebuilt over the grown model and keeps the state of every parameter that survived, and of
    the trained part of every parameter that grew; a longer context lengthens the windows.
    """

    def on_eval(self, trainer, state, result):
        if trainer.scaling is not None and state.step < trainer.spec.train.steps:
            if self.plateaued(trainer, state, result["bits_per_byte"]):
                self.grow(trainer, state)

    def plateaued(self, trainer, state, bpb: float) -> bool:
        cfg, m, strategy = trainer.spec.scaling, state.metrics, trainer.scaling
        best = m.get("scaling/best_bpb")
        if best is None or bpb < best - cfg.min_delta:
            m["scaling/best_bpb"], m["scaling/stale"] = bpb, 0
            return False
        m["scaling/stale"] = m.get("scaling/stale", 0) + 1
        if m["scaling/stale"] < cfg.patience or m.get("scaling/growths", 0) >= cfg.max_growths:
            return False
        can = getattr(strategy, "can_grow", None)
        if can is not None and not can(trainer.model):
            return False
        next_frames = getattr(strategy, "next_frames", None)
        frames = next_frames(trainer.model) if next_frames else trainer.dataset.seq_frames
        data = trainer.dataset
        if frames > min(data.val.n_frames, data.train.n_frames):
            m["scaling/growths"] = cfg.max_growths  # do not try again
            trainer.log(f"step {state.step}: plateau, but a context of {frames} bytes does not "
                        f"fit the held-out split ({data.val.n_frames} bytes); not growing")
            return False
        return True

    def grow(self, trainer, state) -> None:
        from bitlm_core.engine.optim import carry_optimizer_state, make_optimizer
        from bitlm_core.errors import BitlmError

        model, strategy = trainer.model, trainer.scaling
        before = model.cfg
        old_state = trainer.optimizer.state  # keyed by parameter
        old_params = dict(model.named_parameters())
        if strategy.grow(model) is not model:
            raise BitlmError(f"scaling strategy '{trainer.spec.scaling.strategy.name}' returned "
                             "a new model; bitlm strategies grow the model in place")
        rewrap = getattr(trainer, "rewrap", None)
        if rewrap is not None:  # DDP: a new wrapper over the grown parameters
            rewrap()
        trainer.optimizer = make_optimizer(model, trainer.t)
        carry_optimizer_state(old_state, old_params, model, trainer.optimizer.state)
        if model.cfg.max_frames != trainer.dataset.seq_frames:
            trainer.dataset = dataclasses.replace(trainer.dataset,
                                                  seq_frames=model.cfg.max_frames)
        m = state.metrics
        m["scaling/growths"] = m.get("scaling/growths", 0) + 1
        m["scaling/stale"], m["scaling/best_bpb"] = 0, None
        describe = getattr(strategy, "describe", None)
        what = describe(before, model.cfg) if describe else trainer.spec.scaling.strategy.name
        trainer.write_metrics({"split": "scaling", "step": state.step, "change": what,
                               "parameters": model.num_parameters()})
        trainer.log(f"step {state.step}: training plateaued; scaled the model: {what}")


class AttentionMaps(Callback):
    """``attention_maps``: with ``attention.full_attn_logging``, at each evaluation, every
    layer's (heads, T, T) map of the first held-out window, as ``attention/step-N.safetensors``
    (keys ``layer0``, ``layer1``...)."""

    def on_eval(self, trainer, state, result):
        if trainer.spec.attention.full_attn_logging:
            self.save(trainer, state.step)

    def save(self, trainer, step: int):
        import torch
        from safetensors.torch import save

        from bitlm_core.engine.device import model_device
        from bitlm_core.model import eval_mode
        from bitlm_core.store.atomic import atomic_write_bytes
        from bitlm_core.store.rundir import ATTENTION_DIR

        model = current_model(trainer)
        window = next(trainer.dataset.val_batches(1, 1)).to(model_device(model))
        with eval_mode(model), torch.no_grad():
            _, maps = model(window, causal=True, return_attention=True)
        if any(m is None for m in maps):
            trainer.log("attention.full_attn_logging: the attention backend returned no maps; "
                        "use attention: {name: reference}, which returns them")
            return None
        if not getattr(trainer, "world", SOLO).main:  # every process ran the pass; one writes
            return None
        folder = trainer.run_dir / ATTENTION_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step}.safetensors"
        atomic_write_bytes(path, save({f"layer{i}": m[0].float().contiguous()
                                       for i, m in enumerate(maps)}))
        return path


class Telemetry(Callback):
    """``telemetry``: every ``telemetry.every`` steps and at the last, each telemetry metric on
    that step's training batch and on a held-out batch (a ``telemetry`` record with
    ``telemetry/train/<metric>`` and ``telemetry/val/<metric>``, also kept in
    ``state.metrics``), and the drift check of the held-out values: an ``alert`` record and a
    log line when a metric's recent mean moved by more than ``telemetry.drift_threshold``, and
    a stop when ``telemetry.drift_stop`` is on."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}

    def on_step(self, trainer, state, record):
        tcfg = trainer.spec.telemetry
        if not trainer.telemetry or not due(state.step, tcfg.every, trainer.spec.train.steps):
            return
        tel = self.record(trainer, state.step)
        trainer.write_metrics({"split": "telemetry", "step": state.step, **tel})
        state.metrics.update(tel)
        drift = self.check_drift(trainer, {k: v for k, v in tel.items()
                                           if k.startswith("telemetry/val/")}, state.step)
        if drift and tcfg.drift_stop:
            trainer.request_stop(f"telemetry drift ({drift}); telemetry.drift_stop is on")

    def record(self, trainer, step: int) -> dict[str, float]:
        """Telemetry on the training batch of ``step`` (a round trip would give the same bits)
        and on a held-out batch."""
        _, train_bits = trainer.windows(step - 1, 0)
        val_bits = next(trainer.dataset.val_batches(trainer.t.batch_size, 1))
        values = {**self.values(trainer, train_bits, "train"),
                  **self.values(trainer, val_bits, "val")}
        return getattr(trainer, "world", SOLO).mean_of(values)  # over the processes' rows

    @staticmethod
    def values(trainer, bits, split: str) -> dict[str, float]:
        """Every metric on ``bits`` with the model's probabilities (none for a non-causal
        model: metrics of them are left out), as ``{"telemetry/<split>/<metric>": value}``."""
        from bitlm_core.engine.telemetry import halting_depth, metric_values, next_bit_probs

        values = {}
        if trainer.objective.causal:
            model = current_model(trainer)
            probs = next_bit_probs(model, bits)
            values = halting_depth(model)  # ACT: how deep that pass went
        else:
            probs = None
        return {f"telemetry/{split}/{name}": v
                for name, v in {**metric_values(trainer.telemetry, bits, probs),
                                **values}.items()}

    def check_drift(self, trainer, values: dict[str, float], step: int):
        """Record the values; write and log (and return) the first drift alert, if any."""
        from bitlm_core.engine.telemetry import detect_metric_drift

        tcfg = trainer.spec.telemetry
        alert = None
        for key, value in values.items():
            history = self.history.setdefault(key, [])
            history.append(value)
            if tcfg.drift_threshold is None:
                continue
            drift = detect_metric_drift(history, tcfg.drift_window, tcfg.drift_threshold, key)
            if drift is not None and drift.alert:
                trainer.write_metrics({"split": "alert", "step": step, "metric": key,
                                       "previous": drift.previous, "recent": drift.recent,
                                       "change": drift.change})
                trainer.log(f"drift alert at step {step}: {drift}")
                alert = alert or drift
        return alert


class Progress(Callback):
    """``progress``: the progress bar's line (loss, bits per byte, the last held-out figure,
    the learning rate and the last held-out telemetry), when the trainer has a bar."""

    def __init__(self) -> None:
        self.task = None

    def on_fit_start(self, trainer, state):
        if trainer.progress is not None:
            self.task = trainer.progress.add_task("training", total=trainer.spec.train.steps,
                                                  completed=state.step, info="")

    def on_step(self, trainer, state, record):
        if self.task is None:
            return
        val = state.metrics.get("val_bits_per_byte", float("nan"))
        tel = "  ".join(f"{k.rsplit('/', 1)[1][:3]} {v:.2f}" for k, v in state.metrics.items()
                        if k.startswith("telemetry/val/"))
        compiled = getattr(trainer, "compile_seconds", 0.0)
        trainer.progress.update(self.task, completed=state.step, info=(
            f"loss {record['loss']:.4f}  bpb {record['bits_per_byte']:.3f}  val {val:.3f}  "
            f"lr {record['lr']:.2e}" + (f"  {tel}" if tel else "")
            + (f"  (compiled in {compiled:.0f} s, not counted)" if compiled else "")))


class Checkpointing(Callback):
    """``checkpoint``: a checkpoint every ``train.checkpoint_every`` steps, at the end of the
    run (or of an early stop), and on Ctrl-C."""

    def on_step(self, trainer, state, record):
        t = trainer.spec.train
        if state.step % t.checkpoint_every == 0 and state.step < t.steps:
            trainer.checkpoint(state)

    def on_interrupt(self, trainer, state):
        trainer.checkpoint(state)

    def on_end(self, trainer, state):
        trainer.checkpoint(state)


class QuantizationAware(Callback):
    """``qat``: with ``train.qat``, every linear layer computes with its weights rounded to the
    ``bits``-bit grid from ``start_step`` on (bitlm_core.model.quant), so that the int4
    quantizer later stores what the model learned to work with. Layers a growth adds join at
    the next step. It runs after the others, so that everything done at a step (evaluation,
    a checkpoint) sees the model that trained it; the end of a run (and loading it) puts the
    layers in the mode of its last step (:func:`~bitlm_core.model.quant.qat_for_step`). A
    record ``{"split": "qat", ...}`` marks the step it began."""

    def __init__(self) -> None:
        self.layers = 0

    def switch(self, trainer, step: int) -> None:
        from bitlm_core.model.quant import qat_for_step

        q = trainer.spec.train.qat
        if q is None or step > trainer.spec.train.steps:
            return
        count = qat_for_step(trainer.model, q, step)
        if count and count != self.layers:
            if self.layers == 0:
                trainer.log(f"train.qat: {count} linear layers on a {q.bits}-bit grid (groups "
                            f"of {q.group_size}) from step {step}")
            if step == max(1, q.start_step):  # the step it began (not again on a resume)
                trainer.write_metrics({"split": "qat", "step": step, "layers": count,
                                       "bits": q.bits, "group_size": q.group_size})
        self.layers = count

    def on_fit_start(self, trainer, state):
        self.switch(trainer, state.step + 1)  # the next step is the first of this session

    def on_step(self, trainer, state, record):
        self.switch(trainer, state.step + 1)


class TimeLimit(Callback):
    """``time_limit``: stop (with a checkpoint) once training has taken ``train.max_minutes``,
    counting every resumed session."""

    def on_step(self, trainer, state, record):
        minutes = trainer.spec.train.max_minutes
        if minutes is not None and state.elapsed > 60 * minutes:
            trainer.request_stop(f"train.max_minutes={minutes} reached")
