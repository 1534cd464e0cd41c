"""DPM-Solver++ multistep as diffusers' ``DPMSolverMultistepScheduler`` runs it: the registry
entries ``dpmpp_2m`` (``algorithm_type = dpmsolver++``) and ``dpmpp_2m_sde``
(``sde-dpmsolver++``), orders 1 and 2 with the ``midpoint`` solver type.

In VE scale (``x = x_vp sqrt(1 + sigma^2)``), with ``h = log(sigma_i / sigma_{i+1})``,
``r = e^-h = sigma_{i+1} / sigma_i``, the denoiser outputs ``m_0`` (this step) and ``m_1`` (the
one before) and ``r_0 = h_{i-1} / h``:

* ODE (:func:`.dpm_solver.multistep_update`): order 1 ``x' = r x + (1 - r) m_0``; order 2
  ``x' = r x + (1 - r) (m_0 + (m_0 - m_1) / (2 r_0))``;
* SDE (Lu et al. 2022, SDE-DPM-Solver++): order 1
  ``x' = r^2 x + (1 - r^2) m_0 + sigma_{i+1} sqrt(1 - r^2) z``; order 2 adds
  ``(1 - r^2) (m_0 - m_1) / (2 r_0)``; ``z ~ N(0, I)`` from ``fold_in(key, i)``.

Step ``i`` of ``n`` is first order when ``solver_order = 1``, at the first step, and at the last
when ``final_sigmas_type = zero`` or (``lower_order_final`` and ``n < 15``): diffusers' rule.
The grid is diffusers' (:mod:`._sigma_steps`, multistep family); the chain starts from
``x_start`` read as the VP state at ``sigma_0`` and returns the VP state at the last sigma (as
diffusers, whose state is VP); ``num_steps`` network evaluations.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import one_of
from diffusion_jax.samplers._sigma_steps import StepGridOptions, grid_setup
from diffusion_jax.samplers.dpm_solver import multistep_update
from diffusion_jax.samplers.options import option, read
from diffusion_jax.samplers.registry import register


@dataclasses.dataclass(frozen=True)
class MultistepOptions(StepGridOptions):
    """Settings of ``dpmpp_2m`` / ``dpmpp_2m_sde`` / ``unipc`` (diffusers' defaults)."""
    solver_order: int = option(2, "multistep order of dpmpp_2m / dpmpp_2m_sde / unipc, 1 or 2.",
                               check=one_of((1, 2)), convert=int, config=None)
    lower_order_final: bool = option(
        True, "lower orders at the end, diffusers' rule: dpmpp a first-order last step when "
        "there are fewer than 15 steps, unipc orders capped by the steps left.",
        convert=bool, config=None)


def step_orders(num_steps, solver_order, lower_order_final, final_sigmas_type):
    """``[n]`` int32 order of each step, diffusers' rule (module docstring)."""
    orders = np.full(num_steps, solver_order, np.int32)
    orders[0] = 1
    if final_sigmas_type == "zero" or (lower_order_final and num_steps < 15):
        orders[-1] = 1
    return orders


def sde_update(x, m0, m1, h1, sigma, sigma_next, step_order, noise):
    """One SDE-DPM-Solver++ step (module docstring); returns ``(x_next, h)``."""
    final = sigma_next <= 0.0
    r = sigma_next / sigma                                                  # e^-h
    h = jnp.where(final, 1.0, jnp.log(sigma / jnp.where(final, sigma, sigma_next)))
    slope = jnp.where(step_order == 1, 0.0, 0.5 * h / h1) * (m0 - m1)        # (m0 - m1) / 2 r0
    x_next = r**2 * x + (1.0 - r**2) * (m0 + slope) + sigma_next * jnp.sqrt(1.0 - r**2) * noise
    return x_next, h


def dpmpp_sample(denoiser, timesteps, sigmas, x_init, key=None, *, orders, sde=False):
    """DPM-Solver++ (2M, or 2M SDE with ``sde``) over ``sigmas`` in one ``lax.scan``.

    Args:
        denoiser: ``D(x [B, ...], sigma, t) -> x0 [B, ...]`` (:func:`._sigma_steps.grid_setup`).
        timesteps: ``[n]`` the model's timestep at each step.
        sigmas: ``[n + 1]`` decreasing noise levels, the last 0 or ``sigma_min``.
        x_init: ``[B, ...]`` the state at ``sigmas[0]`` (VE scale).
        key: PRNG key (``sde`` only).
        orders: ``[n]`` the order of each step (:func:`step_orders`).
        sde: static; the SDE variant.

    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (VE scale).
    """
    zeros = jnp.zeros_like(x_init)
    one = jnp.ones((), jnp.float32)

    def body(carry, inputs):
        x, m1, h1 = carry
        i, t, sigma, sigma_next, order = inputs
        m0 = denoiser(x, sigma, t)
        if sde:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            x_next, h = sde_update(x, m0, m1, h1, sigma, sigma_next, order, noise)
        else:
            x_next, h = multistep_update(x, m0, m1, zeros, h1, one, sigma, sigma_next, order)
        return (x_next, m0, h), None

    num = timesteps.shape[0]
    (x, _, _), _ = chain.scan(body, (x_init, zeros, one),
                              (jnp.arange(num), timesteps, sigmas[:-1], sigmas[1:],
                               jnp.asarray(orders)),
                              levels=sigmas[:-1], level_name="sigma", state_of=lambda c: c[0])
    return x


def _run(denoise, schedule, x_start, key, options, sde):
    settings = read(MultistepOptions, options)
    denoiser, ts, sigmas = grid_setup(denoise, schedule, options, settings, "multistep")
    orders = step_orders(settings.num_steps, settings.solver_order, settings.lower_order_final,
                         settings.final_sigmas_type)
    x_init = x_start * jnp.sqrt(1.0 + sigmas[0]**2)
    x = dpmpp_sample(denoiser, ts, sigmas, x_init, key, orders=orders, sde=sde)
    return x / jnp.sqrt(1.0 + sigmas[-1]**2)


@register("dpmpp_2m", options=MultistepOptions, supports_t_start=False,
          supports_step_hook=False)
def dpmpp_2m(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``), the registry's
    ``dpmpp_2m``."""
    del t_start, step_hook  # not supported (the registry refuses them)
    return _run(denoise, schedule, x_start, key, options, sde=False)


@register("dpmpp_2m_sde", options=MultistepOptions, supports_t_start=False,
          supports_step_hook=False)
def dpmpp_2m_sde(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """diffusers' ``DPMSolverMultistepScheduler`` (``sde-dpmsolver++``), the registry's
    ``dpmpp_2m_sde``."""
    del t_start, step_hook  # not supported (the registry refuses them)
    return _run(denoise, schedule, x_start, key, options, sde=True)
