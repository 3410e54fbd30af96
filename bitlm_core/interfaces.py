"""What each kind of component looks like (``typing.Protocol``), and the small result types.

Implementations are plain classes that know nothing of pluggy: the registry calls a record's
factory with the spec's options and the core calls the returned object directly. Shapes: ``B``
batch, ``L`` bits, ``T`` positions, ``H`` heads, ``D`` head size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch stays out of the import path of the CLI
    import numpy as np
    import torch


@runtime_checkable
class Encoder(Protocol):
    name: str
    frame_bits: int  # bits per byte frame: 9 for parity9, 8 for raw8
    has_parity: bool

    def encode(self, data: bytes) -> "torch.Tensor": ...  # (N * frame_bits,) uint8

    def encode_np(self, data: bytes) -> "np.ndarray": ...

    def decode(self, bits: "torch.Tensor", repair: bool = False) -> bytes: ...

    def enforce(self, frames: "np.ndarray") -> tuple["np.ndarray", int]: ...


@runtime_checkable
class AttentionBackend(Protocol):
    supports_weights: bool

    def __call__(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", *,
                 causal: bool, dropout_p: float = 0.0, need_weights: bool = False
                 ) -> tuple["torch.Tensor", Optional["torch.Tensor"]]:
        """q: (B, H, Tq, D), k, v: (B, H, Tk, D) -> out (B, H, Tq, D), weights (B, H, Tq, Tk).

        With Tq < Tk the queries are the last Tq positions (key/value cache): a causal query i
        sees keys j <= i + Tk - Tq.
        """
        ...


@runtime_checkable
class Compressor(Protocol):
    name: str
    magic: bytes  # the bytes every stream starts with: how `bitlm codec decompress` finds the codec

    def compress(self, bits: "torch.Tensor") -> bytes: ...

    def decompress(self, data: bytes, max_bits: int = ...) -> "torch.Tensor": ...


@runtime_checkable
class TelemetryMetric(Protocol):
    name: str
    # optional: differentiable = True when the value has a gradient with respect to probs
    # (needed for a regulariser weight); bitlm treats a metric without it as not differentiable
    # optional: bounds = (low, high) its values lie in; (0.0, 1.0) when it declares none

    def __call__(self, bits: "torch.Tensor", probs: Optional["torch.Tensor"] = None
                 ) -> "torch.Tensor":
        """bits (B, L), probs (B, L) probability of a 1 or None -> one value per row (B,)."""
        ...


@dataclass(frozen=True)
class GateDecision:
    """Whether a safety gate lets an output through, and why not when it does not."""

    allowed: bool
    reasons: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.allowed


@runtime_checkable
class SafetyGate(Protocol):
    name: str

    def check(self, metrics: Mapping[str, float]) -> GateDecision: ...

    def reset(self) -> None: ...


@dataclass
class ObjectiveOutput:
    """loss: scalar to minimise (nats per predicted bit); bits_per_byte: reported figure."""

    loss: "torch.Tensor"
    bits_per_byte: float
    extras: dict[str, float] = field(default_factory=dict)
    is_bound: bool = False
    probs: Optional["torch.Tensor"] = None  # (B, L) P(bit = 1), differentiable; for regularisers


@runtime_checkable
class Objective(Protocol):
    name: str
    causal: bool  # the model runs with a causal mask (next-bit prediction)
    is_bound: bool  # bits_per_byte is a bound (diffusion), not an exact code length

    def __call__(self, model: Any, bits: "torch.Tensor") -> ObjectiveOutput: ...


@runtime_checkable
class Sampler(Protocol):
    name: str
    causal: bool

    def sample(self, model: Any, prompt: "torch.Tensor", n_frames: int,
               generator: "torch.Generator", encoder: Encoder) -> "torch.Tensor":
        """prompt (P,) bits of whole frames -> (P + n_frames * frame_bits,) bits that
        ``encoder`` can decode."""
        ...


@runtime_checkable
class Corpus(Protocol):
    name: str

    def read(self) -> bytes: ...


@runtime_checkable
class ScalingStrategy(Protocol):
    name: str

    def grow(self, model: Any) -> Any: ...


@runtime_checkable
class Callback(Protocol):
    """Told about a training run; :class:`bitlm_core.engine.callbacks.Callback` is the base
    class to subclass (every event a no-op) and documents each event."""

    def on_fit_start(self, trainer: Any, state: Any) -> None: ...

    def on_step(self, trainer: Any, state: Any, record: dict) -> None: ...

    def on_eval(self, trainer: Any, state: Any, result: dict) -> None: ...

    def on_checkpoint(self, trainer: Any, state: Any, path: Any) -> None: ...

    def on_interrupt(self, trainer: Any, state: Any) -> None: ...

    def on_end(self, trainer: Any, state: Any) -> None: ...


@runtime_checkable
class Reporter(Protocol):
    """Writes files a person reads about runs: ``write(runs, out)`` reads the run folders
    ``runs`` (one, or several to overlay) and writes into the folder ``out``, returning the
    paths written. It must only read the runs, and write nothing but its own files."""

    name: str

    def write(self, runs: Any, out: Any) -> list: ...


@runtime_checkable
class Quantizer(Protocol):
    """A weight format of ``bitlm quantize --scheme NAME``, and how a model runs from it.

    ``quantize(model)`` returns the tensors to store (safetensors) and the names of the
    weights it quantized; ``dequantize(tensors, model, source)`` returns float tensors under
    the model's state-dict names, or raises :class:`~bitlm_core.errors.CheckpointError` naming
    what in the file is wrong (a missing scale, a wrong shape or dtype) before torch sees it;
    ``prepare(model, device)`` returns the model to run inference with (the same one, or one
    with faster layers, e.g. dynamic int8)."""

    name: str

    def quantize(self, model: Any) -> tuple: ...

    def dequantize(self, tensors: dict, model: Any, source: str) -> dict: ...

    def prepare(self, model: Any, device: Any) -> Any: ...
