"""Registers the ``diffusion`` objective and sampler with bitlm (entry point group ``bitlm``).

The factories are given as "module:attribute" strings: their modules import torch, and bitlm
imports them only when a spec uses them, so ``bitlm plugins list`` stays fast.
"""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import ObjectiveSpec, SamplerSpec


@hookimpl
def bitlm_objectives():
    yield ObjectiveSpec(
        "diffusion", "bitlm_diffusion.objective:DiffusionObjective",
        "masked bit diffusion, continuous-time ELBO (a bound on bits per byte); options "
        "schedule, eps, antithetic, t_min/t_max/curriculum_steps, eval_samples",
        sampler="diffusion",
    )


@hookimpl
def bitlm_samplers():
    yield SamplerSpec(
        "diffusion", "bitlm_diffusion.sampler:DiffusionSampler",
        "reverse masked diffusion from all-masked bits, prompt fixed, parity enforced; "
        "options steps (8-256), schedule, temperature",
    )
