"""Training in several processes: real 2-process jobs on gloo (``bitlm run --nproc 2``), the
sharded checkpoint format in one process, and the messages of settings that cannot work.

The jobs (marked ``jobs``) are small (a 2-block model on the tiny corpus) and each costs a few
seconds, most of it interpreters importing torch; they use core alone, so ``make test-core``
leaves them to ``make test``. Tolerances: a DDP job and one process on the same windows
give the same loss at every step up to float summation order (measured equal to 1e-7; asserted
within 1e-5 relative); a sharded model and its consolidated copy score the same held-out bits
per byte within 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.engine.distributed import (SOLO, World, choose_backend, launched, lost_process,
                                           micro_batch)
from bitlm_core.errors import CheckpointError, SpecError
from bitlm_core.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

JOB_SECONDS = 300  # a job that has not ended by then hangs: the test fails instead of CI
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def job_env() -> dict[str, str]:
    """This environment without a job's variables; a hung worker's stacks go to its stderr
    when the test gives up on it (SIGABRT)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "PYTHONFAULTHANDLER": "1"}


def bitlm(*args: str, nproc: int | None = None, **kw) -> subprocess.Popen:
    """``python -m bitlm_core <args>``, in a session of its own (torchrun's launcher puts
    each worker in one too, and forwards a stop signal it receives to them)."""
    cmd = [sys.executable, "-m", "bitlm_core", *args]
    if nproc is not None:
        cmd += ["--nproc", str(nproc)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=job_env(), start_new_session=True, **kw)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=JOB_SECONDS)
    except subprocess.TimeoutExpired:  # the workers (own sessions) first: they dump stacks
        for sig in (signal.SIGABRT, signal.SIGKILL):
            for pid in [*workers(proc.pid), proc.pid]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {JOB_SECONDS} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen) -> None:
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + JOB_SECONDS
    while not latest.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint appeared: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


def workers(launcher: int) -> dict[int, int]:
    """{pid: rank} of the workers torchrun's launcher ``launcher`` started (its children; the
    rank from their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().split()[3]) != launcher:
                continue
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0")
                       if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            found[int(entry.name)] = int(env[b"RANK"])
    return found


def rank_pid(launcher: int, rank: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid, r in workers(launcher).items():
            if r == rank:
                return pid
        time.sleep(0.05)
    pytest.fail(f"no worker of rank {rank} found")


@pytest.fixture
def job_spec(tiny_spec):
    """A tiny spec for jobs: no dropout (the processes' masks differ by design), and a
    global batch so that one process and two train on the same windows."""
    def make(strategy: str, steps: int = 6, **sections) -> Path:
        train = {"batch_size": 4, "grad_accum": 2, "eval_every": 3, "checkpoint_every": 3,
                 **sections.pop("train", {})}
        return tiny_spec(steps=steps, model={"dropout": 0.0, **sections.pop("model", {})},
                         train=train,
                         distributed={"strategy": strategy, "global_batch": 8,
                                      **sections.pop("distributed", {})}, **sections)
    return make


@pytest.mark.jobs
@pytest.mark.parametrize("model, train", [({}, {}), ({"reversible": True}, {}),
                                          ({}, {"qat": {"group_size": 8, "start_step": 3}})],
                         ids=["plain", "reversible", "qat"])
def test_a_ddp_job_follows_the_loss_curve_of_one_process(job_spec, tmp_path, model, train):
    """2 processes x 2 windows x 2 accumulated = one process x 4 windows x 2 accumulated: the
    same windows, gradients averaged by DDP (no_sync during accumulation; reversible blocks
    need DDP's static graph, which synchronises every micro-batch; QAT switches every
    process's layers at the same step)."""
    from bitlm_core.app.run import execute

    spec = job_spec("ddp", steps=6, model=model, train=train)
    code, out, err = finish(bitlm("run", str(spec), "-q", "--out", str(tmp_path / "two"),
                                  nproc=2))
    assert code == 0, err[-3000:]
    assert out.count("held-out bits per byte") == 1  # rank 0 alone prints
    one = execute(load_spec(spec), tmp_path / "one", log=lambda m: None)
    two_train, one_train = records(tmp_path / "two", "train"), records(tmp_path / "one", "train")
    assert [r["step"] for r in two_train] == list(range(1, 7))  # one record a step, not two
    for a, b in zip(two_train, one_train):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for a, b in zip(records(tmp_path / "two", "val"), records(tmp_path / "one", "val")):
        assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp"
    assert summary["held_out_bits_per_byte"] == pytest.approx(one["held_out_bits_per_byte"],
                                                              rel=1e-5)


@pytest.mark.jobs
def test_an_fsdp_job_saves_shards_that_one_process_consolidates_to_the_same_model(job_spec,
                                                                                 tmp_path):
    from bitlm_core.app.loading import load_run
    from bitlm_core.engine.dataset import open_dataset
    from bitlm_core.engine.evaluation import evaluate
    from bitlm_core.store.checkpoint import load_weights, step_folders
    from bitlm_core.store.sharded import shard_files

    spec = job_spec("fsdp", steps=6, train={"checkpoint_every": 2}, output={"keep_checkpoints": 3})
    run = tmp_path / "run"
    code, out, err = finish(bitlm("run", str(spec), "-q", "--out", str(run), nproc=2))
    assert code == 0, err[-3000:]
    folders = step_folders(run)
    assert [f.name for f in folders] == ["step-000002", "step-000004", "step-000006"]
    for f in folders:  # every process wrote its part, and checksums cover the parts
        names = {p.name for p in shard_files(f)}
        assert names == {"shard-00001-model-00001-of-00001.safetensors",
                         "shard-00002-model-00001-of-00001.safetensors"}
        sums = json.loads((f / "checksums.json").read_text())["files"]
        assert {f"sharded/{n}" for n in names} <= set(sums)
    assert not (folders[0] / "model.safetensors").exists()  # shards only, mid-run
    assert (folders[-1] / "model.safetensors").is_file()  # the end adds the whole weights

    summary = json.loads((run / "summary.json").read_text())
    loaded = load_run(run, log=lambda m: None)
    data = open_dataset(run / "data", loaded.spec.data.seq_len)
    alone = evaluate(loaded.model, loaded.comps.objective, data, loaded.spec.train.batch_size)
    assert alone["bits_per_byte"] == pytest.approx(summary["held_out_bits_per_byte"], abs=1e-6)

    # a mid-run checkpoint holds shards only: one process consolidates them in memory
    mid = load_run(run, log=lambda m: None).model
    load_weights(folders[1], mid)
    before = evaluate(mid, loaded.comps.objective, data, loaded.spec.train.batch_size)
    assert before["bits_per_byte"] > alone["bits_per_byte"]  # 2 steps less trained
    for args in (["sample", str(run), "--bytes", "4"], ["quantize", str(run), "--out",
                                                        str(tmp_path / "q")]):
        code, _, err = finish(bitlm(*args))
        assert code == 0, err[-2000:]


@pytest.mark.jobs
def test_ctrl_c_stops_every_process_at_one_step_and_another_process_count_resumes(job_spec,
                                                                                tmp_path):
    """Ctrl-C (SIGINT to the launcher, which passes it on): all processes agree on the step,
    save their shards, and one process resumes the 2 processes' checkpoint (resharding); in
    bf16 (FSDP's mixed-precision policy) with checkpointed blocks."""
    spec = job_spec("fsdp", steps=120, train={"checkpoint_every": 5, "eval_every": 60,
                                              "log_every": 30, "precision": "bf16"},
                    model={"checkpointing": "blocks"})  # bf16 gathers; recomputed blocks
    run = tmp_path / "run"
    proc = bitlm("run", str(spec), "-q", "--out", str(run), nproc=2)
    wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert err.count("interrupted: stopped at step") == 1, err[-3000:]  # rank 0 says it
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    assert state["processes"] == 2 and 0 < state["step"] < 120

    code, out, err = finish(bitlm("run", str(spec), "--out", str(run)))  # one process
    assert code == 0, err[-3000:]
    assert f"resuming from {latest}" in err and "saved by 2 processes" in err
    assert "note: a step now" not in err  # the global batch is the same
    steps = [r["step"] for r in records(run, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 120


def same_curves(a: Path, b: Path) -> None:
    """Every train record's loss and gradient norm, and every held-out figure, of run folder
    ``a`` equal those of ``b`` up to float summation order."""
    two, one = records(a, "train"), records(b, "train")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for x, y in zip(two, one):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), x["step"]
        assert x["raw/batches"] == y["raw/batches"]
    two, one = records(a, "val"), records(b, "val")
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) >= 3
    for x, y in zip(two, one):
        assert x["bits_per_byte"] == pytest.approx(y["bits_per_byte"], rel=1e-5)


@pytest.mark.jobs
def test_a_pipeline_job_follows_the_loss_curve_of_one_process(job_spec, tmp_path):
    """2 stages (blocks 0 | 1), each batch of 4 windows in 2 micro-batches (GPipe), 2
    accumulated: every step's loss and gradient norm, and every held-out figure (the stages
    share their weights first), are those of one process on the same windows."""
    from bitlm_core.app.run import execute

    spec = job_spec("pipeline", steps=9, distributed={"stages": 2, "microbatches": 2},
                    train={"log_every": 1})
    code, out, err = finish(bitlm("run", str(spec), "--out", str(tmp_path / "two"), nproc=2))
    assert code == 0, err[-3000:]
    assert "pipeline: 2 stages (blocks 0 | 1)" in err and "2 micro-batches" in err
    one = execute(load_spec(spec, ["distributed.strategy=none"]), tmp_path / "one",
                  log=lambda m: None)
    same_curves(tmp_path / "two", tmp_path / "one")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["strategy"] == "pipeline" and summary["processes"] == 2
    assert summary["held_out_bits_per_byte"] == pytest.approx(one["held_out_bits_per_byte"],
                                                              rel=1e-5)


@pytest.mark.jobs
def test_ctrl_c_saves_a_pipelines_stages_and_one_process_resumes_them(job_spec, tmp_path):
    """Ctrl-C: every stage writes its optimizer state as shards; one process resumes them as a
    single stage (-o distributed.stages=1) and goes on as one process would have."""
    from bitlm_core.app.run import execute

    spec = job_spec("pipeline", steps=40, train={"checkpoint_every": 5, "eval_every": 10,
                                                 "log_every": 1},
                    distributed={"stages": 2, "microbatches": 2})
    run = tmp_path / "run"
    proc = bitlm("run", str(spec), "-q", "--out", str(run), nproc=2)
    wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGINT, err[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    assert state["processes"] == 2 and state["replicas"] == 1 and 0 < state["step"] < 40

    code, out, err = finish(bitlm("run", str(spec), "--out", str(run),
                                  "-o", "distributed.stages=1"))
    assert code == 0, err[-3000:]
    assert f"resuming from {latest}" in err and "note: a step now" not in err
    execute(load_spec(spec, ["distributed.strategy=none"]), tmp_path / "one",
            log=lambda m: None)
    same_curves(run, tmp_path / "one")


@pytest.mark.jobs
def test_a_killed_process_ends_the_job_and_the_same_command_resumes_it(job_spec, tmp_path):
    spec = job_spec("ddp", steps=100, train={"checkpoint_every": 5, "eval_every": 50,
                                             "log_every": 25})
    run = tmp_path / "run"
    args = ("run", str(spec), "-q", "--out", str(run))
    proc = bitlm(*args, nproc=2)
    wait_for_checkpoint(run, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    code, _, err = finish(proc)  # within JOB_SECONDS: no hang
    assert code != 0
    assert "rank 1 killed by SIGKILL" in err and "Run the same command again" in err, err[-3000:]

    code, out, err = finish(bitlm(*args, nproc=2))
    assert code == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 100
    code, out, err = finish(bitlm("sample", str(run), "--bytes", "4"))
    assert code == 0, err[-2000:]


@pytest.mark.jobs
def test_bad_input_in_a_job_is_one_message_and_exit_status_2(job_spec, tmp_path):
    spec = job_spec("ddp", data={"corpus": {"name": "file",
                                            "options": {"path": str(tmp_path / "gone.txt")}}})
    code, _, err = finish(bitlm("run", str(spec), "-q", "--out", str(tmp_path / "r"), nproc=2))
    assert code == 2, err[-3000:]
    assert "error: rank 0:" in err and "gone.txt" in err  # rank 0 says why
    assert "rank 0 stopped while opening the run folder" in err  # the other, briefly
    assert "Run the same command again" not in err and "interrupted" not in err
    assert not (tmp_path / "r").exists()


# -- in one process -------------------------------------------------------------------------
def test_fsdp_in_one_process_saves_the_sharded_format_and_keeps_what_bitlm_did_not_write(
        job_spec, tmp_path):
    from bitlm_core.app.run import execute
    from bitlm_core.store.checkpoint import (damage, remove_step_folder, step_folders,
                                             usable_checkpoint)

    spec = load_spec(job_spec("fsdp", steps=4, train={"checkpoint_every": 2}))
    run = tmp_path / "run"
    execute(spec, run, log=lambda m: None)
    first, last = step_folders(run)
    shard = first / "sharded" / "shard-00001-model-00001-of-00001.safetensors"
    assert shard.is_file() and not (first / "optimizer.safetensors").exists()
    raw = bytearray(last.joinpath("sharded", shard.name).read_bytes())
    raw[-1] ^= 0xFF
    last.joinpath("sharded", shard.name).write_bytes(bytes(raw))
    assert "does not match its checksum" in damage(last)
    assert usable_checkpoint(run, lambda m: None) == first  # the damaged one is skipped
    (last / "checksums.json").unlink()  # a sharded checkpoint is trusted with its checksums
    assert "checksums.json is missing" in damage(last)
    # a .safetensors file of someone else's beside the shards is not read as one of them
    from bitlm_core.app.loading import load_run
    from bitlm_core.store.checkpoint import load_weights

    model = load_run(run, log=lambda m: None).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (first / "sharded" / "zz-mine.safetensors").write_bytes(raw)
    load_weights(first, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (first / "sharded" / "notes.txt").write_text("mine")
    remove_step_folder(first)
    assert (first / "sharded" / "notes.txt").read_text() == "mine"
    assert (first / "sharded" / "zz-mine.safetensors").read_bytes() == raw
    assert not shard.exists() and not (first / "state.json").exists()


def test_shards_that_do_not_fit_the_model_are_refused_naming_the_tensor(job_spec, tmp_path):
    from bitlm_core.app.build import build_model
    from bitlm_core.app.run import execute
    from bitlm_core.components import Components
    from bitlm_core.engine.optim import make_optimizer
    from bitlm_core.store.checkpoint import latest_checkpoint
    from bitlm_core.store.sharded import consolidated_weights, load_sharded

    path = job_spec("fsdp", steps=2)
    run = tmp_path / "run"
    execute(load_spec(path), run, log=lambda m: None)
    wider = Components.build(load_spec(path, ["model.d_model=48", "model.n_heads=2"]))
    model = build_model(wider.spec, wider)
    ckpt = latest_checkpoint(run)
    with pytest.raises(CheckpointError, match=r"do not fit .*is \[\d+.*resume with the spec"):
        consolidated_weights(ckpt, model)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_sharded(ckpt, model, make_optimizer(model, wider.spec.train), [])
    # and the CLI refuses to resume the folder with another spec before reading any shard
    code, _, err = finish(bitlm("run", str(path), "--out", str(run), "-o", "train.steps=3"))
    assert code == 2 and "differs at: train.steps" in err
    # how the processes talk is not what the run trains: changing it resumes
    again = execute(load_spec(path, ["distributed.timeout_minutes=5",
                                     "distributed.backend=gloo"]), run, log=lambda m: None)
    assert again["steps"] == 2


@pytest.mark.parametrize("setting, key", [
    ("model.reversible=true", "model.reversible"),
    ("model.act.enabled=true", "model.act"),
    ("scaling.strategy.name=depth", "scaling.strategy"),
    ("train.precision=fp16", "train.precision fp16"),
    ("train.qat.bits=4", "train.qat"),
])
def test_fsdp_refuses_what_it_cannot_shard_with_one_message(setting, key):
    with pytest.raises(SpecError, match=f"fsdp cannot train with {key}: .*use "):
        load_spec(None, ["distributed.strategy=fsdp", setting])
    load_spec(None, ["distributed.strategy=ddp", setting])  # ddp trains them


@pytest.mark.parametrize("setting, key", [
    ("objective.name=diffusion", "an objective other than causal"),
    ("model.reversible=true", "model.reversible"),
    ("model.act.enabled=true", "model.act"),
    ("scaling.strategy.name=depth", "scaling.strategy"),
    ("train.precision=fp16", "train.precision fp16"),
    ("compression.prob=0.5", "compression.prob > 0"),
    ("telemetry.lambda_K=0.1", "telemetry regularisers"),
    ("train.compile=true", "train.compile"),
    ("train.qat.bits=4", "train.qat"),
])
def test_a_pipeline_refuses_what_its_stages_cannot_train_with_one_message(setting, key):
    with pytest.raises(SpecError, match=f"pipeline cannot train with {key}: "):
        load_spec(None, ["distributed.strategy=pipeline", setting])


def test_a_pipeline_needs_a_stage_per_process_and_batches_its_micro_batches_divide():
    from bitlm_core.engine.distributed import check_stages

    base = ["distributed.strategy=pipeline", "model.n_layers=4"]
    with pytest.raises(SpecError, match="stages=5 needs at least as many blocks; "
                                        "model.n_layers is 4"):
        load_spec(None, [*base, "distributed.stages=5"])
    with pytest.raises(SpecError, match="microbatches=3 does not divide the batch of 32"):
        load_spec(None, [*base, "distributed.microbatches=3"])
    with pytest.raises(SpecError, match="microbatches=4 does not divide the batch of 6"):
        load_spec(None, [*base, "distributed.global_batch=12", "train.grad_accum=2"])
    spec = load_spec(None, [*base, "distributed.stages=2"])
    with pytest.raises(SpecError, match="stages is 2 and the job has 1 process; .*"
                                        "start it with --nproc 2"):
        check_stages(spec, 1)
    check_stages(spec, 2)
    assert micro_batch(spec, 2) == 32  # every stage takes the whole batch

    from typer.testing import CliRunner

    from bitlm_core.cli.root import app

    result = CliRunner().invoke(app, ["run", "--nproc", "3", *sum((["-o", o] for o in base
                                                                   + ["distributed.stages=2"]),
                                                                  [])])
    assert result.exit_code == 2 and "stages is 2 and the job has 3" in result.output


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8))
def test_stages_split_the_blocks_into_contiguous_runs_of_even_size(n_layers, stages):
    from bitlm_core.engine.distributed import stage_blocks
    from bitlm_core.engine.pipeline import stage_of

    if stages > n_layers:
        return
    ranges = stage_blocks(n_layers, stages)
    assert [b for r in ranges for b in r] == list(range(n_layers))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1 and min(map(len, ranges)) >= 1
    assert stage_of("pos.weight", ranges) == 0 and stage_of("ln_f.bias", ranges) == stages - 1
    assert stage_of(f"blocks.{n_layers - 1}.mlp.fc.weight", ranges) == stages - 1


def test_bad_launches_each_get_one_clear_message(monkeypatch):
    with pytest.raises(SpecError, match="global_batch=6 is not a multiple of "
                                        "train.grad_accum=4"):
        load_spec(None, ["distributed.global_batch=6", "train.grad_accum=4"])
    spec = load_spec(None, ["distributed.global_batch=6"])
    with pytest.raises(SpecError, match=r"global_batch=6 does not divide into 4 processes x "
                                        r"train.grad_accum=1; use a multiple of 4"):
        micro_batch(spec, 4)
    assert micro_batch(spec, 3) == 2 and micro_batch(spec, 1) == 6
    assert micro_batch(load_spec(None, []), 4) == 32  # train.batch_size per process
    with pytest.raises(SpecError, match="nccl needs CUDA.*use distributed.backend: gloo"):
        choose_backend("nccl", torch.device("cpu"))
    with pytest.raises(SpecError, match="mps cannot train in several processes"):
        choose_backend("auto", torch.device("mps"))
    assert choose_backend("auto", torch.device("cpu")) == "gloo"
    for env, message in (({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"}, "whole numbers"),
                         ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"},
                          "do not describe a process")):
        with pytest.raises(SpecError, match=message):
            launched(env)
    assert launched({}) is None
    assert launched({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == (1, 2, 1)

    from bitlm_core.app.run import execute

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SpecError, match="one of 2 that torchrun started, but "
                                        "distributed.strategy is none"):
        execute(load_spec(None, []))
    with pytest.raises(SpecError, match="does not divide into 2 processes"):
        execute(load_spec(None, ["distributed.strategy=ddp", "distributed.global_batch=3"]))


def test_nproc_needs_a_strategy_and_is_refused_inside_a_job(tmp_path):
    from typer.testing import CliRunner

    from bitlm_core.cli.root import app

    runner = CliRunner()
    result = runner.invoke(app, ["run", "--nproc", "2"])
    assert result.exit_code == 2 and "distributed.strategy is none" in result.output
    result = runner.invoke(app, ["run", "--nproc", "2", "-o", "distributed.strategy=ddp",
                                 "-o", "attention.name=nosuch"])  # refused before launching
    assert result.exit_code == 2 and "nosuch" in result.output
    result = runner.invoke(app, ["run", "--nproc", "3", "-o", "distributed.strategy=ddp",
                                 "-o", "distributed.global_batch=8"])
    assert result.exit_code == 2 and "does not divide into 3 processes" in result.output
    result = runner.invoke(app, ["run", "--nproc", "2", "-o", "distributed.strategy=ddp"],
                           env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.exit_code == 2 and "drop --nproc" in result.output


def test_worker_arguments_and_exit_descriptions():
    from bitlm_core.cli.launch import describe_exit, worker_args

    assert worker_args(["run", "s.yaml", "--nproc", "2", "-q"]) == ["run", "s.yaml", "-q"]
    assert worker_args(["run", "--nproc=4", "s.yaml"]) == ["run", "s.yaml"]
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(2) == "exit status 2"


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**32))
def test_the_processes_rows_make_up_the_batch_of_one_process(tiny_dataset, batch, size, seed):
    whole = tiny_dataset.train_batch(np.random.default_rng(seed), batch * size)
    parts = [tiny_dataset.train_batch(np.random.default_rng(seed), batch, (rank, size))
             for rank in range(size)]
    assert np.array_equal(np.concatenate([p.numpy() for p in parts]), whole.numpy())


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from bitlm_core.builtins.encoders import Parity9Encoder
    from bitlm_core.engine.dataset import prepare_dataset

    text = ("the cat sat on the mat. " * 80).encode()
    return prepare_dataset(text, Parity9Encoder(), 16, 0.1, tmp_path_factory.mktemp("data"))


def test_one_process_is_a_world_of_one():
    world = World(strategy="fsdp")
    assert world.main and not world.group and world.sharded
    assert world.mean([1.0, 3.0]) == [1.0, 3.0] and world.agree([0, 2]) == [0, 2]
    assert world.broadcast(7) == 7 and world.on_main("x", lambda: 5) == 5
    assert SOLO.strategy == "none"
    assert lost_process(RuntimeError("[pair.cc:537] Connection closed by peer"))
    assert not lost_process(ValueError("Connection closed by peer"))
