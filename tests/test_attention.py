"""The reference backend's chunked attention, and ``auto`` picking a backend for a request."""

from __future__ import annotations

import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention, auto_attention, chunk_mask
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.registry import get_registry
from bitlm_core.testing.attention import check_attention_contract, check_no_lookahead


@pytest.mark.parametrize("chunk_size,overlap", [(1, 0), (4, 0), (5, 2), (8, 8), (64, 3)])
def test_chunked_reference_meets_the_contract(chunk_size, overlap):
    backend = ReferenceAttention(chunk_size=chunk_size, overlap=overlap)
    check_attention_contract(backend, dtypes=("float32",), seed=chunk_size)
    check_no_lookahead(backend)


def test_chunked_reference_builds_no_full_map_unless_asked(monkeypatch):
    calls = []
    real_matmul = torch.matmul

    def spy(a, b, *args, **kwargs):
        calls.append((a.shape[-2], b.shape[-1]))
        return real_matmul(a, b, *args, **kwargs)

    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    backend = ReferenceAttention(chunk_size=8, overlap=4)
    monkeypatch.setattr(torch, "matmul", spy)
    out, weights = backend(q, k, v, causal=True)
    assert weights is None
    score_shapes = [c for c in calls if c[1] != 8]  # q @ k^T products: (queries, keys)
    assert score_shapes and max(tq * tk for tq, tk in score_shapes) <= 8 * 12
    calls.clear()
    out_w, weights = backend(q, k, v, causal=True, need_weights=True)
    monkeypatch.undo()
    assert weights.shape == (1, 2, 40, 40)
    assert weights[..., ~chunk_mask(40, 40, 8, 4, causal=True)].abs().max() == 0
    torch.testing.assert_close(out, out_w)


def test_bad_chunking_is_refused():
    for kwargs in ({"chunk_size": 0}, {"chunk_size": 4, "overlap": -1}, {"overlap": 3}):
        with pytest.raises(ValueError):
            ReferenceAttention(**kwargs)


def test_auto_passes_chunking_to_the_backend_it_picks():
    backend = auto_attention(chunk_size=16, overlap=4)
    assert backend.chunk_size == 16 and backend.overlap == 4
    expected = "sdpa" if "sdpa" in get_registry().names("attention") else "reference"
    assert backend.name == expected


@pytest.mark.parametrize("layout", ["flat", "framed"])
def test_a_chunked_model_matches_across_backends(layout):
    if "sdpa" not in get_registry().names("attention"):
        pytest.skip("sdpa plugin not installed")
    cfg = ModelConfig(layout=layout, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_frames=12)
    torch.manual_seed(0)
    ref = BitTransformerLM(cfg, ReferenceAttention(chunk_size=5, overlap=2)).eval()
    fast = BitTransformerLM(cfg, get_registry().build("attention", "sdpa",
                                                      {"chunk_size": 5, "overlap": 2})).eval()
    fast.load_state_dict(ref.state_dict())
    bits = torch.randint(0, 2, (2, 12 * 9), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(fast(bits), ref(bits), atol=1e-5, rtol=1e-4)


def test_full_attention_maps_are_saved_only_when_asked(tmp_path, tiny_spec):
    from safetensors.torch import load_file

    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    execute(load_spec(tiny_spec(steps=3)), tmp_path / "off", log=lambda m: None)
    assert not (tmp_path / "off" / "attention").exists()
    spec = load_spec(tiny_spec(steps=3, attention={"name": "reference",
                                                   "full_attn_logging": True}))
    execute(spec, tmp_path / "on", log=lambda m: None)
    maps = load_file(str(tmp_path / "on" / "attention" / "step-3.safetensors"))
    assert sorted(maps) == ["layer0", "layer1"]
    T = 16  # framed: one position per byte of the 16-byte window
    assert maps["layer0"].shape == (2, T, T)
    torch.testing.assert_close(maps["layer0"].sum(-1), torch.ones(2, T))
    assert maps["layer0"].triu(1).abs().max() == 0  # causal
