"""Registers the ``diffusion`` objective and sampler with bitlm (entry point group ``bitlm``)."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import ObjectiveSpec, SamplerSpec


@hookimpl
def bitlm_objectives():
    # Imported here so that listing plugins stays cheap (these modules import torch).
    from bitlm_diffusion.objective import DiffusionObjective

    yield ObjectiveSpec(
        "diffusion", DiffusionObjective,
        "masked bit diffusion, continuous-time ELBO (a bound on bits per byte); options "
        "schedule, eps, antithetic, t_min/t_max/curriculum_steps, eval_samples",
    )


@hookimpl
def bitlm_samplers():
    from bitlm_diffusion.sampler import DiffusionSampler

    yield SamplerSpec(
        "diffusion", DiffusionSampler,
        "reverse masked diffusion from all-masked bits, prompt fixed, parity enforced; "
        "options steps (8-256), schedule, temperature",
    )
