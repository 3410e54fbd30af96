"""Core objectives: ``causal`` (next-bit cross-entropy) and ``distill`` (plus a teacher)."""

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
    is_bound = False

    def __call__(self, model, bits) -> ObjectiveOutput:
        return next_bit_output(model, bits)[1]


def next_bit_output(model, bits):
    """One causal pass -> (float32 logits (B, L, 2), the ``causal`` objective's output)."""
    import torch.nn.functional as F

    logits = model(bits, causal=True).float()  # (B, L, 2)
    loss = F.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1).long())
    accuracy = float((logits.detach().argmax(-1) == bits).float().mean())
    return logits, ObjectiveOutput(loss=loss,
                                   bits_per_byte=float(loss.detach()) * model.frame_bits / LN2,
                                   extras={"accuracy": accuracy},
                                   probs=logits.softmax(dim=-1)[..., 1])


class DistillObjective:
    """Next-bit cross-entropy plus agreement with a trained teacher run's bit probabilities.

    Options: ``teacher`` (a run folder written by ``bitlm run`` with a causal objective and the
    same encoder), ``alpha`` (weight of the teacher term, default 0.5) and ``temperature``
    (default 1.0). While training, the loss per bit is::

        (1 - alpha) * CE(student, bit) + alpha * T^2 * KL(teacher_T || student_T)

    where ``_T`` are both models' two-way distributions with logits divided by ``T`` (Hinton et
    al., 2015, "Distilling the Knowledge in a Neural Network"). ``bits_per_byte`` is always the
    student's own cross-entropy, so held-out figures compare with any other run; in evaluation
    mode the teacher is not run at all. The teacher should have been trained on the same
    training split: a teacher that saw the student's held-out text would leak it.
    """

    name = "distill"
    causal = True
    is_bound = False

    def __init__(self, teacher: str, alpha: float = 0.5, temperature: float = 1.0):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not isinstance(teacher, str) or not teacher:
            raise ValueError("teacher must be the path of a run folder written by `bitlm run`")
        self.teacher_dir, self.alpha, self.temperature = teacher, float(alpha), float(temperature)
        self._teacher = None

    def teacher(self, model):
        """The teacher model, loaded once (never unpickled) and checked against the student."""
        if self._teacher is None:
            import torch

            from bitlm_core.app.loading import load_run
            from bitlm_core.engine.device import model_device
            from bitlm_core.errors import BitlmError, SpecError

            # building the teacher seeds torch's generator: keep the student's stream intact,
            # so a resumed run draws the same dropout as an uninterrupted one
            with torch.random.fork_rng(devices=[]):
                try:
                    run = load_run(self.teacher_dir, device=str(model_device(model)))
                except BitlmError as exc:
                    raise SpecError(f"distill teacher: {exc}") from None
            if not run.comps.causal:
                raise SpecError(f"distill teacher {self.teacher_dir} was trained with objective "
                                f"'{run.spec.objective.name}'; a teacher must be causal")
            if run.model.frame_bits != model.frame_bits:
                raise SpecError(f"distill teacher {self.teacher_dir} uses {run.model.frame_bits}"
                                f"-bit frames, the student {model.frame_bits}: give both the "
                                "same data.encoder")
            for p in run.model.parameters():
                p.requires_grad_(False)
            self._teacher = run.model.eval()
        return self._teacher

    def __call__(self, model, bits) -> ObjectiveOutput:
        import torch
        import torch.nn.functional as F

        from bitlm_core.errors import SpecError

        logits, out = next_bit_output(model, bits)  # bits_per_byte: the student's own CE
        if model.training and self.alpha > 0:
            teacher = self.teacher(model)
            frames = bits.size(-1) // model.frame_bits
            if frames > teacher.cfg.max_frames:
                raise SpecError(f"distill teacher {self.teacher_dir} sees {teacher.cfg.max_frames}"
                                f" bytes of context, the student's windows have {frames}: "
                                "lower data.seq_len or use a teacher with a longer context")
            with torch.no_grad():
                target = (teacher(bits, causal=True).float() / self.temperature).softmax(-1)
            log_student = F.log_softmax(logits / self.temperature, dim=-1)
            kl = F.kl_div(log_student.reshape(-1, 2), target.reshape(-1, 2),
                          reduction="batchmean")
            out.loss = (1 - self.alpha) * out.loss + self.alpha * self.temperature ** 2 * kl
            out.extras["distill_kl"] = float(kl.detach())
        return out
