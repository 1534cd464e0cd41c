"""Euler-ancestral (k-diffusion's ``sample_euler_ancestral``; diffusers'
``EulerAncestralDiscreteScheduler``), the registry entry ``euler_ancestral``: each Euler step
goes below the next noise level and fresh noise from ``fold_in(key, i)`` brings it back
(:func:`.euler.euler_sample` with ``ancestral=True``). Same grid and start as :mod:`.euler`;
``num_steps`` network evaluations.
"""
from __future__ import annotations

from diffusion_jax.samplers._sigma_steps import StepGridOptions
from diffusion_jax.samplers.euler import run_euler
from diffusion_jax.samplers.registry import register


@register("euler_ancestral", options=StepGridOptions, supports_t_start=False,
          supports_step_hook=False)
def euler_ancestral(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """diffusers' ``EulerAncestralDiscreteScheduler``, the registry's ``euler_ancestral``."""
    del t_start, step_hook  # not supported (the registry refuses them)
    return run_euler(denoise, schedule, x_start, key, options, ancestral=True)
