"""The training engine: optimizer and schedule, the step loop, evaluation, checkpoints.

Reproducibility: the model is initialised from ``train.seed``; the batch of step ``s`` is drawn
from a generator seeded with ``(seed, s)`` and dropout from ``seed`` and ``s`` too, so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bitlm_core.checkpoint import save_checkpoint
from bitlm_core.dataset import BitDataset
from bitlm_core.errors import BitlmError
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.spec import RunSpec, TrainSection


def model_config(spec: RunSpec, encoder) -> ModelConfig:
    m = spec.model
    return ModelConfig(layout=m.layout, frame_bits=encoder.frame_bits,
                       frame_parity=bool(getattr(encoder, "has_parity", False)),
                       max_frames=spec.data.seq_len,
                       d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                       d_ff=m.d_ff or 4 * m.d_model, dropout=m.dropout,
                       local=m.local, local_layers=m.local_layers, local_dim=m.local_dim or m.d_model)


def set_threads(threads: int | str) -> None:
    if threads != "auto":
        torch.set_num_threads(int(threads))


def lr_at(step: int, t: TrainSection) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``t.steps``.

    ``step`` counts optimizer steps (not micro-batches), so the horizon is the real number of
    updates whatever ``grad_accum`` is.
    """
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, t.steps - warmup)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, t: TrainSection) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms or embeddings' 1-D vectors)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2))


@torch.no_grad()
def score_batches(model, objective, batches, frame_bits: int) -> tuple[float, int]:
    """(bits per byte, bytes) over batches of windows, each batch weighted by its bytes."""
    was_training = model.training
    model.eval()
    total, n_bytes = 0.0, 0
    try:
        for batch in batches:
            frames = batch.numel() // frame_bits
            total += objective(model, batch).bits_per_byte * frames
            n_bytes += frames
    finally:
        model.train(was_training)
    return (total / n_bytes if n_bytes else float("nan")), n_bytes


def evaluate(model, objective, dataset: BitDataset, batch_size: int,
             max_batches: int | None = None) -> dict[str, float]:
    """Held-out bits per byte over non-overlapping windows (all of them by default)."""
    bpb, n_bytes = score_batches(model, objective, dataset.val_batches(batch_size, max_batches),
                                 dataset.frame_bits)
    if n_bytes == 0:
        raise BitlmError("the held-out split holds no whole window; lower data.seq_len")
    return {"bits_per_byte": bpb, "bytes": n_bytes,
            "bound": bool(getattr(objective, "is_bound", False))}


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumed sessions
    metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs the optimizer steps of one run folder, logging to ``metrics.jsonl``."""

    def __init__(self, spec: RunSpec, model: BitTransformerLM, objective, dataset: BitDataset,
                 run_dir: Path, meta: Callable[[TrainState], dict[str, Any]],
                 compressor=None, telemetry: dict[str, Any] | None = None,
                 progress=None, log: Callable[[str], None] = print):
        self.spec, self.t = spec, spec.train
        self.model, self.objective, self.dataset = model, objective, dataset
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.compressor = compressor
        self.telemetry = telemetry or {}
        self.progress = progress
        self.log = log
        self.optimizer = make_optimizer(model, self.t)
        self.metrics_file = self.run_dir / "metrics.jsonl"

    def write_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self, state: TrainState) -> None:
        save_checkpoint(self.run_dir, state.step, self.model, self.optimizer, self.meta(state),
                        keep=self.spec.output.keep_checkpoints)

    # -- one step ---------------------------------------------------------------------------
    def batch(self, step: int, micro: int):
        rng = np.random.default_rng([self.t.seed, step, micro])
        bits = self.dataset.train_batch(rng, self.t.batch_size)
        compressed = False
        if self.compressor is not None and rng.random() < self.spec.compression.prob:
            bits = self.round_trip(bits)
            compressed = True
        return bits, compressed

    def round_trip(self, bits):
        """Send each row through the compressor and back, checking it comes back exactly."""
        rows = []
        for row in bits:
            restored = self.compressor.decompress(self.compressor.compress(row),
                                                  max_bits=row.numel())
            if not torch.equal(restored.to(torch.uint8), row):
                raise BitlmError(f"compressor '{self.spec.compression.name}' did not round-trip "
                                 "a training window exactly; the codec is broken")
            rows.append(restored.to(torch.uint8))
        return torch.stack(rows)

    def step(self, state: TrainState) -> dict[str, float]:
        lr = lr_at(state.step, self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(self.t.seed * 1_000_003 + state.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, bpb_sum, n_compressed = 0.0, 0.0, 0
        for micro in range(self.t.grad_accum):
            bits, compressed = self.batch(state.step, micro)
            out = self.objective(self.model, bits)
            (out.loss / self.t.grad_accum).backward()
            loss_sum += float(out.loss.detach())
            bpb_sum += out.bits_per_byte
            n_compressed += int(compressed)
        if not math.isfinite(loss_sum):
            raise BitlmError(f"loss became {loss_sum} at step {state.step}; lower train.lr or "
                             "enable train.grad_clip")
        grad_norm = 0.0
        if self.t.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             self.t.grad_clip))
        self.optimizer.step()
        n = self.t.grad_accum
        return {"loss": loss_sum / n, "bits_per_byte": bpb_sum / n, "lr": lr,
                "grad_norm": grad_norm, "compressed_batches": n_compressed}

    # -- telemetry -------------------------------------------------------------------------
    @torch.no_grad()
    def telemetry_values(self) -> dict[str, float]:
        if not self.telemetry:
            return {}
        batch = next(self.dataset.val_batches(self.t.batch_size, 1))
        was_training = self.model.training
        self.model.eval()
        probs = torch.softmax(self.model(batch, causal=True).float(), dim=-1)[..., 1]
        self.model.train(was_training)
        return {f"telemetry/{name}": float(metric(batch, probs).float().mean())
                for name, metric in self.telemetry.items()}

    # -- the loop --------------------------------------------------------------------------
    def fit(self, state: TrainState) -> TrainState:
        t = self.t
        self.model.train()
        task = None
        if self.progress is not None:
            task = self.progress.add_task("training", total=t.steps, completed=state.step,
                                          info="")
        started = time.perf_counter()
        base_elapsed = state.elapsed
        last_bpb = float("nan")
        stop_reason = None
        try:
            while state.step < t.steps:
                record = self.step(state)
                state.step += 1
                state.elapsed = base_elapsed + time.perf_counter() - started
                record.update(step=state.step, time=round(state.elapsed, 3))
                if state.step % t.log_every == 0 or state.step == t.steps:
                    self.write_metrics({"split": "train", **record})
                if state.step % t.eval_every == 0 or state.step == t.steps:
                    ev = evaluate(self.model, self.objective, self.dataset, t.batch_size,
                                  t.eval_batches)
                    last_bpb = ev["bits_per_byte"]
                    tel = (self.telemetry_values()
                           if state.step % self.spec.telemetry.every == 0
                           or state.step == t.steps else {})
                    self.write_metrics({"split": "val", "step": state.step,
                                        "bits_per_byte": last_bpb, "bytes": ev["bytes"], **tel})
                    state.metrics.update(val_bits_per_byte=last_bpb, **tel)
                    self.log(f"step {state.step:>6}  train loss {record['loss']:.4f}  "
                             f"held-out {last_bpb:.3f} bits/byte")
                if task is not None:
                    self.progress.update(task, completed=state.step, info=(
                        f"loss {record['loss']:.4f}  bpb {record['bits_per_byte']:.3f}  "
                        f"val {last_bpb:.3f}  lr {record['lr']:.2e}"))
                if state.step % t.checkpoint_every == 0 and state.step < t.steps:
                    self.checkpoint(state)
                if t.max_minutes is not None and state.elapsed > 60 * t.max_minutes:
                    stop_reason = f"train.max_minutes={t.max_minutes} reached"
                    break
        except KeyboardInterrupt:
            self.checkpoint(state)
            raise
        self.checkpoint(state)
        if stop_reason:
            self.log(f"stopped early at step {state.step}: {stop_reason}")
        return state
