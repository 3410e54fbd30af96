"""The training loop: optimizer steps, and callbacks for everything that happens around them.

:meth:`Trainer.fit` is the loop (schedule, micro-batches, clip, step, then the callbacks);
:meth:`Trainer.step` is one optimizer step. Evaluation, checkpoints, telemetry and drift,
growth, attention maps, the progress bar and the time limit are callbacks
(:mod:`bitlm_core.engine.callbacks`), each told about the run through the events of
:class:`~bitlm_core.engine.callbacks.Callback`.

Reproducibility: the model is initialised from ``train.seed``; the batch of step ``s`` is drawn
from a generator seeded with ``(seed, s)`` and dropout from ``seed`` and ``s`` too, so a run
resumed from a checkpoint continues exactly as if it had never stopped.

In several processes (:mod:`bitlm_core.engine.distributed`) each takes its own rows of the
windows drawn for the step (the same for every process count) and its own dropout (rank 0's is
one process's); the figures of each step are averaged over the processes, and they stop
together. A pipeline's stages (:mod:`bitlm_core.engine.pipeline`) each take the whole batch
through their own blocks; read the model through :meth:`Trainer.whole_model` there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from bitlm_core.engine.compression import CompressionFeed, RoundTrip, compression_prob
from bitlm_core.engine.device import grad_scaler, model_device
from bitlm_core.engine.distributed import (SOLO, World, accumulating, full_weights, micro_batch,
                                           save_sharded, wrap)
from bitlm_core.engine.optim import clip_gradients, lr_at, make_optimizer
from bitlm_core.engine.pipeline import pipeline_for
from bitlm_core.engine.runtime import Interrupted, StepBoundary, signal_name
from bitlm_core.engine.telemetry import Regularisers
from bitlm_core.errors import BitlmError, PluginError
from bitlm_core.model.act import latest_ponder
from bitlm_core.plugins import describe_exception
from bitlm_core.spec import RunSpec
from bitlm_core.store.checkpoint import save_checkpoint
from bitlm_core.store.rundir import MetricsLog


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumed sessions
    metrics: dict[str, Any] = field(default_factory=dict)  # saved with every checkpoint


@dataclass
class Batch:
    """A micro-batch of windows (B, L), and its codec round trip when it was drawn for one."""

    bits: Any
    trip: Optional[RoundTrip] = None


class RunningMeans:
    """Means of per-batch figures since the last log line (``raw/loss``, ``reg/K``, ...), and
    how many raw and compressed batches they cover (``raw/batches``)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def drain(self) -> dict[str, float]:
        out: dict[str, float] = {k: s / self.counts[k] for k, s in self.sums.items()}
        for split in ("raw", "compressed"):
            if f"{split}/loss" in self.counts:
                out[f"{split}/batches"] = self.counts[f"{split}/loss"]
        self.sums, self.counts = {}, {}
        return out


def dropout_seed(seed: int, step: int, rank: int = 0) -> int:
    """torch's seed for the dropout of ``step`` in process ``rank``: every process draws its
    own masks, and rank 0 draws those of a run in one process."""
    if rank == 0:
        return seed * 1_000_003 + step
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    """Runs the optimizer steps of one run folder.

    Callbacks read what they need from the trainer: ``spec``, ``model``, ``objective``,
    ``dataset``, ``optimizer``, ``telemetry`` (metrics by name), ``scaling`` (a strategy or
    None), ``run_dir``, ``progress`` (a rich Progress or None), ``log`` (one line of text) and
    ``means``; they write records with :meth:`write_metrics`, save with :meth:`checkpoint`,
    tell each other with :meth:`emit` and end the run with :meth:`request_stop`.
    """

    def __init__(self, spec: RunSpec, model, objective, dataset, run_dir: Path,
                 meta: Callable[[TrainState], dict[str, Any]], compressor=None, encoder=None,
                 telemetry: Mapping[str, Any] | None = None,
                 regularisers: Mapping[str, tuple[float, Any]] | None = None, scaling=None,
                 callbacks: Sequence[Any] = (), progress=None,
                 log: Callable[[str], None] = print, world: World = SOLO):
        self.spec, self.t = spec, spec.train
        self.model, self.objective, self.dataset = model, objective, dataset
        self.run_dir, self.meta = Path(run_dir), meta
        self.feed = (CompressionFeed(compressor, encoder, spec.compression.name)
                     if compressor is not None else None)
        self.telemetry = dict(telemetry or {})
        self.regularisers = Regularisers(regularisers or {})
        self.scaling = scaling
        self.callbacks = list(callbacks)
        self.progress, self.log = progress, log
        self.world, self.micro = world, micro_batch(spec, world.size)
        # what a step calls: DDP around the model, or the model sharded by FSDP (in place,
        # before the optimizer is built over its shards), or the model in one process
        self.wrapped = wrap(model, world, self.t.precision)
        self.pipeline = pipeline_for(model, world, spec)  # this process's stage, or None
        self.optimizer = make_optimizer(model, self.t, None if self.pipeline is None else
                                        self.pipeline.parameters())
        self.device = model_device(model)  # batches are moved here, once each
        self.scaler = grad_scaler(self.device, self.t.precision)  # fp16's; else does nothing
        self.net = self.wrapped  # what the objective calls: the wrapped model, or compiled
        self.compile_seconds = 0.0
        self.final_weights: dict[str, Any] | None = None  # the last save's whole weights
        self.gathered = False  # they were gathered (rank 0 holds them, the others None)
        self.ending = False  # the run's last steps are done: on_end is under way
        self.means = RunningMeans()
        self.metrics = MetricsLog(self.run_dir)
        self.stop_reason: str | None = None

    # -- what callbacks use -----------------------------------------------------------------
    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.world.main:  # rank 0 writes the run folder
            self.metrics.write(record)

    def emit(self, event: str, state: TrainState, *args) -> None:
        """Call ``event`` (``on_step``, ``on_eval``, ...) of every callback, in order. An
        exception from a plugin's callback becomes a PluginError naming the callback."""
        for callback in self.callbacks:
            try:
                getattr(callback, event)(self, state, *args)
            except BitlmError:
                raise
            except Exception as exc:
                owner = type(callback).__module__
                if owner.startswith("bitlm_core."):  # a bug of bitlm's own: as it is
                    raise
                raise PluginError(f"training callback {type(callback).__qualname__} ({owner}) "
                                  f"raised in {event}: {describe_exception(exc)}") from exc

    def request_stop(self, reason: str) -> None:
        """End the run after this step (with a checkpoint); the first reason given is kept."""
        self.stop_reason = self.stop_reason or reason

    def checkpoint(self, state: TrainState) -> Path:
        """Save a checkpoint of ``state`` (every process calls it). Sharded (``fsdp``,
        ``pipeline``): each process writes its shards, and at the end of the run
        (:attr:`ending`) rank 0 adds the whole weights, which :attr:`final_weights` keeps for
        sampling; else rank 0 writes it.
        It is complete, and ``latest`` names it, only once every process has written."""
        whole = self.ending
        self.whole_model()
        meta = self.meta(state)
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict()
        keep = self.spec.output.keep_checkpoints
        if self.world.sharded:
            path, weights = save_sharded(self.world, self.run_dir, state.step, self.model,
                                         self.optimizer, meta, keep, whole)
            if whole:
                self.final_weights, self.gathered = weights, True
        else:
            from bitlm_core.store.checkpoint import step_path

            path = step_path(self.run_dir, state.step)
            if self.world.main:
                path = save_checkpoint(self.run_dir, state.step, self.model, self.optimizer,
                                       meta, keep=keep)
            self.world.barrier("saving a checkpoint")
        self.emit("on_checkpoint", state, path)
        return path

    def rewrap(self) -> None:
        """After the model changed shape (a growth), under DDP: wrap it again (DDP's buckets
        are built for the parameters it was given), and compile that when training compiles.
        In one process nothing changes: a compiled model follows the model it compiles."""
        if not (self.world.group and self.world.strategy == "ddp"):
            return
        self.wrapped = wrap(self.model, self.world, self.t.precision)
        self.net = self.compiled() if self.t.compile else self.wrapped

    def compiled(self):
        """``torch.compile`` of what a step calls, in ``train.compile``'s mode."""
        return torch.compile(self.wrapped,
                             mode="max-autotune" if self.t.compile == "max-autotune" else None)

    def release(self) -> None:
        """Drop the wrapper (DDP) and compiled form of the model, before the process group is
        destroyed: a DDP wrapper freed after it would take the group's last reference and
        destroy it while holding the GIL, which gloo's threads may be waiting for."""
        self.net = self.wrapped = self.model

    def whole_model(self):
        """The model with every weight current: a pipeline's stages share theirs first
        (collective: every process calls it; a no-op in any other job)."""
        if self.pipeline is not None:
            self.pipeline.share_weights()
        return self.model

    def inference_model(self):
        """A model for sampling at the end of the run: the trained model, or on rank 0 a
        whole copy of a sharded one (collective under FSDP; the others get None)."""
        world = self.world
        if not world.gathers:
            return self.whole_model()
        weights = self.final_weights if self.gathered else full_weights(self.model, world)
        if not world.main:
            return None
        from bitlm_core.model import BitTransformerLM

        whole = BitTransformerLM(self.model.cfg, self.model.blocks[0].attn.backend)
        whole.load_state_dict(weights)
        return whole.to(self.device)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, state: TrainState) -> TrainState:
        """Train to ``train.steps``. A SIGINT or SIGTERM stops the loop between steps: the
        callbacks' ``on_interrupt`` saves, then :class:`Interrupted` is raised."""
        self.model.train()
        self.stop_reason = None
        if self.t.compile and self.net is self.wrapped:
            self.compile(state)
        self.emit("on_fit_start", state)
        started, before = time.perf_counter(), state.elapsed
        received = None
        with StepBoundary(self.log) as signals:
            try:
                while state.step < self.t.steps:
                    record = self.step(state)
                    state.step += 1
                    state.elapsed = before + time.perf_counter() - started
                    record.update(step=state.step, time=round(state.elapsed, 3))
                    self.emit("on_step", state, record)
                    received, stopping = self.world.agree(  # every process stops at one step
                        [signals.received or 0, self.stop_reason is not None])
                    if received or stopping:
                        break
            except KeyboardInterrupt:  # not held back (not the main thread): save what is
                self.emit("on_interrupt", state)
                raise
            if received:
                self.emit("on_interrupt", state)
                raise Interrupted(received, f"stopped at step {state.step} by "
                                  f"{signal_name(received)}; its checkpoint is saved: "
                                  "run the same command again to resume")
        self.ending = True
        self.emit("on_end", state)
        self.ending = False
        if state.step < self.t.steps:
            self.log(f"stopped early at step {state.step}: "
                     f"{self.stop_reason or 'another process of the job stopped'}")
        return state

    def compile(self, state: TrainState) -> None:
        """``train.compile``: ``torch.compile`` the model and compile its forward and backward
        on the next step's first micro-batch now, so that the time it takes is counted apart
        (:attr:`compile_seconds`) from training time. Nothing is updated: the warm-up runs a
        copy of the objective (an objective may count its calls, as a curriculum does), its
        gradients are dropped, and each step seeds its own randomness. When compiling fails, a
        warning says why and training goes on eagerly."""
        import copy

        try:
            warm_up = copy.deepcopy(self.objective)
        except Exception as exc:  # an objective holding what cannot be copied
            self.net = self.compiled()
            self.log(f"train.compile: the objective cannot be copied for a warm-up "
                     f"({describe_exception(exc)[:200]}); the model compiles during the first "
                     "step, whose time then includes it")
            return
        started = time.perf_counter()
        try:
            net = self.compiled()
            warm_up(net, self.batch(state.step, 0).bits).loss.backward()
        except Exception as exc:  # torch raises many kinds: a missing compiler, a backend's
            self.log(f"warning: train.compile: torch.compile failed, training eagerly "
                     f"instead ({describe_exception(exc)[:300]})")
            net = self.wrapped
        finally:
            del warm_up
            self.optimizer.zero_grad(set_to_none=True)
        self.net = net
        if net is not self.wrapped:
            self.compile_seconds = time.perf_counter() - started
            self.log(f"compiled the model in {self.compile_seconds:.1f} s (not counted as "
                     "training time)")

    def step(self, state: TrainState) -> dict[str, float]:
        """One optimizer step: the schedule's learning rate, ``grad_accum`` micro-batches whose
        gradients are averaged, clipping, the update (fp16: through the gradient scaler)."""
        lr = lr_at(state.step, self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(dropout_seed(self.t.seed, state.step, self.world.rank))
        self.optimizer.zero_grad(set_to_none=True)
        n = self.t.grad_accum
        if self.pipeline is not None:
            return self.pipeline_step(state, lr)
        loss_sum, bpb_sum, n_compressed = 0.0, 0.0, 0
        for micro in range(n):
            batch = self.batch(state.step, micro)
            with accumulating(self.wrapped, self.world, last=micro == n - 1):
                out = self.objective(self.net, batch.bits)
                self.scaler.scale(self.total_loss(batch, out, state.step) / n).backward()
            loss_sum += float(out.loss.detach())
            bpb_sum += out.bits_per_byte
            n_compressed += batch.trip is not None
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model, self.t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss, bpb = self.world.mean([loss_sum / n, bpb_sum / n])  # of the whole step's windows
        return {"loss": loss, "bits_per_byte": bpb, "lr": lr, "grad_norm": grad_norm,
                "compressed_batches": n_compressed}

    def pipeline_step(self, state: TrainState, lr: float) -> dict[str, float]:
        """:meth:`step` through a pipeline's stages: every process draws the micro-batches
        (the first stage feeds them, the last scores them), the stages run them, clip over all
        of them and update their own parameters."""
        n, pipe = self.t.grad_accum, self.pipeline
        for micro in range(n):
            pipe.run(self.batch(state.step, micro).bits, 1.0 / n)
        loss, accuracy = pipe.step_figures()
        if not math.isfinite(loss):
            raise BitlmError(f"loss became {loss} at step {state.step}; lower train.lr or "
                             "enable train.grad_clip")
        grad_norm = pipe.clip(self.t.grad_clip)
        self.optimizer.step()
        bpb = loss * self.model.frame_bits / math.log(2)
        for _ in range(n):  # one entry per micro-batch, as :meth:`total_loss` adds them
            self.means.add({"raw/loss": loss, "raw/bits_per_byte": bpb,
                            "raw/accuracy": accuracy})
        return {"loss": loss, "bits_per_byte": bpb, "lr": lr, "grad_norm": grad_norm,
                "compressed_batches": 0}

    # -- inside a step ----------------------------------------------------------------------
    def windows(self, step: int, micro: int):
        """(generator, windows) of a micro-batch: the same for a step whenever it is drawn."""
        rng = np.random.default_rng([self.t.seed, step, micro])
        return rng, self.dataset.train_batch(rng, self.micro, self.world.part)

    def batch(self, step: int, micro: int) -> Batch:
        """The micro-batch's windows, through the codec and back when drawn for it."""
        rng, bits = self.windows(step, micro)
        c = self.spec.compression
        if self.feed is None or rng.random() >= compression_prob(step, c.prob, c.warmup_steps,
                                                                 c.ramp_steps):
            return Batch(bits.to(self.device))
        trip = self.feed.round_trip(bits)
        return Batch(trip.bits.to(self.device), trip)

    def total_loss(self, batch: Batch, out, step: int):
        """The objective's loss, plus the regularisers and the direct-mode loss; their figures
        go to :attr:`means` (raw and compressed batches apart)."""
        if not torch.isfinite(out.loss.detach()):
            raise BitlmError(f"loss became {float(out.loss)} at step {step}; lower train.lr or "
                             "enable train.grad_clip")
        loss = out.loss
        ponder = latest_ponder(self.model)
        if ponder is not None:  # adaptive computation time: the cost of the blocks used
            loss = loss + self.spec.model.act.ponder_weight * ponder["cost"]
            self.means.add({"act/blocks": float(ponder["blocks"]),
                            "act/halted_early": float(ponder["halted_early"])})
        if self.regularisers and out.probs is not None:
            loss, values = self.regularisers(loss, batch.bits, out.probs)
            self.means.add({f"reg/{k}": v for k, v in values.items()})
        split = "raw" if batch.trip is None else "compressed"
        figures = {"loss": float(out.loss.detach()), "bits_per_byte": out.bits_per_byte}
        if "accuracy" in out.extras:
            figures["accuracy"] = out.extras["accuracy"]
        c = self.spec.compression
        if batch.trip is not None:
            figures["ratio"] = batch.trip.ratio
            if c.direct:
                direct = self.objective(self.net, self.feed.direct_batch(
                    batch.bits, batch.trip.streams).to(self.device))
                loss = loss + c.direct_weight * direct.loss
                self.means.add({"direct_loss": float(direct.loss.detach()),
                                "direct_bits_per_byte": direct.bits_per_byte})
        self.means.add({f"{split}/{k}": v for k, v in figures.items()})
        self.means.add({f"objective/{k}": float(v) for k, v in out.extras.items()
                        if k != "accuracy" and isinstance(v, (int, float))})
        return loss
