"""The ``causal`` objective: next-bit cross-entropy, reported in bits per byte."""

from __future__ import annotations

import math

from bitlm_core.interfaces import ObjectiveOutput

LN2 = math.log(2.0)


class CausalObjective:
    """Mean cross-entropy (nats) of every bit given the bits before it.

    ``bits_per_byte`` is the same loss summed over a frame's bits and converted to bits: it is
    exactly the code length an arithmetic coder driven by the model would need per byte.
    """

    name = "causal"
    causal = True

    def __call__(self, model, bits) -> ObjectiveOutput:
        import torch.nn.functional as F

        logits = model(bits, causal=True)  # (B, L, 2)
        loss = F.cross_entropy(logits.reshape(-1, 2).float(), bits.reshape(-1).long())
        accuracy = float((logits.detach().argmax(-1) == bits).float().mean())
        return ObjectiveOutput(loss=loss, bits_per_byte=float(loss.detach()) * model.frame_bits / LN2,
                               extras={"accuracy": accuracy},
                               probs=logits.float().softmax(dim=-1)[..., 1])
