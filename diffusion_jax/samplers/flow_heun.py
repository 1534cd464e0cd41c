"""Heun steps of the flow ODE (diffusers' ``FlowMatchHeunDiscreteScheduler``, no churn).

On the grid ``1 = t_0 > ... > t_N = 0`` (:func:`~._flow.flow_grid`), for ``i < N - 1``

    x' = x_i + (t_{i+1} - t_i) v(x_i, t_i),
    x_{i+1} = x_i + (t_{i+1} - t_i) (v(x_i, t_i) + v(x', t_{i+1})) / 2,

and an Euler step to ``t_N = 0`` (where the corrector's slope is not needed): ``2N - 1``
evaluations, as diffusers' interleaved timesteps ``[t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]``.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._flow import FlowGridOptions, flow_grid, velocity_at
from diffusion_jax.samplers.options import read
from diffusion_jax.samplers.registry import register

__all__ = ["flow_heun", "flow_heun_sample"]


def flow_heun_sample(velocity, sigmas, x_init):
    """Heun steps over ``sigmas`` with a final Euler step (module docstring).

    Args:
        velocity: ``v(x [B, ...], t [B]) -> [B, ...]``.
        sigmas: ``[N + 1]`` decreasing flow times, the last 0.
        x_init: ``[B, ...]`` sample at ``sigmas[0]``.

    Returns:
        ``[B, ...]`` the sample at ``sigmas[-1]``.
    """

    def body(x, s):
        t, t_next = s
        v = velocity_at(velocity, x, t)
        x_euler = x + (t_next - t) * v
        return x + (t_next - t) * 0.5 * (v + velocity_at(velocity, x_euler, t_next)), None

    x, _ = chain.scan(body, x_init.astype(jnp.float32), (sigmas[:-2], sigmas[1:-1]),
                      levels=sigmas[:-2], level_name="flow_t")
    x = x + (sigmas[-1] - sigmas[-2]) * velocity_at(velocity, x, sigmas[-2])
    chain.record_step(level=sigmas[-2], level_name="flow_t")
    return x


def _evaluations(options, num_timesteps):
    """Two per step but the last, an Euler step: ``2 num_steps - 1``."""
    del num_timesteps
    return 2 * options.num_steps - 1


@register("flow_heun", options=FlowGridOptions, evaluations=_evaluations,
          supports_t_start=False, supports_step_hook=False, flow=True)
def flow_heun(velocity, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """The registry's ``flow_heun`` (``2 num_steps - 1`` evaluations)."""
    del schedule, key, t_start, step_hook
    settings = read(FlowGridOptions, options)
    return flow_heun_sample(velocity, flow_grid(settings, x_start.shape), x_start)
