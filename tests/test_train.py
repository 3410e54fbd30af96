import json
import math

import pytest
import torch

from bitlm_core.store.checkpoint import latest_checkpoint, read_state
from bitlm_core.errors import CheckpointError
from bitlm_core.app.evaluate import evaluate_bytes
from bitlm_core.app.loading import load_run
from bitlm_core.app.run import execute
from bitlm_core.spec import TrainSection, load_spec
from bitlm_core.engine.optim import lr_at


def test_schedule_warms_up_then_decays_to_the_floor_at_the_last_step():
    t = TrainSection(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(t.steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lr_at(t.steps, t) == pytest.approx(0.1)  # horizon = the number of optimizer steps
    assert lrs[-1] > 0.1


def test_schedule_horizon_does_not_depend_on_grad_accum():
    a = TrainSection(steps=50, grad_accum=1)
    b = TrainSection(steps=50, grad_accum=4)
    assert [lr_at(s, a) for s in range(50)] == [lr_at(s, b) for s in range(50)]


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_training_lowers_loss_and_writes_a_run_folder(tmp_path, tiny_spec, layout):
    spec = load_spec(tiny_spec(layout=layout, steps=30), ["train.eval_every=30"])
    summary = execute(spec, tmp_path / "run", log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.05
    assert summary["held_out_bits_per_byte"] < 8.0
    for name in ("spec.yaml", "metrics.jsonl", "samples.txt", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    assert summary["samples"][0].startswith("the ")


def test_same_seed_same_weights(tmp_path, tiny_spec):
    spec = load_spec(tiny_spec(steps=4))
    execute(spec, tmp_path / "a", log=lambda m: None)
    execute(spec, tmp_path / "b", log=lambda m: None)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, tiny_spec):
    path = tiny_spec(steps=8)
    execute(load_spec(path), tmp_path / "straight", log=lambda m: None)
    # Stop after step 4 (max_minutes is not part of the comparison: emulate a kill by
    # training a copy whose spec says 4 steps, then resuming under the real spec).
    from bitlm_core.app.build import build_model
    from bitlm_core.app.run import load_dataset
    from bitlm_core.components import Components, complete_spec
    from bitlm_core.engine.trainer import TrainState, Trainer
    from bitlm_core.store.rundir import prepare_run_dir

    spec = complete_spec(load_spec(path))

    run_dir = tmp_path / "resumed"
    prepare_run_dir(spec, run_dir, restart=False)
    comps = Components.build(spec)
    model = build_model(spec, comps)
    dataset, _ = load_dataset(spec, comps, run_dir)
    trainer = Trainer(spec, model, comps.objective, dataset, run_dir,
                      lambda s: {"model_config": model.cfg.to_dict(), "elapsed": s.elapsed,
                                 "metrics": {}}, log=lambda m: None)
    state = TrainState()
    for _ in range(4):
        trainer.step(state)
        state.step += 1
    trainer.checkpoint(state)
    logs = []
    execute(spec, run_dir, log=logs.append)
    assert any("resuming from step-000004" in m for m in logs)
    a, b = weights(tmp_path / "straight"), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_not_trained_again(tmp_path, tiny_spec):
    spec = load_spec(tiny_spec(steps=3))
    execute(spec, tmp_path / "r", log=lambda m: None)
    before = weights(tmp_path / "r")
    logs = []
    execute(spec, tmp_path / "r", log=logs.append)
    assert any("resuming from step-000003 (step 3 of 3)" in m for m in logs)
    after = weights(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_different_spec_in_the_same_folder_is_refused(tmp_path, tiny_spec):
    execute(load_spec(tiny_spec(steps=2)), tmp_path / "r", log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"differs at: train\.lr.*--restart"):
        execute(load_spec(tiny_spec(steps=2), ["train.lr=0.01"]), tmp_path / "r",
                log=lambda m: None)
    execute(load_spec(tiny_spec(steps=2), ["train.lr=0.01"]), tmp_path / "r", restart=True,
            log=lambda m: None)


def test_checkpoint_survives_a_broken_latest_pointer(tmp_path, tiny_spec):
    execute(load_spec(tiny_spec(steps=4)), tmp_path / "r", log=lambda m: None)
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step-999999\n")
    (tmp_path / "r" / "checkpoints" / ".tmp-step-000005-1").mkdir()  # an interrupted write
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt.name == "step-000004" and read_state(ckpt)["step"] == 4


def test_checkpoints_hold_no_pickles(tmp_path, tiny_spec):
    execute(load_spec(tiny_spec(steps=2)), tmp_path / "r", log=lambda m: None)
    ckpt = latest_checkpoint(tmp_path / "r")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.json", "model.safetensors",
                                                       "optimizer.safetensors", "state.json"]
    for p in ckpt.iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # pickle protocol marker


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_eval_and_sample_from_a_loaded_checkpoint(tmp_path, tiny_spec, tiny_corpus, layout):
    execute(load_spec(tiny_spec(layout=layout, steps=4)), tmp_path / "r", log=lambda m: None)
    run = load_run(tmp_path / "r")
    data = tiny_corpus.read_bytes()
    result = evaluate_bytes(run, data, "tiny")
    assert result["bytes"] == len(data) and 0 < result["bits_per_byte"] < 9.5
    from bitlm_core.app.generate import generate

    c = run.comps
    s1 = generate(run.model, c.encoder, c.sampler, "the ", 12, seed=3)
    s2 = generate(run.model, c.encoder, c.sampler, "the ", 12, seed=3)
    assert s1.text == s2.text and s1.text.startswith("the ")
    frames = s1.bits.view(-1, 9)
    assert torch.equal(frames[:, :8].sum(1) % 2, frames[:, 8].long())  # parity-valid


def test_gradient_accumulation_averages_micro_batches(tmp_path, tiny_spec):
    spec = load_spec(tiny_spec(steps=2), ["train.grad_accum=2", "train.batch_size=2"])
    summary = execute(spec, tmp_path / "r", log=lambda m: None)
    assert math.isfinite(summary["held_out_bits_per_byte"])
