"""Masked (absorbing-state) bit diffusion for bitlm: noise schedules, the ``diffusion``
objective (continuous-time ELBO) and the ``diffusion`` sampler.

Importing this package does not import torch; the submodules do when they are used.
"""

__version__ = "0.2.0"
