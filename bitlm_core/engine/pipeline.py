"""Pipeline stages: the model's blocks split over the processes of a job (``strategy:
pipeline``), on ``torch.distributed.pipelining``'s GPipe schedule.

Stage ``r`` of ``S`` (process ``r``) runs a contiguous run of blocks (:func:`stage_blocks`):
the first stage also embeds the bits, the last also applies the final norm, the output head
and the next-bit cross-entropy. Each batch is split into ``distributed.microbatches``
micro-batches that flow forward through the stages and back (GPipe: all forwards, then all
backwards), so the stages work at the same time on different micro-batches.

Each process owns the parameters of its stage (:attr:`Pipeline.owner`): its optimizer updates
those only, and gradient clipping uses the norm over every stage's gradients. Every process
keeps a copy of the whole model, whose other stages' weights go stale while training; before
anything reads the model (evaluation, telemetry, a checkpoint, samples), the owners broadcast
their weights (:meth:`Pipeline.share_weights`). So a pipeline spreads the work, activations and
optimizer state of training over the processes, not the weights themselves.

What it trains: the causal objective of plain or checkpointed blocks, in fp32 or bf16; the rest
is refused when the spec is read (:data:`bitlm_core.spec.NOT_PIPELINED`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlm_core.engine.distributed import World, collective, stage_blocks
from bitlm_core.model.layers import autocast

#: parameters the last stage owns (after its blocks)
OUTPUT_PARTS = ("ln_f.", "head.", "local.")


#: parameters the first stage owns (the embeddings and position table); a layout's other
#: parameters must be named in one of these lists, or the pipeline refuses the model
INPUT_PARTS = ("pos.", "frame_table.", "frame_in.", "bos", "tok.", "phase.", "neighbour_mix.",
               "halt.")


def stage_of(name: str, ranges: list[range]) -> int:
    """The stage that owns parameter ``name``."""
    if name.startswith("blocks."):
        block = int(name.split(".")[1])
        return next(s for s, r in enumerate(ranges) if block in r)
    if name.startswith(OUTPUT_PARTS):
        return len(ranges) - 1
    if name.startswith(INPUT_PARTS):
        return 0
    raise ValueError(f"the pipeline does not know which stage computes parameter {name!r}; "
                     "add it to bitlm_core.engine.pipeline's INPUT_PARTS or OUTPUT_PARTS")


class StageModule(nn.Module):
    """What stage ``index`` computes: bits -> states (the first), states -> states, or states
    -> normed states (the last). The whole model is registered so that the schedule's gradient
    scaling reaches every parameter of the stage (the others get no gradient here)."""

    def __init__(self, model, index: int, ranges: list[range]):
        super().__init__()
        self.model, self.index, self.count = model, index, len(ranges)
        r = ranges[index]
        self.blocks = model.blocks[r.start:r.stop]

    def forward(self, x):
        m = self.model
        if self.index == 0:
            x = m.enter(m.causal_input(x))
        with autocast(m.cfg.precision, x.device):
            x, _ = m.run_blocks(x, True, blocks=self.blocks)
        x = x.float()  # stages hand each other fp32 states
        return m.ln_f(x) if self.index == self.count - 1 else x


class Pipeline:
    """This process's stage of ``model`` and the GPipe schedule that runs it."""

    def __init__(self, model, world: World, microbatches: int):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        from bitlm_core.engine.device import model_device

        self.model, self.world, self.microbatches = model, world, microbatches
        self.ranges = stage_blocks(model.cfg.n_layers, world.size)
        self.owner = {name: stage_of(name, self.ranges) for name, _ in model.named_parameters()}
        self.first, self.last = world.rank == 0, world.rank == world.size - 1
        stage = PipelineStage(StageModule(model, world.rank, self.ranges), world.rank,
                              world.size, model_device(model))
        # gradients are scaled by the loss itself (micro-batches x accumulation), so that
        # several schedule steps accumulate into one optimizer step
        self.schedule = ScheduleGPipe(stage, microbatches, loss_fn=self._loss,
                                      scale_grads=False)
        self.scale = 1.0
        self.figures: list[tuple[float, float]] = []  # (loss, accuracy) per micro-batch
        self.stale = False  # another stage's weights changed since they were last shared

    def parameters(self) -> list[nn.Parameter]:
        """The parameters of this process's stage (what its optimizer updates)."""
        return [p for name, p in self.model.named_parameters()
                if self.owner[name] == self.world.rank]

    def _loss(self, h, bits):
        logits = self.model.causal_head(h, bits).float()
        loss = F.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1).long())
        accuracy = float((logits.detach().argmax(-1) == bits).float().mean())
        self.figures.append((float(loss.detach()), accuracy))
        return loss * self.scale

    def run(self, bits, scale: float) -> None:
        """Forward and backward of ``bits`` (B, L) through every stage, gradients added to the
        parameters' ``.grad`` times ``scale`` (1 / accumulated batches); every process calls it
        with the same bits. The last stage keeps each micro-batch's loss and accuracy in
        :attr:`figures`."""
        self.scale, self.stale = scale / self.microbatches, True
        before = len(self.figures)
        with collective("running the pipeline's stages"):
            if self.first:
                self.schedule.step(bits, return_outputs=False)
            elif self.last:
                self.schedule.step(target=bits, return_outputs=False)
            else:
                self.schedule.step(return_outputs=False)
        # the first step also runs each stage once on buffers of the right shapes to learn
        # them (the last stage's loss included): only the micro-batches' own figures count
        del self.figures[before:len(self.figures) - self.microbatches]

    def step_figures(self) -> tuple[float, float]:
        """(loss, accuracy) means of the micro-batches run since the last call, on every
        process (the last stage has them: a sum where the others add zeros)."""
        n = len(self.figures)
        own = [sum(f[i] for f in self.figures) / n if n else 0.0 for i in (0, 1)]
        self.figures = []
        loss, accuracy = self.world.sum(own if self.last else [0.0, 0.0])
        return loss, accuracy

    def clip(self, max_norm: float) -> float:
        """Clip every stage's gradients to a total norm of ``max_norm`` over all of them (as
        ``clip_grad_norm_`` on the whole model); the norm before clipping, 0 when disabled."""
        if max_norm <= 0:
            return 0.0
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        own = float(sum(g.detach().float().pow(2).sum() for g in grads)) if grads else 0.0
        total = math.sqrt(self.world.sum([own])[0])
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.mul_(coef)
        return total

    def share_weights(self) -> None:
        """Every stage's weights to every process (collective): each parameter is broadcast
        by its owner. Nothing is sent when no step ran since the last time."""
        import torch.distributed as dist

        if not self.stale:
            return
        with collective("sharing the stages' weights"), torch.no_grad():
            for name, p in self.model.named_parameters():
                dist.broadcast(p.data, src=self.owner[name])
        self.stale = False


def pipeline_for(model, world: World, spec) -> Any:
    """The :class:`Pipeline` of a job with ``strategy: pipeline``, else None."""
    if not world.pipelined:
        return None
    return Pipeline(model, world, spec.distributed.microbatches)
