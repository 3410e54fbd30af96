"""The run spec: YAML (a safe loader without aliases) validated into frozen pydantic models.

Every component slot has the shape ``{name: ..., options: {...}}``. Unknown keys are errors with
a close-match suggestion; wrong types name their key path. Options are checked against the
component's factory signature by :func:`resolve_spec` (``bitlm validate``), before any tensor is
built. A spec is data: nothing in it is ever evaluated as code.

This module imports no torch.
"""

from __future__ import annotations

import difflib
import reprlib
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bitlm_core.errors import SpecError

QUICKSTART_SPEC = "quickstart.yaml"
MAX_SEED = 2**63 - 1  # what torch's and numpy's generators take


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Component(Strict):
    """A named component and the options passed to its factory."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class DataSection(Strict):
    corpus: Component = Component(name="quickstart")
    encoder: Component = Component(name="parity9")
    seq_len: int = Field(128, ge=2, description="window length in bytes (byte frames)")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="held-out tail of the corpus")
    require_utf8: bool = True


class ActSection(Strict):
    enabled: bool = Field(False, description="adaptive computation time: each position stops "
                                             "after the blocks it needs")
    threshold: float = Field(0.99, gt=0.0, le=1.0, description="a position halts once its "
                             "summed halting probabilities reach this")
    ponder_weight: float = Field(0.01, ge=0.0, description="weight of the ponder cost (blocks "
                                 "used per position) added to the loss")
    max_steps: Optional[int] = Field(None, ge=1, description="blocks a position may use at "
                                     "most; default all")


class ModelSection(Strict):
    layout: Literal["flat", "framed"] = "framed"
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    d_ff: Optional[int] = Field(None, ge=1, description="default 4 * d_model")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    local: Literal["joint", "tree", "node_mlp", "mlp"] = Field(
        "joint", description="framed layout: local bit predictor")
    local_layers: int = Field(2, ge=0, description="framed layout, mlp: local predictor depth")
    local_dim: Optional[int] = Field(None, ge=8, description="framed layout, tree, node_mlp, "
                                                             "mlp: width; default d_model")
    checkpointing: Literal["none", "blocks", "every_k"] = Field(
        "none", description="recompute block activations in backward instead of keeping "
                            "them: every block, or groups of checkpoint_k blocks")
    checkpoint_k: int = Field(2, ge=1, description="checkpointing: every_k: blocks per "
                                                   "recomputed group (one stored input each; "
                                                   "with act, every block is its own group)")
    reversible: bool = Field(False, description="reversible blocks: inputs rebuilt from "
                                                "outputs in backward, activation memory "
                                                "constant in depth")
    act: ActSection = ActSection()

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        return self


class AttentionSection(Component):
    name: str = "reference"
    full_attn_logging: bool = Field(False, description="at each evaluation, save every layer's "
                                                       "attention maps of one held-out window "
                                                       "to attention/step-N.safetensors")


class ObjectiveSection(Component):
    name: str = "causal"


class QatSection(Strict):
    """``train.qat``: quantization-aware training (bitlm_core.model.quant)."""

    bits: int = Field(4, ge=2, le=8, description="weight bits (4: the int4 quantizer's grid)")
    group_size: int = Field(32, ge=1, le=4096, description="weights per scale along a row")
    start_step: int = Field(0, ge=0, description="the step from which linear layers train on "
                                                 "the grid (0: from the start)")
    activations: bool = Field(False, description="also round each linear layer's input to "
                                                 "8 bits (a scale per position) in training")


class TrainSection(Strict):
    steps: int = Field(1000, ge=1, description="optimizer steps (the schedule's horizon)")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    grad_clip: float = Field(0.05, ge=0, description="max gradient norm (loss in nats per bit); "
                                                     "0 disables clipping")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    threads: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        1, description="torch threads; 1 is bitwise "
                                                 "reproducible, 'auto' (one per core) faster")
    eval_every: int = Field(200, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    max_minutes: Optional[float] = Field(None, gt=0, description="stop early (and checkpoint) "
                                                                 "after this long")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$",
                        description="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the transformer blocks' compute precision (autocast; weights, "
                            "loss and bits per byte stay fp32)")
    compile: Union[bool, Literal["max-autotune"]] = Field(
        False, description="torch.compile the model for training (eager if it fails)")
    qat: Optional[QatSection] = Field(None, description="quantization-aware training: linear "
                                      "layers computed with weights rounded to a bits-bit grid")

    @model_validator(mode="after")
    def _qat_is_eager(self):
        if self.qat is not None and self.compile:
            raise ValueError("train.qat changes the linear layers while training, which a "
                             "compiled model would not see; set train.compile: false")
        if self.qat is not None and self.qat.start_step > self.steps:
            raise ValueError(f"train.qat.start_step ({self.qat.start_step}) comes after the "
                             f"last step (train.steps: {self.steps}), so the run would never "
                             "train on the grid; give a start_step of at most train.steps")
        return self


class CompressionSection(Component):
    name: str = "identity"
    prob: float = Field(0.0, ge=0, le=1, description="share of batches round-tripped, once "
                                                     "warmed up and ramped")
    warmup_steps: int = Field(0, ge=0, description="steps with no compressed batches")
    ramp_steps: int = Field(0, ge=0, description="cosine ramp of the share from 0 to prob")
    direct: bool = Field(False, description="also train on the compressed streams as bits "
                                            "(its loss is logged as direct_loss)")
    direct_weight: float = Field(0.5, ge=0, description="weight of the direct-mode loss")
    decompress_output: bool = Field(False, description="read samples as streams of this codec "
                                                       "and decompress them (direct-mode models)")


class TelemetrySection(Strict):
    metrics: Union[Literal["all"], list[Component]] = Field(
        default_factory=list, description="metrics to log (each slot may have options.weight "
        "> 0 to regularise with it); 'all': every installed metric with its defaults")
    every: int = Field(100, ge=1)
    drift_threshold: Optional[float] = Field(None, ge=0, description="alert when a metric's "
                                             "recent mean moves by more than this fraction")
    drift_window: int = Field(5, ge=1, description="telemetry values per mean in the drift "
                                                   "check")
    drift_stop: bool = Field(False, description="stop training (with a checkpoint) on a drift "
                                                "alert")
    lambda_K: float = Field(0.0, ge=0, description="older form of options.weight on the "
                                                   "metric with symbol K (negentropy)")
    lambda_C: float = Field(0.0, ge=0, description="must stay 0: C (LZ complexity) is not "
                                                   "differentiable")
    lambda_S: float = Field(0.0, ge=0, description="older form of options.weight on the "
                                                   "metric with symbol S (symbiosis)")

    @model_validator(mode="after")
    def _lz_is_not_differentiable(self):
        if self.lambda_C:
            raise ValueError("lambda_C must be 0: C, the LZ complexity, counts phrases of the "
                             "bits and has no gradient, so it can be logged and gated but not "
                             "used as a regulariser (K and S can: lambda_K, lambda_S, or "
                             "options.weight on their metrics)")
        return self


class SafetySection(Strict):
    gate: Component = Component(name="none")
    strict: bool = False


class ScalingSection(Strict):
    strategy: Optional[Component] = None
    patience: int = Field(2, ge=1, description="evaluations without min_delta improvement of "
                                               "held-out bits per byte that make a plateau")
    min_delta: float = Field(0.01, ge=0, description="improvement (bits per byte) that counts")
    max_growths: int = Field(1, ge=0, description="how many times the strategy may grow the "
                                                  "model in one run")


class SamplerSlot(Strict):
    """``sample.sampler``: without a ``name``, the sampler made for the objective."""

    name: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)


class SampleSection(Strict):
    sampler: SamplerSlot = SamplerSlot()
    prompt: str = "The "
    bytes: int = Field(200, ge=0)
    count: int = Field(1, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class DistributedSection(Strict):
    """Training in several processes, launched by torchrun (``bitlm run --nproc N`` starts it
    for one machine). Under ddp and fsdp each process trains on its own share of every step's
    windows: a step covers ``train.batch_size x train.grad_accum x processes`` windows, or
    ``global_batch`` when that is set. A pipeline's stages each take the whole batch
    (``train.batch_size x train.grad_accum``, or ``global_batch``)."""

    strategy: Literal["none", "ddp", "fsdp", "pipeline"] = Field(
        "none", description="none (one process), ddp (every process holds the model, "
                            "gradients averaged), fsdp (parameters, gradients and optimizer "
                            "state sharded over the processes) or pipeline (the blocks split "
                            "into stages, one per process, micro-batches flowing through them)")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="the process group's backend; auto: nccl on CUDA, gloo on CPU")
    global_batch: Optional[int] = Field(
        None, ge=1, description="windows per optimizer step over all processes; each takes "
                                "global_batch / (processes x train.grad_accum) (a pipeline's "
                                "stages: global_batch / train.grad_accum), which must be "
                                "whole. Unset: train.batch_size per process")
    stages: int = Field(2, ge=1, le=64, description="pipeline: stages the blocks are split into, "
                                                  "one per process (--nproc must equal it)")
    microbatches: int = Field(4, ge=1, le=1024,
                              description="pipeline: micro-batches each batch is split into "
                                          "(GPipe schedule); must divide the batch")
    timeout_minutes: float = Field(10.0, gt=0, le=24 * 60,
                                   description="how long a process waits for the others in "
                                               "one collective before the job ends")

    @model_validator(mode="before")
    @classmethod
    def _older_backend(cls, data):
        if isinstance(data, dict) and data.get("backend") == "none":  # specs of bitlm 0.1-0.2
            data = {**data, "backend": "auto"}
        return data


class OutputSection(Strict):
    dir: Optional[str] = Field(None, description="run folder; default runs/<name>")
    keep_checkpoints: int = Field(2, ge=1)
    report: bool = Field(True, description="write report.html and plots into the run folder "
                                           "when the run ends (every installed reporter, "
                                           "e.g. bitlm-report)")


#: (setting, whether a spec uses it, why FSDP cannot shard it); ddp trains all of them.
NOT_SHARDED = (
    ("model.reversible", lambda s: s.model.reversible,
     "its blocks run without autograd in forward and rebuild their inputs in backward, where "
     "FSDP's gathers of the sharded weights do not happen; use strategy ddp, or "
     "model.checkpointing to save memory"),
    ("model.act", lambda s: s.model.act.enabled,
     "processes whose positions halt at different depths would skip different blocks and "
     "wait for each other's gathers forever; use strategy ddp"),
    ("scaling.strategy", lambda s: s.scaling.strategy is not None,
     "growing the model would need it sharded again, optimizer state included; use strategy "
     "ddp, which rebuilds its wrapper after a growth"),
    ("train.precision fp16", lambda s: s.train.precision == "fp16",
     "the fp16 gradient scaler does not run on sharded gradients; use bf16, which needs no "
     "scaler"),
    ("train.qat", lambda s: s.train.qat is not None,
     "its layers round whole weight matrices, which FSDP holds in shards; use strategy ddp"),
)


def _regularises(s) -> bool:
    metrics = s.telemetry.metrics
    weighted = isinstance(metrics, list) and any(
        isinstance(m.options.get("weight"), (int, float)) and m.options["weight"] > 0
        for m in metrics)
    return bool(s.telemetry.lambda_K or s.telemetry.lambda_S or weighted)


#: (setting, whether a spec uses it, why the pipeline cannot train it): its last stage computes
#: the next-bit cross-entropy of plain blocks, and nothing else.
NOT_PIPELINED = (
    ("an objective other than causal", lambda s: s.objective.name != "causal",
     "the last stage computes the causal objective's next-bit cross-entropy itself; use "
     "strategy ddp or fsdp for other objectives"),
    ("model.reversible", lambda s: s.model.reversible,
     "a stage boundary would cut the reversible stack; use model.checkpointing to save memory"),
    ("model.act", lambda s: s.model.act.enabled,
     "halting crosses the stages' boundary; use strategy ddp"),
    ("scaling.strategy", lambda s: s.scaling.strategy is not None,
     "growing the model would need new stages; use strategy ddp"),
    ("train.precision fp16", lambda s: s.train.precision == "fp16",
     "the fp16 gradient scaler would have to agree over the stages; use bf16"),
    ("compression.prob > 0", lambda s: s.compression.prob > 0,
     "compressed batches are not fed through the stages (nor direct mode's second pass); use "
     "strategy ddp"),
    ("telemetry regularisers", _regularises,
     "a regulariser's loss needs the bit probabilities of the last stage back on the first; "
     "log the metrics without a weight, or use strategy ddp"),
    ("train.compile", lambda s: bool(s.train.compile),
     "the stages run eagerly; set train.compile: false"),
    ("train.qat", lambda s: s.train.qat is not None,
     "each stage would have to switch its layers at the same step; use strategy ddp"),
)


class RunSpec(Strict):
    name: str = "run"
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    attention: AttentionSection = AttentionSection()
    objective: ObjectiveSection = ObjectiveSection()
    train: TrainSection = TrainSection()
    compression: CompressionSection = CompressionSection()
    telemetry: TelemetrySection = TelemetrySection()
    safety: SafetySection = SafetySection()
    scaling: ScalingSection = ScalingSection()
    sample: SampleSection = SampleSection()
    distributed: DistributedSection = DistributedSection()
    output: OutputSection = OutputSection()
    callbacks: list[Component] = Field(default_factory=list, description="training callbacks "
                                       "from plugins, run after bitlm's own")

    @model_validator(mode="after")
    def _global_batch_divides(self):
        g, accum = self.distributed.global_batch, self.train.grad_accum
        if g is not None and g % accum:
            raise ValueError(f"distributed.global_batch={g} is not a multiple of "
                             f"train.grad_accum={accum}: each process's micro-batch is "
                             "global_batch / (processes x grad_accum)")
        return self

    @model_validator(mode="after")
    def _fsdp_can_shard(self):
        """What FSDP cannot shard, refused before anything starts (see :data:`NOT_SHARDED`)."""
        if self.distributed.strategy == "fsdp":
            for key, applies, why in NOT_SHARDED:
                if applies(self):
                    raise ValueError(f"distributed.strategy fsdp cannot train with {key}: {why}")
        return self

    @model_validator(mode="after")
    def _pipeline_can_stage(self):
        """What the pipeline cannot train, refused before anything starts
        (:data:`NOT_PIPELINED`), and batches that do not split into its micro-batches."""
        d = self.distributed
        if d.strategy != "pipeline":
            return self
        for key, applies, why in NOT_PIPELINED:
            if applies(self):
                raise ValueError(f"distributed.strategy pipeline cannot train with {key}: {why}")
        if self.model.n_layers < d.stages:
            raise ValueError(f"distributed.stages={d.stages} needs at least as many blocks; "
                             f"model.n_layers is {self.model.n_layers}")
        batch = (d.global_batch // self.train.grad_accum if d.global_batch is not None
                 else self.train.batch_size)
        if batch % d.microbatches:
            raise ValueError(f"distributed.microbatches={d.microbatches} does not divide the "
                             f"batch of {batch} windows each stage takes; use a divisor of "
                             f"{batch}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def incomplete(self) -> list[str]:
        """Key paths whose value depends on the installed components and is not filled in yet
        (``bitlm_core.components.complete_spec`` fills them)."""
        return ([p for p, missing in (("sample.sampler.name", self.sample.sampler.name is None),
                                      ("telemetry.metrics", self.telemetry.metrics == "all"))
                 if missing])

    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}")


# -- loading -------------------------------------------------------------------------------
MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; anything this large is a mistake
SHOWN = reprlib.Repr()  # values quoted in messages: bounded, whatever the input
SHOWN.maxstring = SHOWN.maxother = 60
SHOWN.maxlist = SHOWN.maxdict = SHOWN.maxtuple = 4
SHOWN.maxlevel = 2


def shown(value: Any) -> str:
    """``repr`` of a value for an error message, cut to a few dozen characters."""
    return SHOWN.repr(value)


class _NoDuplicateKeys:
    """Refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice in one mapping",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class SpecLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what a spec never needs and an attacker would use:
    aliases (``*name``: a 500-byte "billion laughs" expands to gigabytes) and a key given twice
    in one mapping (YAML would keep the last one silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not accepted in a spec; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)


if getattr(yaml, "__with_libyaml__", False):
    class FastSpecLoader(_NoDuplicateKeys, yaml.CSafeLoader):
        """:class:`SpecLoader`'s rules on libyaml's parser (about 10x faster: a dashboard reads
        hundreds of specs). Its composer is C, so aliases are found in the composed tree
        instead: a node reached twice is an alias (the walk never expands one)."""
else:  # pragma: no cover - PyYAML without libyaml
    FastSpecLoader = None


def _refuse_aliases(root) -> None:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not accepted in a spec; write the value out",
                node.start_mark)
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))


def load_yaml(text: str) -> Any:
    """YAML data through :class:`SpecLoader`'s rules (raises yaml.YAMLError)."""
    if FastSpecLoader is None:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - a SafeLoader subclass
    loader = FastSpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_aliases(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path} is a folder, not a spec file (give the YAML file)")
    if not path.is_file():
        raise SpecError(f"spec file not found: {path} (check the path, or run `bitlm run` with "
                        "no spec for the embedded quickstart)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path} is larger than {MAX_SPEC_BYTES >> 10} KB; a spec is a page of "
                        "YAML (give the file, not a corpus)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "<spec>") -> dict[str, Any]:
    try:
        data = load_yaml(text)
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{source} is not valid YAML: {str(exc)[:200]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{source} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{source} must be a YAML mapping of sections (data, model, train, ...), "
                        f"got {type(data).__name__}")
    return data


def quickstart_dict() -> dict[str, Any]:
    text = resources.files("bitlm_core.data").joinpath(QUICKSTART_SPEC).read_text("utf-8")
    return parse_yaml(text, "the embedded quickstart spec")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars or lists."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {shown(item)} must look like key.path=value "
                            "(for example train.steps=200)")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise SpecError(f"override {shown(item)} has an empty key path segment")
        value = _parse_value(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"override {shown(item)}: {'.'.join(parts[:i + 1])} is a value, "
                                "not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _parse_value(text: str) -> Any:
    """A YAML value, where numbers YAML 1.1 leaves as strings (``1e-3``) become floats."""
    if not text.strip():
        return ""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".en") else int(value)
        except ValueError:
            return value
    return value


def validate_spec(raw: dict[str, Any], source: str = "spec") -> RunSpec:
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None


def load_spec(path: str | Path | None = None, overrides=()) -> RunSpec:
    """Read (or take the embedded quickstart), apply overrides, validate."""
    if path is None:
        raw, source = quickstart_dict(), "the quickstart spec"
    else:
        raw, source = read_yaml(path), str(path)
    if overrides:
        source += f" with {shown(' '.join('-o ' + o for o in overrides))}"
    return validate_spec(apply_overrides(raw, list(overrides)), source)


# -- errors ----------------------------------------------------------------------------------
def _model_at(loc: tuple) -> type[BaseModel] | None:
    cls: Any = RunSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _unwrap(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source} does not validate ({exc.error_count()} problem"
             f"{'s' if exc.error_count() != 1 else ''}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = list(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            msg = f"  {path}: unknown key"
            if hint:
                msg += f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?"
            if known:
                msg += f" (allowed here: {', '.join(known)})"
            lines.append(msg)
        else:
            given = err.get("input")
            got = "" if isinstance(given, dict) else f", got {shown(given)}"
            msg, cap = err["msg"], 200
            if err["type"] == "value_error":  # bitlm's own checks: longer, and no prefix
                msg, cap = msg.removeprefix("Value error, "), 400
            lines.append(f"  {path}: {msg[:cap]}{got}")
    return "\n".join(lines)
