"""Euler's method on the probability-flow ODE in VE noise level, as diffusers'
``EulerDiscreteScheduler`` runs it: the registry entry ``euler`` (and the loop
:mod:`.euler_ancestral` shares).

With ``x = x_vp sqrt(1 + sigma^2)`` (VE scale) and ``D`` the model's x0 prediction, the ODE is
``dx / dsigma = (x - D(x, sigma)) / sigma`` and one step is

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i, sigma_i)) / sigma_i.

The grid is diffusers' (:mod:`._sigma_steps`); ``num_steps`` network evaluations. The chain
starts from ``x_start`` times diffusers' ``init_noise_sigma``: ``sqrt(1 + sigma_0^2)`` (reading
``x_start`` as the VP state at ``sigma_0``) for ``leading`` spacing and ``sigma_0`` for
``linspace`` / ``trailing`` (diffusers' choice, kept so outputs match). It returns the state at
the last sigma as it is (VE scale; equal to the VP state when that sigma is 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._sigma_steps import StepGridOptions, grid_setup
from diffusion_jax.samplers.options import read
from diffusion_jax.samplers.registry import register


def init_noise_sigma(sigma_0, timestep_spacing):
    """diffusers' ``init_noise_sigma`` of the Euler schedulers: the factor from ``N(0, I)``
    to the chain's start, ``sqrt(1 + sigma_0^2)`` for ``leading`` spacing, else ``sigma_0``."""
    return jnp.sqrt(1.0 + sigma_0**2) if timestep_spacing == "leading" else sigma_0


def euler_sample(denoiser, timesteps, sigmas, x_init, key=None, *, ancestral=False):
    """Euler (or Euler-ancestral) steps over ``sigmas`` in one ``lax.scan``.

    The ancestral step (Karras et al.'s k-diffusion ``sample_euler_ancestral``) goes down to
    ``sigma_down`` and adds fresh noise back up to ``sigma_{i+1}``:

        sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2),
        x_{i+1} = x_i + (sigma_down - sigma_i) (x_i - D) / sigma_i + sigma_up z_i,

    ``z_i ~ N(0, I)`` from ``fold_in(key, i)``.

    Args:
        denoiser: ``D(x [B, ...], sigma, t) -> x0 [B, ...]`` (:func:`._sigma_steps.grid_setup`).
        timesteps: ``[n]`` the model's timestep at each step.
        sigmas: ``[n + 1]`` decreasing noise levels, the last 0 or ``sigma_min``.
        x_init: ``[B, ...]`` the state at ``sigmas[0]`` (VE scale).
        key: PRNG key (ancestral only).
        ancestral: static; add noise as above.

    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]``.
    """

    def body(x, inputs):
        i, t, sigma, sigma_next = inputs
        slope = (x - denoiser(x, sigma, t)) / sigma
        if not ancestral:
            return x + (sigma_next - sigma) * slope, None
        sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x + (sigma_down - sigma) * slope + sigma_up * noise, None

    num = timesteps.shape[0]
    x, _ = chain.scan(body, x_init, (jnp.arange(num), timesteps, sigmas[:-1], sigmas[1:]),
                      levels=sigmas[:-1], level_name="sigma")
    return x


def run_euler(denoise, schedule, x_start, key, options, *, ancestral):
    """The registry entries' shared body: grid, start scaling, chain."""
    settings = read(StepGridOptions, options)
    denoiser, ts, sigmas = grid_setup(denoise, schedule, options, settings, "euler")
    x_init = x_start * init_noise_sigma(sigmas[0], settings.timestep_spacing)
    return euler_sample(denoiser, ts, sigmas, x_init, key, ancestral=ancestral)


@register("euler", options=StepGridOptions, supports_t_start=False, supports_step_hook=False)
def euler(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """diffusers' ``EulerDiscreteScheduler`` (no churn), the registry's ``euler``."""
    del t_start, step_hook  # not supported (the registry refuses them)
    return run_euler(denoise, schedule, x_start, key, options, ancestral=False)
