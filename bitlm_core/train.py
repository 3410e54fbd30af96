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

from bitlm_core.checkpoint import atomic_write_bytes, save_checkpoint
from bitlm_core.compression import CompressionFeed, compression_prob
from bitlm_core.dataset import BitDataset
from bitlm_core.errors import BitlmError, SpecError
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.safety import detect_metric_drift, metric_values, next_bit_probs
from bitlm_core.spec import RunSpec, TrainSection


NON_CAUSAL_NEIGHBOURS = 3  # positions on either side a non-causal model's input reads


def model_config(spec: RunSpec, encoder, objective=None) -> ModelConfig:
    m = spec.model
    causal = bool(getattr(objective, "causal", True))
    return ModelConfig(layout=m.layout, frame_bits=encoder.frame_bits,
                       frame_parity=bool(getattr(encoder, "has_parity", False)),
                       neighbours=0 if causal else NON_CAUSAL_NEIGHBOURS,
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
                 compressor=None, encoder=None, telemetry: dict[str, Any] | None = None,
                 scaling=None, progress=None, log: Callable[[str], None] = print):
        self.spec, self.t = spec, spec.train
        self.model, self.objective, self.dataset = model, objective, dataset
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.compression = (CompressionFeed(compressor, encoder, spec.compression.name)
                            if compressor is not None else None)
        self._window: dict[str, dict[str, float]] = {}
        self._history: dict[str, list[float]] = {}
        self.telemetry = telemetry or {}
        self.regularisers = self._regularisers()
        self.scaling = scaling
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
    def _windows(self, step: int, micro: int):
        """(generator, windows) of a micro-batch: the same for a step whenever it is drawn."""
        rng = np.random.default_rng([self.t.seed, step, micro])
        return rng, self.dataset.train_batch(rng, self.t.batch_size)

    def batch(self, step: int, micro: int):
        """The micro-batch's windows, and its round trip through the codec when drawn for it."""
        rng, bits = self._windows(step, micro)
        c = self.spec.compression
        if self.compression is None:
            return bits, None
        p = compression_prob(step, c.prob, c.warmup_steps, c.ramp_steps)
        if rng.random() >= p:
            return bits, None
        trip = self.compression.round_trip(bits)
        return trip.bits, trip

    def step(self, state: TrainState) -> dict[str, float]:
        lr = lr_at(state.step, self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(self.t.seed * 1_000_003 + state.step)
        self.optimizer.zero_grad(set_to_none=True)
        n = self.t.grad_accum
        c = self.spec.compression
        loss_sum, bpb_sum, n_compressed = 0.0, 0.0, 0
        record: dict[str, float] = {}
        for micro in range(n):
            bits, trip = self.batch(state.step, micro)
            out = self.objective(self.model, bits)
            loss = out.loss
            if not torch.isfinite(out.loss.detach()):
                raise BitlmError(f"loss became {float(out.loss)} at step {state.step}; lower "
                                 "train.lr or enable train.grad_clip")
            if self.regularisers and out.probs is not None:
                # certain predictions (a parity bit) have an infinite entropy gradient: clamp
                probs = out.probs.clamp(1e-6, 1.0 - 1e-6)
                for key, (weight, metric) in self.regularisers.items():
                    value = metric(bits, probs).mean()
                    loss = loss + weight * (1.0 - value)
                    self._accumulate("reg", {key: float(value.detach())})
            kind = "raw" if trip is None else "compressed"
            split = {"loss": float(out.loss.detach()), "bits_per_byte": out.bits_per_byte,
                     **{k: v for k, v in out.extras.items() if k == "accuracy"}}
            if trip is not None:
                n_compressed += 1
                split["ratio"] = trip.ratio
                if c.direct:
                    direct = self.objective(self.model,
                                            self.compression.direct_batch(bits, trip.streams))
                    loss = loss + c.direct_weight * direct.loss
                    self._accumulate("direct", {"loss": float(direct.loss.detach()),
                                                "bits_per_byte": direct.bits_per_byte})
            self._accumulate(kind, split)
            for key, value in out.extras.items():  # the objective's own: objective/distill_kl
                if key != "accuracy" and isinstance(value, (int, float)):
                    self._accumulate(f"objective/{key}", {key: float(value)})  # own count each
            (loss / n).backward()
            loss_sum += float(out.loss.detach())
            bpb_sum += out.bits_per_byte
        grad_norm = 0.0
        if self.t.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             self.t.grad_clip))
        self.optimizer.step()
        record.update(loss=loss_sum / n, bits_per_byte=bpb_sum / n, lr=lr, grad_norm=grad_norm,
                      compressed_batches=n_compressed)
        return record

    def _accumulate(self, kind: str, values: dict[str, float]) -> None:
        """Sums of raw, compressed and direct-mode figures until the next log line."""
        acc = self._window.setdefault(kind, {"batches": 0})
        acc["batches"] += 1
        for k, v in values.items():
            acc[k] = acc.get(k, 0.0) + v

    def _drain_window(self) -> dict[str, float]:
        """Means since the last log line, as ``raw/loss``, ``compressed/ratio``, ``direct_loss``..."""
        flat: dict[str, float] = {}
        for kind, acc in self._window.items():
            n = acc.pop("batches")
            for k, v in acc.items():
                key = (f"direct_{k}" if kind == "direct" else kind
                       if kind.startswith("objective/") else f"{kind}/{k}")
                flat[key] = v / n
            if kind not in ("direct", "reg") and not kind.startswith("objective/"):
                flat[f"{kind}/batches"] = n
        self._window = {}
        return flat

    @torch.no_grad()
    def save_attention_maps(self, step: int) -> Path | None:
        """``attention.full_attn_logging``: every layer's (heads, T, T) map of the first
        held-out window, as ``attention/step-N.safetensors`` (keys ``layer0``, ``layer1``...)."""
        from safetensors.torch import save

        window = next(self.dataset.val_batches(1, 1))
        was_training = self.model.training
        self.model.eval()
        _, maps = self.model(window, causal=True, return_attention=True)
        self.model.train(was_training)
        if any(m is None for m in maps):
            self.log("attention.full_attn_logging: the attention backend returned no maps; "
                     "use attention: {name: reference} (or sdpa) to log them")
            return None
        folder = self.run_dir / "attention"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step}.safetensors"
        atomic_write_bytes(path, save({f"layer{i}": m[0].float().contiguous()
                                       for i, m in enumerate(maps)}))
        return path

    # -- scaling ---------------------------------------------------------------------------
    def maybe_grow(self, state: TrainState, bpb: float) -> bool:
        """Grow the model with ``scaling.strategy`` after ``patience`` evaluations without an
        improvement of ``min_delta``; counters live in ``state.metrics`` (so resume keeps them).
        """
        cfg, m = self.spec.scaling, state.metrics
        best = m.get("scaling/best_bpb")
        if best is None or bpb < best - cfg.min_delta:
            m["scaling/best_bpb"], m["scaling/stale"] = bpb, 0
            return False
        m["scaling/stale"] = m.get("scaling/stale", 0) + 1
        if m["scaling/stale"] < cfg.patience or m.get("scaling/growths", 0) >= cfg.max_growths:
            return False
        can = getattr(self.scaling, "can_grow", None)
        if can is not None and not can(self.model):
            return False
        next_frames = getattr(self.scaling, "next_frames", None)
        frames = next_frames(self.model) if next_frames else self.dataset.seq_frames
        if frames > min(self.dataset.val.n_frames, self.dataset.train.n_frames):
            m["scaling/growths"] = cfg.max_growths  # do not try again
            self.log(f"step {state.step}: plateau, but a context of {frames} bytes does not fit "
                     f"the held-out split ({self.dataset.val.n_frames} bytes); not growing")
            return False
        self.grow(state)
        return True

    def grow(self, state: TrainState) -> None:
        """Apply the strategy; carry the optimizer state of every parameter that survived, and
        of the trained part of every parameter it enlarged."""
        import dataclasses

        from bitlm_core.growth import carry_optimizer_state

        before = self.model.cfg
        old_state = self.optimizer.state  # keyed by parameter
        old_params = dict(self.model.named_parameters())
        model = self.scaling.grow(self.model)
        if model is not self.model:
            raise BitlmError(f"scaling strategy '{self.spec.scaling.strategy.name}' returned a "
                             "new model; bitlm strategies grow the model in place")
        self.optimizer = make_optimizer(model, self.t)
        carry_optimizer_state(old_state, old_params, model, self.optimizer.state)
        if model.cfg.max_frames != self.dataset.seq_frames:
            self.dataset = dataclasses.replace(self.dataset, seq_frames=model.cfg.max_frames)
        m = state.metrics
        m["scaling/growths"] = m.get("scaling/growths", 0) + 1
        m["scaling/stale"], m["scaling/best_bpb"] = 0, None
        describe = getattr(self.scaling, "describe", None)
        what = describe(before, model.cfg) if describe else self.spec.scaling.strategy.name
        self.write_metrics({"split": "scaling", "step": state.step, "change": what,
                            "parameters": model.num_parameters()})
        self.log(f"step {state.step}: training plateaued; scaled the model: {what}")

    # -- telemetry -------------------------------------------------------------------------
    def _regularisers(self) -> dict[str, tuple[float, Any]]:
        """lambda_K and lambda_S: the differentiable metrics they weigh, or a SpecError."""
        tcfg, found = self.spec.telemetry, {}
        if (tcfg.lambda_K or tcfg.lambda_S) and not getattr(self.objective, "causal", True):
            raise SpecError(f"telemetry.lambda_K and lambda_S regularise the causal model's "
                            f"predictions; objective '{self.spec.objective.name}' gives none. "
                            "Set them to 0, or train with objective: causal")
        for key, weight, name, needs in (("K", tcfg.lambda_K, "negentropy", "source: probs"),
                                         ("S", tcfg.lambda_S, "symbiosis", "")):
            if not weight:
                continue
            metric = self.telemetry.get(name)
            if metric is None or getattr(metric, "source", "probs") != "probs":
                option = f" with options {{{needs}}}" if needs else ""
                raise SpecError(f"telemetry.lambda_{key} regularises with the '{name}' metric "
                                f"of the model's predictions: add {{name: {name}}}{option} to "
                                f"telemetry.metrics, or set lambda_{key}: 0")
            found[key] = (weight, metric)
        return found

    def telemetry_values(self, bits=None, split: str = "val") -> dict[str, float]:
        """Every telemetry metric on ``bits`` (default: a held-out batch), with the model's
        probabilities, as ``{"telemetry/<split>/<metric>": value}`` averaged over rows."""
        if not self.telemetry:
            return {}
        if bits is None:
            bits = next(self.dataset.val_batches(self.t.batch_size, 1))
        # a non-causal model has no next-bit probabilities: metrics of them are left out
        probs = (next_bit_probs(self.model, bits) if getattr(self.objective, "causal", True)
                 else None)
        return {f"telemetry/{split}/{name}": v
                for name, v in metric_values(self.telemetry, bits, probs).items()}

    def telemetry_record(self, step: int) -> dict[str, float]:
        """Telemetry on this step's training batch (a round trip would give the same bits) and
        on a held-out batch."""
        _, train_bits = self._windows(step - 1, 0)
        return {**self.telemetry_values(train_bits, "train"), **self.telemetry_values()}

    def check_drift(self, tel: dict[str, float], step: int):
        """Record telemetry values; log (and return) the first drift alert, if any."""
        tcfg = self.spec.telemetry
        alert = None
        for key, value in tel.items():
            history = self._history.setdefault(key, [])
            history.append(value)
            if tcfg.drift_threshold is None:
                continue
            drift = detect_metric_drift(history, tcfg.drift_window, tcfg.drift_threshold, key)
            if drift is not None and drift.alert:
                self.write_metrics({"split": "alert", "step": step, "metric": key,
                                    "previous": drift.previous, "recent": drift.recent,
                                    "change": drift.change})
                self.log(f"drift alert at step {step}: {drift}")
                alert = alert or drift
        return alert

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
        tel_info = ""
        stop_reason = None
        try:
            while state.step < t.steps:
                record = self.step(state)
                state.step += 1
                state.elapsed = base_elapsed + time.perf_counter() - started
                record.update(step=state.step, time=round(state.elapsed, 3))
                if state.step % t.log_every == 0 or state.step == t.steps:
                    self.write_metrics({"split": "train", **record, **self._drain_window()})
                if state.step % t.eval_every == 0 or state.step == t.steps:
                    ev = evaluate(self.model, self.objective, self.dataset, t.batch_size,
                                  t.eval_batches)
                    last_bpb = ev["bits_per_byte"]
                    self.write_metrics({"split": "val", "step": state.step,
                                        "bits_per_byte": last_bpb, "bytes": ev["bytes"]})
                    state.metrics.update(val_bits_per_byte=last_bpb)
                    if self.scaling is not None and state.step < t.steps:
                        self.maybe_grow(state, last_bpb)
                    if self.spec.attention.full_attn_logging:
                        self.save_attention_maps(state.step)
                    self.log(f"step {state.step:>6}  train loss {record['loss']:.4f}  "
                             f"held-out {last_bpb:.3f} bits/byte")
                if self.telemetry and (state.step % self.spec.telemetry.every == 0
                                       or state.step == t.steps):
                    tel = self.telemetry_record(state.step)
                    self.write_metrics({"split": "telemetry", "step": state.step, **tel})
                    state.metrics.update(tel)
                    val_tel = {k: v for k, v in tel.items() if k.startswith("telemetry/val/")}
                    tel_info = "  ".join(f"{k.rsplit('/', 1)[1][:3]} {v:.2f}"
                                         for k, v in val_tel.items())
                    drift = self.check_drift(val_tel, state.step)
                    if drift and self.spec.telemetry.drift_stop:
                        stop_reason = f"telemetry drift ({drift}); telemetry.drift_stop is on"
                if task is not None:
                    self.progress.update(task, completed=state.step, info=(
                        f"loss {record['loss']:.4f}  bpb {record['bits_per_byte']:.3f}  "
                        f"val {last_bpb:.3f}  lr {record['lr']:.2e}"
                        + (f"  {tel_info}" if tel_info else "")))
                if state.step % t.checkpoint_every == 0 and state.step < t.steps:
                    self.checkpoint(state)
                if t.max_minutes is not None and state.elapsed > 60 * t.max_minutes:
                    stop_reason = f"train.max_minutes={t.max_minutes} reached"
                if stop_reason:
                    break
        except KeyboardInterrupt:
            self.checkpoint(state)
            raise
        self.checkpoint(state)
        if stop_reason:
            self.log(f"stopped early at step {state.step}: {stop_reason}")
        return state
