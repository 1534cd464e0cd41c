"""DPM-Solver++(2M) (Lu et al., 2022) in the flow parameterisation.

The flow path ``x_t = alpha_t x_0 + sigma_t eps`` has ``alpha_t = 1 - t``, ``sigma_t = t`` and
``lambda_t = log(alpha_t / sigma_t) = log((1 - t) / t)``; its data prediction is
``D_i = x_i - t_i v(x_i, t_i)``. The exact solution of the ODE with ``D`` held constant over a
step gives DPM-Solver++'s update, which in flow time reads

    x_{i+1} = D' + (t_{i+1} / t_i) (x_i - D'),

(``(sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) D'`` with ``h = lambda_{i+1} -
lambda_i``; finite at ``t_i = 1``). First order: ``D' = D_i``; second order (2M):
``D' = (1 + 1 / (2 r)) D_i - D_{i-1} / (2 r)``, ``r = h_{i-1} / h_i``. The first step (from
``t = 1``, where ``h_{-1}`` is infinite) and the last (to ``t = 0``, ``h`` infinite; it returns
``D_{N-1}``) are first order, as diffusers' ``lower_order_final``. ``N`` evaluations on the grid
of :func:`~._flow.flow_grid`.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._flow import FlowGridOptions, flow_grid, velocity_at
from diffusion_jax.samplers.options import read
from diffusion_jax.samplers.registry import register

__all__ = ["flow_dpm_solver", "flow_dpm_solver_sample"]


def flow_dpm_solver_sample(velocity, sigmas, x_init):
    """DPM-Solver++(2M) over the flow times ``sigmas`` (module docstring).

    Args:
        velocity: ``v(x [B, ...], t [B]) -> [B, ...]``.
        sigmas: ``[N + 1]`` decreasing flow times in (0, 1], the last 0.
        x_init: ``[B, ...]`` sample at ``sigmas[0]``.

    Returns:
        ``[B, ...]`` the sample at ``t = 0``.
    """
    num = sigmas.shape[0] - 1
    lam = jnp.log(1.0 - sigmas) - jnp.log(sigmas)            # -inf at t = 1, +inf at t = 0
    h = lam[1:] - lam[:-1]                                   # [N]
    h_prev = jnp.concatenate([jnp.full((1,), jnp.inf), h[:-1]])
    # 1 / (2 r) = h_i / (2 h_{i-1}); 0 (first order) for the first and the last step.
    half_inv_r = jnp.where((jnp.arange(num) == 0) | (jnp.arange(num) == num - 1) |
                           ~jnp.isfinite(h_prev), 0.0, h / (2.0 * h_prev))

    def body(carry, s):
        x, d_prev = carry
        t, t_next, c = s
        d = x - t * velocity_at(velocity, x, t)
        d_mix = (1.0 + c) * d - c * d_prev
        return (d_mix + (t_next / t) * (x - d_mix), d), None

    x = x_init.astype(jnp.float32)
    (x, _), _ = chain.scan(body, (x, jnp.zeros_like(x)), (sigmas[:-1], sigmas[1:], half_inv_r),
                           levels=sigmas[:-1], level_name="flow_t", state_of=lambda c: c[0])
    return x


@register("flow_dpm_solver", options=FlowGridOptions, supports_t_start=False,
          supports_step_hook=False, flow=True)
def flow_dpm_solver(velocity, schedule, x_start, key, options, *, t_start=None,
                    step_hook=None):
    """The registry's ``flow_dpm_solver``: DPM-Solver++(2M), ``num_steps`` evaluations."""
    del schedule, key, t_start, step_hook
    settings = read(FlowGridOptions, options)
    return flow_dpm_solver_sample(velocity, flow_grid(settings, x_start.shape), x_start)
