import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.model import MASK, BitTransformerLM, ModelConfig

CASES = [("flat", "tree"), ("framed", "joint"), ("framed", "tree"), ("framed", "node_mlp"), ("framed", "mlp")]


def tiny(layout, local="tree", frames=6, seed=0, parity=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(layout=layout, local=local, max_frames=frames, d_model=32, n_layers=2,
                      n_heads=4, d_ff=64, local_dim=16, frame_parity=parity)
    return BitTransformerLM(cfg, ReferenceAttention()).eval()


@pytest.mark.parametrize("layout, local, parity", [(*c, False) for c in CASES]
                         + [("framed", "joint", True)])
def test_causal_mode_never_looks_ahead(layout, local, parity):
    """Flipping bit i changes no prediction of bits 0..i (they must not depend on it)."""
    model = tiny(layout, local, parity=parity)
    bits = torch.randint(0, 2, (2, 6 * 9), dtype=torch.uint8)
    base = model(bits)
    for i in range(bits.size(1)):
        flipped = bits.clone()
        flipped[:, i] ^= 1
        diff = (model(flipped) - base).abs().amax(dim=(0, 2))
        assert diff[: i + 1].max() == 0, f"bit {i} leaked into an earlier or its own prediction"
        # with parity support a frame's parity bit is implied by its data bits: nothing reads it
        if i + 1 < bits.size(1) and not (parity and i % 9 == 8):
            assert diff[i + 1:].max() > 0, f"bit {i} influences no later prediction"


@pytest.mark.parametrize("layout, local", CASES)
def test_cached_decoder_matches_the_full_forward(layout, local):
    model = tiny(layout, local)
    bits = torch.randint(0, 2, (3, 6 * 9), dtype=torch.uint8)
    full = model(bits)
    dec = model.decoder(bits[:, :18])
    got = []
    for i in range(18, bits.size(1)):
        got.append(dec.logits())
        dec.push(bits[:, i])
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 18:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("parity", [False, True])
def test_joint_decoding_reads_each_bit_from_the_frames_sums_exactly(parity):
    """The cached decoder computes the joint predictor's sums once per frame and gathers each
    bit's logits from them: the very logits of the predictor's forward pass at that bit, past
    the context too and after whole frames pushed at once."""
    model = tiny("framed", "joint", parity=parity)
    torch.nn.init.normal_(model.local.head.weight, std=1.0)  # sharp scores
    bits = torch.randint(0, 2, (3, 16 * 9), dtype=torch.uint8)
    dec = model.decoder(bits[:, :9])
    for i in range(9, bits.size(1)):
        if i % 27 == 0:  # a whole frame at once now and then
            dec.push_frame(bits[:, i:i + 9])
        if i % 27 < 9 and i % 27:
            continue
        j = i % 9
        full = torch.zeros(3, 9, dtype=torch.long)
        full[:, :j] = dec.frame_prefix
        assert torch.equal(dec.logits(), model.local(dec.h, full)[:, j])
        if i % 27 != 0:
            dec.push(bits[:, i])


@pytest.mark.parametrize("layout", ["flat", "framed"])
def test_decoder_runs_past_the_context(layout):
    model = tiny(layout)
    dec = model.decoder(torch.zeros(1, 0, dtype=torch.uint8))
    for _ in range(20 * 9):
        dec.push(dec.logits().argmax(-1))
    assert dec.history.shape == (1, 180)


@pytest.mark.parametrize("layout", ["flat", "framed"])
def test_non_causal_mode_sees_the_whole_sequence(layout):
    model = tiny(layout)
    tokens = torch.randint(0, 2, (1, 54), dtype=torch.uint8)
    tokens[0, ::5] = MASK
    base = model(tokens, causal=False)
    assert base.shape == (1, 54, 2)
    flipped = tokens.clone()
    flipped[0, -1] = 1 - flipped[0, -1] if flipped[0, -1] < 2 else 0
    assert (model(flipped, causal=False)[0, 0] - base[0, 0]).abs().max() > 0


def test_reference_attention_returns_maps():
    model = tiny("framed")
    logits, maps = model(torch.zeros(1, 54, dtype=torch.uint8), return_attention=True)
    assert len(maps) == 2 and maps[0].shape == (1, 4, 6, 6)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 4, 6))
    assert maps[0][0, 0].triu(1).abs().max() == 0  # causal: nothing above the diagonal


def test_too_long_input_is_a_clear_error():
    from bitlm_core.errors import BitsError

    with pytest.raises(BitsError, match="sliding window"):
        tiny("framed")(torch.zeros(1, 9 * 7, dtype=torch.uint8))
    with pytest.raises(BitsError, match="whole number"):
        tiny("framed")(torch.zeros(1, 10, dtype=torch.uint8))


def frame_values(bits):
    """bits (..., F) MSB first -> integer values (...)."""
    place = 2 ** torch.arange(bits.size(-1) - 1, -1, -1)
    return (bits.long() * place).sum(-1)


def parity9_frames(data_values):
    bits = (data_values[..., None] >> torch.arange(7, -1, -1)) & 1
    return torch.cat([bits, bits.sum(-1, keepdim=True) % 2], dim=-1)


@pytest.mark.parametrize("parity", [False, True])
def test_joint_bit_probabilities_are_the_chain_rule_of_one_frame_distribution(parity):
    from bitlm_core.model import JointBitPredictor

    torch.manual_seed(0)
    cfg = ModelConfig(frame_bits=9, d_model=16, local="joint", frame_parity=parity)
    local = JointBitPredictor(cfg)
    with torch.no_grad():
        local.head.weight.normal_(std=2.0)
    h = torch.randn(64, 16)
    scores = torch.log_softmax(local.head(local.ln(h)), dim=-1)  # one per scored frame value
    if parity:
        data = torch.randint(0, 256, (64,))
        bits, expected = parity9_frames(data), scores.gather(-1, data[:, None])[:, 0]
    else:
        value = torch.randint(0, 512, (64,))
        bits = (value[:, None] >> torch.arange(8, -1, -1)) & 1
        expected = scores.gather(-1, value[:, None])[:, 0]
    logp = torch.log_softmax(local(h, bits), dim=-1).gather(-1, bits[..., None].long())[..., 0]
    torch.testing.assert_close(logp.sum(-1), expected, atol=1e-4, rtol=1e-4)
    if parity:  # the parity bit is certain once the data bits are known
        assert logp[:, 8].abs().max() < 1e-6
    # non-causal: each bit's marginal under the frame distribution
    marginal = torch.softmax(local(h), dim=-1)[..., 1]
    probs = scores.exp()
    values = torch.arange(probs.size(-1))
    all_bits = parity9_frames(values) if parity else (values[:, None] >> torch.arange(8, -1, -1)) & 1
    torch.testing.assert_close(marginal, probs @ all_bits.float(), atol=1e-5, rtol=1e-4)


def test_joint_with_parity_samples_only_valid_frames():
    torch.manual_seed(0)
    cfg = ModelConfig(layout="framed", local="joint", frame_parity=True, max_frames=8,
                      d_model=32, n_layers=1, n_heads=4, d_ff=64)
    model = BitTransformerLM(cfg, ReferenceAttention()).eval()
    dec = model.decoder(torch.zeros(4, 0, dtype=torch.uint8))
    gen = torch.Generator().manual_seed(0)
    for _ in range(6 * 9):
        probs = torch.softmax(dec.logits(), dim=-1)
        dec.push(torch.multinomial(probs, 1, generator=gen)[:, 0])
    frames = dec.history.view(4, 6, 9).long()
    assert (frames.sum(-1) % 2 == 0).all()


@pytest.mark.parametrize("layout, local", CASES)
def test_full_forward_decoder_gives_the_cached_logits(layout, local):
    model = tiny(layout, local)
    bits = torch.randint(0, 2, (2, 6 * 9), dtype=torch.uint8)  # the whole context
    cached, full = model.decoder(bits[:, :9]), model.decoder(bits[:, :9], cache=False)
    for i in range(9, bits.size(1)):
        torch.testing.assert_close(full.logits(), cached.logits(), atol=1e-5, rtol=1e-4)
        cached.push(bits[:, i])
        full.push(bits[:, i])


@pytest.mark.parametrize("layout", ["flat", "framed"])
def test_sampling_with_and_without_the_cache_gives_the_same_bits(layout):
    from bitlm_core.builtins.encoders import Parity9Encoder
    from bitlm_core.builtins.samplers import AutoregressiveSampler

    model = tiny(layout)
    prompt = Parity9Encoder().encode(b"ab")
    runs = [AutoregressiveSampler(cache=c).sample(model, prompt, 3,
                                                   torch.Generator().manual_seed(3),
                                                   Parity9Encoder()) for c in (True, False)]
    assert runs[0].shape == (5 * 9,) and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("parity", [True, False])
def test_joint_non_causal_marginals_condition_on_known_bits(parity):
    from bitlm_core.model import JointBitPredictor

    torch.manual_seed(0)
    cfg = ModelConfig(layout="framed", d_model=16, frame_parity=parity)
    local = JointBitPredictor(cfg).eval()
    h = torch.randn(3, 16)
    known = torch.tensor([[1, MASK, 0, MASK, 1, 1, MASK, 0, MASK],
                          [MASK] * 9,
                          [0, 1, 1, 0, MASK, 0, 1, 0, 1]])
    got = local(h, known=known).softmax(-1)[..., 1]  # P(bit = 1)
    with torch.no_grad():
        scores = local.head(local.ln(h)).double()
    n = 8 if parity else 9
    for row in range(3):
        num, den = torch.zeros(9, dtype=torch.double), torch.zeros((), dtype=torch.double)
        for v in range(2 ** n):
            frame = [(v >> (n - 1 - i)) & 1 for i in range(n)]
            if parity:
                frame.append(sum(frame) % 2)
            if any(k != 2 and k != b for k, b in zip(known[row].tolist(), frame)):
                continue
            p = scores[row, v].exp()
            den += p
            num += p * torch.tensor(frame, dtype=torch.double)
        torch.testing.assert_close(got[row].double(), num / den, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_neighbour_mixing_is_non_causal_only(layout):
    torch.manual_seed(0)
    cfg = ModelConfig(layout=layout, max_frames=6, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                      neighbours=2)
    model = BitTransformerLM(cfg, ReferenceAttention()).eval()
    x = torch.randn(1, 5, 32)
    W = model.neighbour_mix
    pad = torch.zeros(32)
    for t in range(5):
        parts = []
        for k in (1, 2):
            parts += [x[0, t - k] if t - k >= 0 else pad, x[0, t + k] if t + k < 5 else pad]
        torch.testing.assert_close(model.mix_neighbours(x)[0, t], x[0, t] + W(torch.cat(parts)))
    with torch.no_grad():  # the causal forward never reads ahead, mixing or not
        W.weight.normal_()
        bits = torch.randint(0, 2, (1, 6 * 9), dtype=torch.uint8)
        base = model(bits)
        flipped = bits.clone()
        flipped[0, 30] ^= 1
        assert (model(flipped) - base)[:, :31].abs().max() == 0


def test_frame_states_are_the_framed_layouts():
    from bitlm_core.errors import BitsError

    flat = BitTransformerLM(ModelConfig(layout="flat", d_model=16, n_layers=1, n_heads=2,
                                        max_frames=4), ReferenceAttention())
    with pytest.raises(BitsError, match="frame_states needs the framed layout"):
        flat.frame_states(torch.zeros(1, 36, dtype=torch.uint8))
