"""UniPC (Zhao et al., 2023) as diffusers' ``UniPCMultistepScheduler`` runs it by default
(``bh2``, ``predict_x0``, orders 1 and 2): the registry entry ``unipc``.

Each step evaluates the model once, at the predicted state ``x_k``, and uses that output ``m_k``
twice. In VE scale, with ``r = sigma_k / sigma_{k-1} = e^-h``:

* UniC, the corrector (from step 1 on), re-does the step into ``sigma_k`` from the previous
  corrected state ``x^c_{k-1}`` with ``m_k`` included:
  ``x^c_k = r x^c_{k-1} + (1 - r) (m_{k-1} + rho_0 D_1 + rho_1 (m_k - m_{k-1}))``, where for
  the previous step's order 1 ``rho_1 = 1/2`` (no ``D_1``), and for order 2
  ``D_1 = (m_{k-2} - m_{k-1}) / r_k``, ``r_k = -h_{k-1} / h`` and ``(rho_0, rho_1)`` solve
  ``[[1, 1], [r_k, 1]] rho = (b_1, b_2)`` with (``u = -h``, ``B = e^u - 1``)
  ``b_1 = phi_1 / B``, ``b_2 = 2 phi_2 / B``, ``phi_1 = B / u - 1``, ``phi_2 = phi_1 / u - 1/2``;
* UniP, the predictor from ``x^c_k`` to ``sigma_{k+1}``: DPM-Solver++ 2M's update
  (:func:`.dpm_solver.multistep_update`; with ``bh2`` UniP-2 is exactly it).

Step ``i`` of ``n`` predicts with order ``min(solver_order, i + 1)``, and ``min(., n - i)`` with
``lower_order_final``; the corrector uses the order of the step that made ``x_k``. Grid as
:mod:`.dpmpp_2m` (:mod:`._sigma_steps`, multistep family); ``num_steps`` network evaluations.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._sigma_steps import grid_setup
from diffusion_jax.samplers.dpm_solver import multistep_update
from diffusion_jax.samplers.dpmpp_2m import MultistepOptions
from diffusion_jax.samplers.options import read
from diffusion_jax.samplers.registry import register


def unipc_orders(num_steps, solver_order, lower_order_final):
    """``[n]`` int32 predictor order of each step (module docstring)."""
    i = np.arange(num_steps)
    orders = np.minimum(solver_order, i + 1)
    if lower_order_final:
        orders = np.minimum(orders, num_steps - i)
    return orders.astype(np.int32)


def unic_correct(x_last, m_new, m1, m2, h, h_before, order):
    """The UniC-bh2 corrector (module docstring): ``x^c_k`` from ``x^c_{k-1}`` [B, ...], the
    model outputs ``m_k, m_{k-1}, m_{k-2}``, ``h = log(sigma_{k-1} / sigma_k)``, the step
    before's ``h_before`` and that step's ``order`` (1 or 2, may be traced)."""
    u = -h
    b_coef = jnp.expm1(u)
    phi_1 = b_coef / u - 1.0
    phi_2 = phi_1 / u - 0.5
    b_1, b_2 = phi_1 / b_coef, 2.0 * phi_2 / b_coef
    r_k = -h_before / h
    rho_0 = (b_1 - b_2) / (1.0 - r_k)
    rho_0, rho_1 = jnp.where(order == 1, 0.0, rho_0), jnp.where(order == 1, 0.5, b_1 - rho_0)
    d_1 = (m2 - m1) / r_k
    correction = rho_0 * d_1 + rho_1 * (m_new - m1)
    r = jnp.exp(-h)
    return r * x_last + (1.0 - r) * (m1 + correction)


def unipc_sample(denoiser, timesteps, sigmas, x_init, *, orders):
    """UniPC-bh2 over ``sigmas`` in one ``lax.scan``.

    Args:
        denoiser: ``D(x [B, ...], sigma, t) -> x0 [B, ...]`` (:func:`._sigma_steps.grid_setup`).
        timesteps: ``[n]`` the model's timestep at each step.
        sigmas: ``[n + 1]`` decreasing noise levels, the last 0 or ``sigma_min``.
        x_init: ``[B, ...]`` the state at ``sigmas[0]`` (VE scale).
        orders: ``[n]`` predictor orders (:func:`unipc_orders`).

    Returns:
        ``[B, ...]`` the state at ``sigmas[-1]`` (VE scale).
    """
    zeros = jnp.zeros_like(x_init)
    one = jnp.ones((), jnp.float32)
    orders = jnp.asarray(orders)
    corrector_orders = jnp.concatenate([orders[:1], orders[:-1]])

    def body(carry, inputs):
        x, x_last, m1, m2, h1, h2 = carry
        i, t, sigma, sigma_next, order, corrector_order = inputs
        m0 = denoiser(x, sigma, t)
        corrected = unic_correct(x_last, m0, m1, m2, h1, h2, corrector_order)
        x = jnp.where(i > 0, corrected, x)
        x_next, h = multistep_update(x, m0, m1, zeros, h1, one, sigma, sigma_next, order)
        return (x_next, x, m0, m1, h, h1), None

    num = timesteps.shape[0]
    (x, *_), _ = chain.scan(body, (x_init, zeros, zeros, zeros, one, one),
                            (jnp.arange(num), timesteps, sigmas[:-1], sigmas[1:], orders,
                             corrector_orders),
                            levels=sigmas[:-1], level_name="sigma", state_of=lambda c: c[0])
    return x


@register("unipc", options=MultistepOptions, supports_t_start=False, supports_step_hook=False)
def unipc(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """diffusers' ``UniPCMultistepScheduler`` (bh2, predict_x0), the registry's ``unipc``;
    starts from ``x_start`` as the VP state at ``sigma_0`` and returns the VP state."""
    del key, t_start, step_hook  # deterministic; part-way starts and hooks are refused
    settings = read(MultistepOptions, options)
    denoiser, ts, sigmas = grid_setup(denoise, schedule, options, settings, "multistep")
    orders = unipc_orders(settings.num_steps, settings.solver_order, settings.lower_order_final)
    x = unipc_sample(denoiser, ts, sigmas, x_start * jnp.sqrt(1.0 + sigmas[0]**2), orders=orders)
    return x / jnp.sqrt(1.0 + sigmas[-1]**2)
