"""Pieces the applications share: noising to a step, resampling operators, sampler dispatch.

Images are NHWC ``[B, H, W, C]`` float in [-1, 1]. Step indices follow the project convention
(``t`` in ``{0, ..., T-1}``); a sampler's ``step_hook`` receives ``t_prev = -1`` after its last
step, which here means "the clean image" (``alpha_bar = 1``).
"""
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, samplers

SAMPLERS = ("ddpm", "ddim")


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


def area_downsample(x, factor):
    """Mean over non-overlapping ``factor x factor`` blocks: ``[B, H, W, C] -> [B, H/f, W/f, C]``.

    Raises:
        ValueError: if ``H`` or ``W`` is not divisible by ``factor``.
    """
    check_factor(x.shape, factor)
    batch, height, width, channels = x.shape
    blocks = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(2, 4))


def check_factor(shape, factor):
    """Raise ``ValueError`` unless the integer ``factor >= 1`` divides H and W of NHWC ``shape``."""
    height, width = shape[1], shape[2]
    if int(factor) != factor or factor < 1 or height % factor or width % factor:
        raise ValueError(f"factor={factor} must be an integer >= 1 dividing the image size "
                         f"{height}x{width}.")


def nearest_upsample(x, factor):
    """Repeat each pixel ``factor x factor`` times: ``[B, h, w, C] -> [B, h f, w f, C]``."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def resolve_t_start(t0, num_timesteps):
    """The first step ``round(t0 * T) - 1`` (at least 0) for a noise fraction ``t0`` in (0, 1].

    Raises:
        ValueError: if ``t0`` is outside (0, 1].
    """
    if not 0.0 < t0 <= 1.0:
        raise ValueError(
            f"t0 must lie in (0, 1] (a fraction of the {num_timesteps} steps), got {t0}.")
    return max(int(round(t0 * num_timesteps)) - 1, 0)


def run_sampler(sampler, denoise, sched, x_start, key, *, t_start=None, step_hook=None,
                num_steps=50, eta=0.0, spacing="uniform", pred_type="eps", variance="posterior",
                clip_x0=None):
    """Run :func:`~diffusion_jax.samplers.ddpm_sample` or :func:`~.samplers.ddim_sample`.

    DDPM ignores ``num_steps``, ``eta`` and ``spacing``; DDIM ignores ``variance`` and takes
    ``min(num_steps, t_start + 1)`` steps, the most its chain from ``t_start`` can have.

    Args:
        sampler: ``"ddpm"`` or ``"ddim"``.
        denoise, sched, x_start, key: as the samplers (``x_start`` is at step ``t_start``).
        t_start, step_hook, num_steps, eta, spacing, pred_type, variance, clip_x0: forwarded.

    Returns:
        ``x_0 [B, ...]``.

    Raises:
        ValueError: for an unknown ``sampler``.
    """
    if sampler == "ddpm":
        return samplers.ddpm_sample(denoise, sched, x_start, key, pred_type=pred_type,
                                    variance=variance, clip_x0=clip_x0, t_start=t_start,
                                    step_hook=step_hook)
    if sampler == "ddim":
        top = sched.num_timesteps - 1 if t_start is None else t_start
        return samplers.ddim_sample(denoise, sched, x_start, key,
                                    num_steps=min(num_steps, top + 1), eta=eta, spacing=spacing,
                                    pred_type=pred_type, clip_x0=clip_x0, t_start=t_start,
                                    step_hook=step_hook)
    raise ValueError(f"Unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}.")
