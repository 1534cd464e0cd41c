"""Pieces the applications share: noising to a step, the start step of SDEdit, default options.

Sampling goes through the one registry, :func:`diffusion_jax.samplers.run`; the resampling
operators (``area_downsample``, ``nearest_upsample``, ``check_factor``) live in
:mod:`diffusion_jax.conditioning` and are re-exported here for the applications.

Images are NHWC ``[B, H, W, C]`` float in [-1, 1]. Step indices follow the project convention
(``t`` in ``{0, ..., T-1}``); a sampler's ``step_hook`` receives ``t_prev = -1`` after its last
step, which here means "the clean image" (``alpha_bar = 1``).
"""
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, samplers
from diffusion_jax.conditioning import area_downsample, check_factor, nearest_upsample

__all__ = ["area_downsample", "check_factor", "nearest_upsample", "q_sample_level",
           "resolve_t_start", "default_options"]


def q_sample_level(sched, x0, t, key):
    """``x0`` noised to step ``t`` with ``q(x_t | x_0)``, or ``x0`` itself when ``t < 0``.

    ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) z``, ``z ~ N(0, I)`` from ``key``.

    Args:
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` clean images.
        t: scalar int step (may be traced); ``-1`` returns ``x0`` exactly.
        key: PRNG key for ``z``.

    Returns:
        ``[B, ...]``.
    """
    t_b = jnp.full((x0.shape[0],), jnp.maximum(t, 0), jnp.int32)
    noised = diffusion.q_sample(sched, x0, t_b, jax.random.normal(key, x0.shape, x0.dtype))
    return jnp.where(t >= 0, noised, x0)


def resolve_t_start(t0, num_timesteps):
    """The first step ``round(t0 * T) - 1`` (at least 0) for a noise fraction ``t0`` in (0, 1].

    Raises:
        ValueError: if ``t0`` is outside (0, 1].
    """
    if not 0.0 < t0 <= 1.0:
        raise ValueError(
            f"t0 must lie in (0, 1] (a fraction of the {num_timesteps} steps), got {t0}.")
    return max(int(round(t0 * num_timesteps)) - 1, 0)


def default_options(options):
    """``options``, or the default :class:`~diffusion_jax.samplers.SamplerOptions` if None."""
    return samplers.make_options() if options is None else options
