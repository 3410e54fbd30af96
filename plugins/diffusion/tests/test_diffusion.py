"""Tests of the diffusion plugin: schedules, ELBO weighting, sampler, parity repair, training."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder, Raw8Encoder
from bitlm_core.model import MASK, BitTransformerLM, ModelConfig
from bitlm_core.registry import get_registry
from bitlm_diffusion.objective import DiffusionObjective
from bitlm_diffusion.sampler import DiffusionSampler
from bitlm_diffusion.schedules import SCHEDULES, get_schedule

LN2 = math.log(2.0)
CORPUS = b"the cat sat on the mat. " * 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest and immune to a busy machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- stubs -----------------------------------------------------------------------------------
class StubModel(torch.nn.Module):
    """Returns fixed logits whatever the input; records the tokens it was given."""

    def __init__(self, logits_per_position, frame_bits: int = 9, max_frames: int = 64):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.table = torch.as_tensor(logits_per_position, dtype=torch.float32)  # (L, 2) or (2,)
        self._frame_bits = frame_bits
        self.cfg = ModelConfig(layout="framed", frame_bits=frame_bits, max_frames=max_frames)
        self.seen: list[torch.Tensor] = []

    @property
    def frame_bits(self) -> int:
        return self._frame_bits

    def forward(self, tokens, causal=True):
        assert causal is False
        self.seen.append(tokens.clone())
        B, L = tokens.shape
        table = self.table if self.table.dim() == 2 else self.table.expand(L, 2)
        return table[:L].unsqueeze(0).expand(B, L, 2) + 0 * self.dummy


def tiny_model(layout: str, seed: int = 0) -> BitTransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(layout=layout, frame_bits=9, max_frames=16, d_model=32, n_layers=2,
                      n_heads=4, d_ff=64, local_dim=32)
    return BitTransformerLM(cfg, ReferenceAttention())


def corpus_windows(frames: int = 16) -> torch.Tensor:
    bits = Parity9Encoder().encode(CORPUS)
    n = bits.numel() // (frames * 9)
    return bits[: n * frames * 9].view(n, frames * 9)


# -- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_end_points_and_monotone(name):
    s = get_schedule(name)
    assert float(s.alpha(0.0)) == 1.0
    assert float(s.alpha(1.0)) == 0.0
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a = s.alpha(t)
    assert bool((a[1:] < a[:-1]).all()), "alpha must be strictly decreasing"
    assert bool(((a >= 0) & (a <= 1)).all())


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_derivative_and_weight(name):
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(t), numeric, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.weight(t), -s.dalpha(t) / (1 - s.alpha(t)), rtol=1e-9,
                               atol=1e-12)
    # safe near 0: finite, positive, behaves like 1/t, and clamped at eps
    w = s.weight(torch.tensor([0.0, 1e-9, 1e-3], dtype=torch.float64), eps=1e-3)
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
    assert float(w[0]) == float(w[2])
    assert abs(float(w[2]) * 1e-3 - 1.0) < 0.01


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_integrates_to_one(name):
    """The integral of -alpha'(t) over [0, 1] is alpha(0) - alpha(1) = 1 (the bound's scale)."""
    s = get_schedule(name)
    t = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    assert abs(float(-s.dalpha(t).mean()) - 1.0) < 1e-6


def test_unknown_schedule_names_the_option():
    with pytest.raises(ValueError, match="schedule must be one of linear, cosine, exp"):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match="schedule"):
        DiffusionObjective(schedule="nope")
    with pytest.raises(ValueError, match="steps must be an integer from 8 to 256"):
        DiffusionSampler(steps=4)
    with pytest.raises(ValueError, match="temperature"):
        DiffusionSampler(temperature=-1.0)
    with pytest.raises(ValueError, match="eps"):
        DiffusionObjective(eps=0.0)
    with pytest.raises(ValueError, match="t_min and t_max"):
        DiffusionObjective(t_min=0.8, t_max=0.2)


# -- the objective ---------------------------------------------------------------------------
def test_loss_weighting_matches_hand_computation():
    """Two windows of 9 bits, fixed logits p(1) = 3/4, chosen t and masks, linear schedule."""
    bits = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.uint8)
    model = StubModel([0.0, math.log(3.0)])
    obj = DiffusionObjective(schedule="linear")
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [0, 1, 4]] = True  # bits 1, 0, 0
    mask[1, [7]] = True  # bit 1
    got = obj.bound(model, bits, t, mask)
    ce1, ce0 = -math.log(0.75), -math.log(0.25)
    expected = torch.tensor([4.0 * (ce1 + 2 * ce0), 2.0 * ce1])  # w = 1/t
    torch.testing.assert_close(got, expected)
    # the model saw MASK exactly at the masked positions and the clean bits elsewhere
    tokens = model.seen[-1]
    assert torch.equal(tokens == MASK, mask)
    assert torch.equal(tokens[~mask], bits[~mask])
    # a schedule with a different weight scales the same sum by its own w(t)
    obj_exp = DiffusionObjective(schedule="exp")
    w = 5.0 / np.expm1(5.0 * t.numpy())
    torch.testing.assert_close(obj_exp.bound(model, bits, t, mask),
                               torch.tensor([w[0] * (ce1 + 2 * ce0), w[1] * ce1],
                                            dtype=torch.float32))


def test_call_reports_loss_per_bit_and_bound_per_byte():
    bits = corpus_windows(4)[:8]
    model = StubModel([0.3, -0.2])
    model.eval()
    obj = DiffusionObjective(schedule="cosine")
    torch.manual_seed(5)
    out = obj(model, bits)
    torch.manual_seed(5)  # replay the same draws by hand
    t = obj.sample_t(bits.size(0))
    mask = obj.sample_mask(t, bits.size(1))
    per_window = obj.bound(model, bits, t, mask)
    torch.testing.assert_close(out.loss, per_window.mean() / bits.size(1))
    assert out.is_bound and obj.is_bound and obj.causal is False
    assert math.isclose(out.bits_per_byte, float(out.loss.detach()) * 9 / LN2, rel_tol=1e-6)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_bound_is_exact_nll_in_expectation_for_context_free_model(name):
    """For a model that ignores its input, E[bound] = sum of CE: the weighting is right."""
    bits = corpus_windows(2)
    bits = bits.repeat(max(1, 256 // bits.size(0)), 1)[:256]
    model = StubModel([0.4, -0.9])
    model.eval()
    logp = torch.log_softmax(torch.tensor([0.4, -0.9]), dim=0)
    exact_bpb = float(-logp[bits.long()].sum(dim=1).mean()) / bits.size(1) * 9 / LN2
    obj = DiffusionObjective(schedule=name, antithetic=True, eval_samples=16)
    torch.manual_seed(0)
    est = np.mean([obj(model, bits).bits_per_byte for _ in range(8)])
    assert abs(est - exact_bpb) / exact_bpb < 0.03, (est, exact_bpb)


def test_antithetic_t_covers_the_range():
    obj = DiffusionObjective(antithetic=True)
    t = obj.sample_t(8, torch.Generator().manual_seed(1))
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8))


def test_curriculum_moves_the_noise_range_and_eval_is_full_range():
    obj = DiffusionObjective(t_min=0.5, t_max=0.6, curriculum_steps=10)
    model = StubModel([0.0, 0.0])
    bits = corpus_windows(2)[:4]
    model.train()
    out = obj(model, bits)
    assert out.extras["curriculum"] == 0.0
    for _ in range(10):
        obj(model, bits)
    assert "curriculum" not in obj(model, bits).extras
    model.eval()
    calls = obj.train_calls
    obj(model, bits)
    assert obj.train_calls == calls


# -- the sampler -----------------------------------------------------------------------------
def parity_valid(bits: torch.Tensor) -> bool:
    frames = bits.view(-1, 9).long()
    return bool((frames[:, :8].sum(1) % 2 == frames[:, 8]).all())


@pytest.mark.parametrize("prompt_bytes,n_frames", [(b"", 5), (b"hello", 6), (b"x" * 30, 12),
                                                   (b"abc", 40)])
def test_prompt_is_never_altered(prompt_bytes, n_frames):
    enc = Parity9Encoder()
    model = tiny_model("framed")
    prompt = enc.encode(prompt_bytes)
    before = prompt.clone()
    sampler = DiffusionSampler(steps=8)
    out = sampler.sample(model, prompt, n_frames, torch.Generator().manual_seed(3), enc)
    assert out.dtype == torch.uint8 and out.shape == (prompt.numel() + n_frames * 9,)
    assert torch.equal(out[: prompt.numel()], before)
    assert torch.equal(prompt, before)
    assert parity_valid(out)


def test_prompt_cells_stay_visible_to_the_model():
    """Every forward pass sees the prompt bits unchanged in front of the new bits."""
    enc = Parity9Encoder()
    prompt = enc.encode(b"ab")
    model = StubModel([0.0, 0.0], max_frames=8)
    DiffusionSampler(steps=8).sample(model, prompt, 3, torch.Generator().manual_seed(0), enc)
    assert model.seen
    for tokens in model.seen:
        assert torch.equal(tokens[0, : prompt.numel()].to(torch.uint8), prompt)


def test_sampler_is_deterministic_given_the_generator():
    enc = Parity9Encoder()
    model = tiny_model("flat")
    prompt = enc.encode(b"the ")
    a = DiffusionSampler(steps=16).sample(model, prompt, 6, torch.Generator().manual_seed(7), enc)
    b = DiffusionSampler(steps=16).sample(model, prompt, 6, torch.Generator().manual_seed(7), enc)
    c = DiffusionSampler(steps=16).sample(model, prompt, 6, torch.Generator().manual_seed(8), enc)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_parity_repair_count_is_exact():
    """A stub that (greedily) predicts known frames, some with a wrong parity bit."""
    rng = np.random.default_rng(0)
    n_frames = 10
    data = rng.integers(0, 2, size=(n_frames, 8))
    parity = data.sum(1) % 2
    wrong = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=bool)
    frames = np.concatenate([data, np.where(wrong, 1 - parity, parity)[:, None]], axis=1)
    target = torch.from_numpy(frames.reshape(-1))
    prompt = Parity9Encoder().encode(b"ok")
    logits = torch.zeros(prompt.numel() + target.numel(), 2)
    logits[prompt.numel():, 1] = torch.where(target == 1, 5.0, -5.0)
    model = StubModel(logits, max_frames=32)
    sampler = DiffusionSampler(steps=8, temperature=0.0)
    out = sampler.sample(model, prompt, n_frames, torch.Generator().manual_seed(0),
                         Parity9Encoder())
    assert sampler.parity_fixed == int(wrong.sum()) == 5
    new = out[prompt.numel():].view(n_frames, 9).numpy()
    assert np.array_equal(new[:, :8], data)  # data bits kept, parity recomputed
    assert np.array_equal(new[:, 8], parity)
    # an encoder without parity: nothing to fix, nothing counted
    raw_model = StubModel(torch.zeros(64, 2), frame_bits=8)
    sampler.sample(raw_model, torch.zeros(0, dtype=torch.uint8), 4,
                   torch.Generator().manual_seed(0), Raw8Encoder())
    assert sampler.parity_fixed == 0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_unmasks_everything(name):
    model = StubModel([0.0, 0.0], max_frames=8)
    sampler = DiffusionSampler(steps=8, schedule=name)
    out = sampler.sample(model, torch.zeros(0, dtype=torch.uint8), 8,
                         torch.Generator().manual_seed(0), Parity9Encoder())
    assert bool(((out == 0) | (out == 1)).all()) and parity_valid(out)
    assert 1 <= sampler.model_calls <= 8


# -- a real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["framed", "flat"])
def trained(request):
    """A tiny model trained a few steps on a repetitive corpus, with its losses."""
    model = tiny_model(request.param)
    obj = DiffusionObjective(schedule="linear", eval_samples=4)
    windows = corpus_windows(16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def held_out():
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            value = obj(model, windows[:8]).bits_per_byte
        model.train()
        return value

    before = held_out()
    torch.manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, windows.size(0), (8,), generator=g)
        out = obj(model, windows[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model, before, held_out()


def test_training_lowers_the_bound(trained):
    _, before, after = trained
    assert after < 0.8 * before, (before, after)


def test_samples_decode_with_every_parity_bit_correct(trained):
    model, _, _ = trained
    enc = Parity9Encoder()
    prompt = enc.encode(b"the cat ")
    sampler = DiffusionSampler(steps=16, temperature=0.0)
    out = sampler.sample(model, prompt, 8, torch.Generator().manual_seed(0), enc)
    data = enc.decode(out)  # raises ParityError on any wrong parity bit
    assert data.startswith(b"the cat ") and len(data) == 16


# -- registration ----------------------------------------------------------------------------
def test_registry_finds_objective_and_sampler():
    registry = get_registry(refresh=True)
    obj = registry.build("objective", "diffusion", {"schedule": "cosine", "antithetic": False})
    sampler = registry.build("sampler", "diffusion", {"steps": 32, "temperature": 0.5})
    assert isinstance(obj, DiffusionObjective) and obj.schedule.name == "cosine"
    assert isinstance(sampler, DiffusionSampler) and sampler.steps == 32
    assert registry.get("objective", "diffusion").distribution == "bitlm-diffusion"


def test_plugin_module_does_not_import_torch():
    code = "import sys, bitlm_diffusion.plugin; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


# -- unit: frame -------------------------------------------------------------------------------
def test_frame_unit_bound_is_the_frames_chain_rule_nll():
    """With whole frames masked, each masked frame costs exactly -log p(frame | visible)."""
    torch.manual_seed(0)
    cfg = ModelConfig(layout="framed", max_frames=16, d_model=32, n_layers=1, n_heads=4,
                      d_ff=64, frame_parity=True)
    model = BitTransformerLM(cfg, ReferenceAttention()).eval()
    bits = corpus_windows(4)[:2]
    obj = DiffusionObjective(schedule="linear", unit="frame")
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    frame_mask = torch.zeros(2, 4, dtype=torch.bool)
    frame_mask[0, [1, 3]] = True
    frame_mask[1, [0]] = True
    mask = frame_mask.repeat_interleave(9, dim=1)
    with torch.no_grad():
        got = obj.bound(model, bits, t, mask)
        tokens = torch.where(mask, torch.full_like(bits, MASK), bits)
        h = model.frame_states(tokens)
        scores = model.local.head(model.local.ln(h)).log_softmax(-1)  # over the 256 data values
        data = (bits.view(2, 4, 9)[..., :8].long() * 2 ** torch.arange(7, -1, -1)).sum(-1)
        nll = -scores.gather(-1, data.unsqueeze(-1)).squeeze(-1)  # (2, 4): -log p(frame)
    expected = torch.stack([2.0 * (nll[0, 1] + nll[0, 3]), 4.0 * nll[1, 0]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_frame_unit_masks_whole_frames_and_trains():
    model = tiny_model("framed")
    obj = DiffusionObjective(unit="frame")
    out = obj(model.train(), corpus_windows(8)[:4])
    assert out.is_bound and math.isfinite(out.bits_per_byte)
    out.loss.backward()
    assert model.local.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unit"):
        DiffusionObjective(unit="byte")
    with pytest.raises(Exception, match="framed"):
        obj(tiny_model("flat"), corpus_windows(8)[:2])


@pytest.mark.parametrize("prompt_bytes,n_frames", [(b"", 5), (b"hello", 6), (b"abc", 40)])
def test_frame_unit_sampler_keeps_the_prompt_and_parity(prompt_bytes, n_frames):
    enc = Parity9Encoder()
    model = tiny_model("framed")
    prompt = enc.encode(prompt_bytes)
    sampler = DiffusionSampler(steps=8, unit="frame")
    out = sampler.sample(model, prompt, n_frames, torch.Generator().manual_seed(3), enc)
    assert out.shape == (prompt.numel() + n_frames * 9,)
    assert torch.equal(out[: prompt.numel()], prompt) and parity_valid(out)
    again = DiffusionSampler(steps=8, unit="frame").sample(
        model, prompt, n_frames, torch.Generator().manual_seed(3), enc)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="framed"):
        sampler.sample(tiny_model("flat"), prompt, 2, torch.Generator(), enc)


def test_objective_and_sampler_meet_bitlms_contracts():
    from bitlm_core.testing import check_objective_contract, check_sampler_contract, tiny_model

    from bitlm_diffusion.objective import DiffusionObjective
    from bitlm_diffusion.sampler import DiffusionSampler

    for unit in ("bit", "frame"):
        model = tiny_model(causal=False)
        check_objective_contract(DiffusionObjective(unit=unit), model)
        check_sampler_contract(DiffusionSampler(steps=8, unit=unit), model)
