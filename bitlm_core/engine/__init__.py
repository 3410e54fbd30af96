"""Training and scoring: the loop, its callbacks, data, optimizer, evaluation, telemetry.

``trainer`` (:class:`~bitlm_core.engine.trainer.Trainer`: the loop and one optimizer step),
``callbacks`` (evaluation, checkpoints, telemetry and drift, growth, attention maps, progress,
time limit), ``optim`` (AdamW, schedule, clipping, optimizer state across growth), ``dataset``
(packed, memory-mapped bits cut into windows), ``compression`` (training batches through a
codec), ``evaluation`` (held-out and sliding-window bits per byte), ``telemetry`` (metric
values, drift, regularisers), ``runtime`` (threads). Importing this package imports nothing;
each module imports torch as it needs.
"""
