"""Euler steps of the flow ODE ``dx/dt = v(x, t)`` (diffusers' ``FlowMatchEulerDiscreteScheduler``).

On the grid ``1 = t_0 > t_1 > ... > t_N = 0`` (:func:`~._flow.flow_grid`),

    x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i),

``N`` velocity evaluations; exactly diffusers' deterministic ``step`` loop for the same
``shift`` / dynamic-shifting configuration.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._flow import FlowGridOptions, flow_grid, velocity_at
from diffusion_jax.samplers.options import read
from diffusion_jax.samplers.registry import register

__all__ = ["flow_euler", "flow_euler_sample"]


def flow_euler_sample(velocity, sigmas, x_init):
    """Euler steps over ``sigmas``.

    Args:
        velocity: ``v(x [B, ...], t [B]) -> [B, ...]``.
        sigmas: ``[N + 1]`` decreasing flow times (the last usually 0).
        x_init: ``[B, ...]`` sample at ``sigmas[0]`` (``N(0, I)`` at ``t = 1``).

    Returns:
        ``[B, ...]`` the sample at ``sigmas[-1]``.
    """

    def body(x, s):
        t, t_next = s
        return x + (t_next - t) * velocity_at(velocity, x, t), None

    x, _ = chain.scan(body, x_init.astype(jnp.float32), (sigmas[:-1], sigmas[1:]),
                      levels=sigmas[:-1], level_name="flow_t")
    return x


@register("flow_euler", options=FlowGridOptions, supports_t_start=False,
          supports_step_hook=False, flow=True)
def flow_euler(velocity, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """The registry's ``flow_euler`` (``num_steps`` evaluations)."""
    del schedule, key, t_start, step_hook
    settings = read(FlowGridOptions, options)
    return flow_euler_sample(velocity, flow_grid(settings, x_start.shape), x_start)
