"""Training in several processes on PyTorch's own engine: torchrun, DDP, FSDP2.

torchrun starts the processes and tells each who it is (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); :func:`start` reads that, checks the spec's ``distributed`` section against it
and joins the process group (gloo on CPU, nccl on CUDA). A :class:`World` then says which
process this is and what the strategy does:

``ddp``
    every process holds the whole model; DDP averages the gradients (not during the
    micro-batches of an accumulation: ``no_sync``); rank 0 saves ordinary checkpoints.
``fsdp``
    ``fully_shard`` over each block and then the whole model, on an explicit device mesh; the
    optimizer works on the shards (DTensor parameters); every process saves its shards
    (:mod:`bitlm_core.store.sharded`).
``pipeline``
    the blocks split into one stage per process, micro-batches flowing through them on
    ``torch.distributed.pipelining``'s GPipe schedule (:mod:`bitlm_core.engine.pipeline`);
    every process saves its stage's optimizer state as shards.

Under ddp and fsdp each process trains on its own rows of every micro-batch
(:func:`micro_batch`); under pipeline every stage sees the whole batch. They agree on
when to stop (:meth:`World.agree`) and on the figures written (:meth:`World.mean`); only
rank 0 writes the run folder. A process that dies ends the job: torchrun stops the others
(:func:`lost_process` turns what a collective raises then into one clear message).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from bitlm_core.errors import BitlmError, SpecError

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LostProcess(BitlmError):
    """Another process of the job is gone (killed, crashed, or unreachable)."""

    exit_code = 1


class RankZeroFailed(BitlmError):
    """What the other processes raise when rank 0 failed at something they wait for."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes (``local_rank`` on its
    machine), the spec's ``strategy``, and the device collectives use (``comm``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    comm: Any = None  # torch.device of the collectives' tensors (cuda for nccl)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder, logs and prints."""
        return self.rank == 0

    @property
    def group(self) -> bool:
        """Several processes, joined in a process group."""
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """Checkpoints are saved as shards (``fsdp`` and ``pipeline``, in one process or
        many)."""
        return self.strategy in ("fsdp", "pipeline")

    @property
    def gathers(self) -> bool:
        """Every forward pass needs every process (FSDP gathers the sharded weights)."""
        return self.group and self.strategy == "fsdp"

    @property
    def pipelined(self) -> bool:
        """The model's blocks are split into stages over the processes."""
        return self.group and self.strategy == "pipeline"

    @property
    def part(self) -> tuple[int, int]:
        """(this process's share, of how many) of every batch's windows: its rank under ddp
        and fsdp; the whole batch for a pipeline's stages (and for one process)."""
        return (0, 1) if self.strategy == "pipeline" else (self.rank, self.size)

    # -- collectives (each a no-op in one process) ------------------------------------------
    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over the processes."""
        if not self.group:
            return [float(v) for v in values]
        return [v / self.size for v in self.sum(values)]

    def sum(self, values: Sequence[float]) -> list[float]:
        """The sum of each value over the processes."""
        return [float(v) for v in self._all_reduce(values, "float64", "SUM", "summing figures")]

    def _all_reduce(self, values: Sequence, dtype: str, op: str, what: str) -> list:
        """``values`` reduced with ``op`` over the processes, as one tensor of ``dtype`` (the
        values themselves in one process)."""
        import torch
        import torch.distributed as dist

        if not self.group:
            return list(values)
        t = torch.tensor(list(values), dtype=getattr(torch, dtype), device=self.comm)
        with collective(what):
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def mean_of(self, figures: Mapping[str, float]) -> dict[str, float]:
        """``figures`` averaged over the processes when every process has the same names
        (checked first: a collective over lists of different lengths would never end);
        else this process's own."""
        import zlib

        names = list(figures)
        key = zlib.crc32("\n".join(names).encode())
        high, low = self.agree([key, -key])
        if high != -low:
            return dict(figures)
        return dict(zip(names, self.mean([figures[k] for k in names])))

    def agree(self, values: Sequence[int]) -> list[int]:
        """The largest of each value over the processes (a flag raised by any is raised for
        all; a signal number received by any is received by all)."""
        return [int(v) for v in self._all_reduce([int(v) for v in values], "int64", "MAX",
                                                  "agreeing on whether to stop")]

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` (an integer), on every process."""
        import torch
        import torch.distributed as dist

        if not self.group:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.comm)
        with collective("sharing a value"):
            dist.broadcast(t, src=0)
        return int(t.item())

    def on_main(self, what: str, work: Callable[[], Any]) -> Any:
        """``work()`` on rank 0, while the others wait: its result there (None elsewhere).
        When it fails, rank 0 raises its error and the others stop with a short
        :class:`RankZeroFailed` instead of waiting for a collective that never comes."""
        if not self.group:
            return work()
        result, failure = None, None
        if self.main:
            try:
                result = work()
            except Exception as exc:  # told to the others, then raised here
                failure = exc
        (failed,) = self.agree([failure is not None])
        if failure is not None:
            raise failure
        if failed:
            raise RankZeroFailed(f"rank 0 stopped while {what}; its message says why")
        return result

    def barrier(self, what: str = "waiting for the other processes") -> None:
        import torch.distributed as dist

        if self.group:
            with collective(what):
                dist.barrier()


SOLO = World()


def launched(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) that torchrun set for this process, or None when it was
    not launched by torchrun."""
    if "WORLD_SIZE" not in environ:
        return None
    try:
        rank, size, local = (int(environ[k]) for k in LAUNCH_ENV)
    except (KeyError, ValueError):
        raise SpecError("RANK, WORLD_SIZE and LOCAL_RANK must all be set to whole numbers "
                        "(torchrun sets them); start the job with torchrun or bitlm run "
                        "--nproc N") from None
    if not (size >= 1 and 0 <= rank < size and 0 <= local <= rank):
        raise SpecError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} do not describe "
                        "a process of a job; start the job with torchrun or bitlm run --nproc N")
    return rank, size, local


def choose_backend(backend: str, device) -> str:
    """``distributed.backend`` for ``device``: auto is nccl on CUDA, gloo elsewhere."""
    import torch.distributed as dist

    if device.type == "mps":
        raise SpecError("train.device mps cannot train in several processes (PyTorch has no "
                        "process-group backend for it); use train.device: cpu, or one process")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise SpecError(f"distributed.backend nccl needs CUDA, and this run computes on "
                        f"{device}; use distributed.backend: gloo (or auto)")
    available = {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available()}
    if not available[backend]:
        raise SpecError(f"distributed.backend {backend}: this torch is built without it; use "
                        f"{'gloo' if backend == 'nccl' else 'nccl'} or auto")
    return backend


def process_device(device, local_rank: int, size: int):
    """The device of this process: with several processes on CUDA, the GPU of its local
    rank."""
    import torch

    if size == 1 or device.type != "cuda":
        return device
    if device.index not in (None, local_rank):
        raise SpecError(f"train.device {device} with {size} processes: each process computes "
                        "on the GPU of its local rank; set train.device: cuda")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def start(spec, device) -> tuple[World, Any]:
    """This process's :class:`World` and device; joins the process group when torchrun
    started several processes. A SpecError when the spec and the launch do not fit."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    d = spec.distributed
    where = launched()
    if where is None or where[1] == 1:
        check_stages(spec, 1)
        return World(strategy=d.strategy), device
    rank, size, local = where
    if d.strategy == "none":
        raise SpecError(f"this process is one of {size} that torchrun started, but "
                        "distributed.strategy is none; set distributed.strategy: ddp (or fsdp, "
                        "pipeline), "
                        "e.g. -o distributed.strategy=ddp")
    check_stages(spec, size)
    micro_batch(spec, size)  # a batch that does not divide is refused before joining
    backend = choose_backend(d.backend, device)
    device = process_device(device, local, size)
    if not dist.is_initialized():
        with collective("joining the process group"):
            dist.init_process_group(backend, timeout=timedelta(minutes=d.timeout_minutes))
    comm = device if backend == "nccl" else torch.device("cpu")
    return World(rank, size, local, d.strategy, comm), device


def stop(world: World) -> None:
    """Leave the process group (at the end of a run, however it ended)."""
    import gc

    import torch.distributed as dist

    if world.group and dist.is_initialized():
        gc.collect()  # what still refers to the group (a released DDP in a cycle) goes first
        dist.destroy_process_group()


def check_stages(spec, size: int) -> None:
    """A pipeline runs one stage per process: a SpecError when the job has another count."""
    d = spec.distributed
    if d.strategy == "pipeline" and d.stages != size:
        how = ("start it with --nproc " + str(d.stages) if d.stages > 1 else
               "run it in one process")
        raise SpecError(f"distributed.stages is {d.stages} and the job has {size} "
                        f"process{'es' if size != 1 else ''}; a pipeline runs one stage per "
                        f"process: {how}, or set -o distributed.stages={size} (a run may "
                        "resume with another number of stages)")


def stage_blocks(n_layers: int, stages: int) -> list[range]:
    """The blocks of each stage of a pipeline: contiguous runs, as even as can be (earlier
    stages take one more)."""
    size, extra = divmod(n_layers, stages)
    out, start = [], 0
    for s in range(stages):
        stop = start + size + (s < extra)
        out.append(range(start, stop))
        start = stop
    return out


def micro_batch(spec, size: int) -> int:
    """Windows per micro-batch in each process: ``train.batch_size``, or with
    ``distributed.global_batch`` its share, which must be whole. A pipeline's stages each
    take the whole micro-batch (``size`` does not divide it)."""
    g, accum = spec.distributed.global_batch, spec.train.grad_accum
    if spec.distributed.strategy == "pipeline":
        size = 1
    if g is None:
        return spec.train.batch_size
    if g % (size * accum):
        raise SpecError(f"distributed.global_batch={g} does not divide into {size} "
                        f"process{'es' if size > 1 else ''} x train.grad_accum={accum}; use a "
                        f"multiple of {size * accum}")
    return g // (size * accum)


def describe(world: World, spec, micro: int) -> str:
    """One line on how the job trains: processes, threads, the batch of a step."""
    threads = spec.train.threads
    how = (f"{threads} thread{'s' if threads != 1 else ''} each (train.threads)"
           if threads != "auto" else "threads as OMP_NUM_THREADS says (torchrun sets 1 when "
                                     "it starts several processes; train.threads chooses)")
    if world.strategy == "pipeline":
        d = spec.distributed
        split = " | ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)
                           for r in stage_blocks(spec.model.n_layers, world.size))
        return (f"pipeline: {world.size} stages (blocks {split}), {how}; a step is "
                f"{micro * spec.train.grad_accum} windows ({micro} x {spec.train.grad_accum} "
                f"accumulated), each batch in {d.microbatches} micro-batches (GPipe)")
    total = micro * spec.train.grad_accum * world.size
    return (f"{world.strategy}: {world.size} processes, {how}; a step is {total} windows "
            f"({micro} x {spec.train.grad_accum} accumulated x {world.size} processes)")


# -- the model in several processes ---------------------------------------------------------
def wrap(model, world: World, precision: str):
    """What the training step calls: DDP around the model, or the model sharded by FSDP in
    place; the model itself in one process."""
    if not world.group or world.strategy == "pipeline":  # the stages call the model's parts
        return model
    if world.strategy == "ddp":
        DDP = _model_ddp()
        cfg = model.cfg
        ids = [world.local_rank] if world.comm is not None and world.comm.type == "cuda" \
            else None
        if cfg.reversible and not cfg.act:
            # the reversible stack's weights are used in its own backward, outside the graph
            # DDP walks: a static graph learns in the first step when each is ready
            return DDP(model, device_ids=ids, static_graph=True)
        # some parameters take no part in a step (the framed model's mask table in causal
        # training; the blocks that ACT skips)
        return DDP(model, device_ids=ids, find_unused_parameters=True)
    shard(model, world, precision)
    return model


@functools.cache
def _model_ddp():
    from torch.nn.parallel import DistributedDataParallel

    class ModelDDP(DistributedDataParallel):
        """DDP that answers for the model's attributes (``frame_bits``, ``cfg``...), as
        torch.compile's wrapper does: objectives read them from what they are given."""

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return ModelDDP


def shard(model, world: World, precision: str) -> None:
    """``fully_shard`` each block (with the precision's policy: bf16 gathers the weights in
    bf16, computes the blocks in bf16, their inputs cast, and reduces gradients in fp32; the
    sharded weights and optimizer state stay fp32), then the model for the rest (embeddings,
    final norm, local head: fp32), on a one-dimensional mesh of this job's device type."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.comm.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=True) if precision == "bf16" else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh)
    # the model's logits are a view of its last layer's output; FSDP warns, at every forward
    # pass, that an in-place change of them would escape its hooks: objectives read them only
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")


@contextmanager
def accumulating(net, world: World, last: bool) -> Iterator[None]:
    """Around one micro-batch's backward: gradients are synchronised only at the last."""
    if not world.group or last or world.strategy == "pipeline":
        if world.group and world.strategy == "fsdp":
            net.set_requires_gradient_sync(True)
        yield
        return
    if world.strategy == "ddp" and getattr(net, "static_graph", False):
        yield  # a static graph (reversible blocks) cannot skip a synchronisation: every
        return  # micro-batch's gradients are averaged, which gives the same sum
    if world.strategy == "ddp":
        with net.no_sync():
            yield
    else:
        net.set_requires_gradient_sync(False)
        yield


def full_weights(model, world: World) -> dict[str, Any] | None:
    """The whole weights of a sharded model on rank 0, on the CPU (collective: every process
    calls it; the others get None); the model's own state dict when it is not sharded (a
    pipeline's model, once its stages' weights are shared: :meth:`Pipeline.share_weights`)."""
    if not world.gathers:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with collective("gathering the weights"):
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
    return weights if world.main else None


def save_sharded(world: World, run_dir, step: int, model, optimizer, meta: dict[str, Any],
                 keep: int, whole: bool = False):
    """A sharded checkpoint of ``step`` (collective: every process calls it): each process
    writes its shards into the folder rank 0 prepared, ``whole`` adds the whole weights
    (rank 0 writes them), and rank 0 completes the folder (state.json, checksums, rename,
    ``latest``) once every process has written. Returns (the folder, the whole weights on
    rank 0 when ``whole``, else None)."""
    from bitlm_core.errors import CheckpointError
    from bitlm_core.store.checkpoint import (commit_checkpoint, prepare_temporary,
                                             remove_step_folder, saving, step_path,
                                             temporary_folder, write_weights)
    from bitlm_core.store.sharded import flat_state, save_shards

    tmp = temporary_folder(run_dir, step, world.broadcast(os.getpid()))
    flat, groups = flat_state(model, optimizer)
    if world.main:
        with saving(run_dir, step, tmp):
            prepare_temporary(tmp)
    world.barrier("preparing a checkpoint")
    try:
        save_shards(tmp, flat)
    except BaseException as exc:  # DCP tells every process when one could not write (its
        if not isinstance(exc, (Exception, dcp_failure())):  # CheckpointException is a
            raise  # BaseException); a signal or exit goes on as it is
        if lost_process(exc):
            raise lost(exc, "saving a checkpoint") from None
        if world.main:
            remove_step_folder(tmp)
        raise CheckpointError(f"cannot write the shards of step {step} in {tmp.parent}: "
                              f"{first_failure(exc)}. Free some space and run again to "
                              "resume") from None
    del flat
    weights = full_weights(model, world) if whole else None
    path = step_path(run_dir, step)
    if world.main:
        with saving(run_dir, step, tmp):
            if weights is not None:
                write_weights(tmp, None, weights)
            path = commit_checkpoint(run_dir, step, tmp, meta, groups, keep)
    world.barrier("completing a checkpoint")
    return path, weights


def dcp_failure() -> type:
    """The exception torch.distributed.checkpoint raises when a process failed to save or
    load (a BaseException, so ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def first_failure(exc: BaseException) -> str:
    """What went wrong, in a line: the first process's error of a DCP failure, else ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, cause = sorted(failures.items())[0]
        inner = cause[0] if isinstance(cause, tuple) else cause  # DCP: (error, its stack)
        text = getattr(inner, "strerror", None) or str(inner)
        return f"rank {rank}: {text.splitlines()[0][:200] if text else type(inner).__name__}"
    text = str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


@contextmanager
def collective(what: str) -> Iterator[None]:
    """A collective that fails because another process is gone becomes :class:`LostProcess`."""
    try:
        yield
    except BitlmError:
        raise
    except Exception as exc:
        if lost_process(exc):
            raise lost(exc, what) from None
        raise


def lost(exc: BaseException, what: str) -> LostProcess:
    """The one message of a job that lost a process, from what a collective raised."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # gloo's source line
    return LostProcess(f"another process of the job stopped answering while {what} ({first}); "
                       "the job ends here. Run the same command again to resume from the last "
                       "complete checkpoint")


def lost_process(exc: BaseException) -> bool:
    """Whether ``exc`` is what a collective raises when a peer process is gone."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo",
                            "NCCL", "Socket Timeout", "Broken pipe"))
