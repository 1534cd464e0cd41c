"""Annealed Langevin dynamics (NCSN), plain Langevin dynamics, and the registry entry ``langevin``.

The entry runs annealed Langevin dynamics on the variance-exploding view of a VP (DDPM)
denoiser; ``num_steps * langevin_steps_each + 1`` network evaluations (the last one the final
Tweedie step).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.diffusion import to_x0_and_eps
from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import (call_denoiser, check_positive, check_positive_int,
                                            check_x)
from diffusion_jax.samplers.ddim import ddim_timesteps
from diffusion_jax.samplers.options import StepsOptions, option, read
from diffusion_jax.samplers.registry import register


@dataclasses.dataclass(frozen=True)
class LangevinOptions(StepsOptions):
    """Settings of ``langevin`` (``num_steps``: its noise levels)."""
    langevin_steps_each: int = option(5, "Langevin updates per noise level.",
                                      check=check_positive_int)
    langevin_step_lr: float = option(2e-5, "Langevin step size at the last level.",
                                     check=check_positive, traced=True)


def annealed_langevin_sample(score_fn, sigmas, x_init, key, *, n_steps_each=100, step_lr=2e-5,
                             denoise_final=True, return_trajectory=False):
    """Annealed Langevin dynamics of NCSN (Song & Ermon, 2019, Algorithm 1).

    For each noise level ``sigma_i`` (decreasing, ``i = 0, ..., L-1``) the step size is
    ``alpha_i = step_lr * sigma_i^2 / sigma_{L-1}^2`` and ``n_steps_each`` updates are made:

        x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z,   z ~ N(0, I).

    The ``L * n_steps_each`` updates are one flattened ``lax.scan``; update ``k`` (level
    ``k // n_steps_each``) draws ``z`` with ``fold_in(key, k)``. With ``denoise_final`` a last
    Tweedie step removes the smallest noise: ``x <- x + sigma_{L-1}^2 s(x, sigma_{L-1})``.

    Args:
        score_fn: ``score_fn(x [B, ...], sigma [B]) -> score [B, ...]``, an estimate of
            ``grad_x log p_sigma(x)`` for the data convolved with ``N(0, sigma^2 I)``.
        sigmas: ``[L]`` decreasing noise levels (e.g. :func:`diffusion_jax.sde.sdes.geometric_sigmas`).
        x_init: ``[B, ...]`` starting point (NCSN uses uniform noise; ``sigma_0 * N(0, I)`` works).
        key: PRNG key.
        n_steps_each: static number of updates per level, ``>= 1``.
        step_lr: ``epsilon > 0``, the step size at the last level.
        denoise_final: apply the final Tweedie denoising step.
        return_trajectory: also return every iterate.

    Returns:
        ``x [B, ...]``, or ``(x, trajectory [L * n_steps_each (+1 with denoise_final), B, ...])``
        whose last entry is ``x``.

    Raises:
        ValueError: if ``sigmas`` is not ``[L]``, ``n_steps_each < 1`` or ``step_lr <= 0``.

    Example:
        >>> sigmas = geometric_sigmas(50.0, 0.01, 232)
        >>> x = annealed_langevin_sample(score_fn, sigmas, sigmas[0] * noise, key, n_steps_each=5)
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must have shape [L] with L >= 1, got shape {sigmas.shape}.")
    check_x(x_init, "x_init")
    check_positive_int("n_steps_each", n_steps_each)
    check_positive("step_lr", step_lr)
    batch = x_init.shape[0]
    levels = jnp.repeat(jnp.arange(sigmas.shape[0]), n_steps_each)          # [L * n]
    step_sizes = step_lr * (sigmas / sigmas[-1]) ** 2                        # [L]

    def body(x, inputs):
        k, level = inputs
        sigma_b = jnp.full((batch,), sigmas[level], jnp.float32)
        score = call_denoiser(score_fn, x, sigma_b)
        x = _langevin_update(x, score, step_sizes[level], jax.random.fold_in(key, k))
        return x, (x if return_trajectory else None)

    x, traj = chain.scan(body, x_init, (jnp.arange(levels.shape[0]), levels),
                         levels=sigmas[levels], level_name="sigma")
    if denoise_final:
        x = x + sigmas[-1] ** 2 * score_fn(x, jnp.full((batch,), sigmas[-1], jnp.float32))
        chain.record_step(level=sigmas[-1], level_name="sigma")
        if return_trajectory:
            traj = jnp.concatenate([traj, x[None]], axis=0)
    return (x, traj) if return_trajectory else x


def langevin_sample(score_fn, x_init, key, *, step_size, num_steps):
    """Unadjusted Langevin dynamics for a fixed target ``p``.

        x <- x + (delta / 2) grad log p(x) + sqrt(delta) z,   z ~ N(0, I),

    repeated ``num_steps`` times in one ``lax.scan``, step ``k`` drawing ``z`` with
    ``fold_in(key, k)``. Its stationary law approaches ``p`` as ``delta -> 0`` (for a Gaussian
    with variance ``s^2`` it is Gaussian with variance ``s^2 / (1 - delta / (4 s^2))``).

    Args:
        score_fn: ``score_fn(x [B, ...]) -> grad_x log p(x) [B, ...]``.
        x_init: ``[B, ...]``.
        key: PRNG key.
        step_size: ``delta > 0``.
        num_steps: static number of updates, ``>= 1``.

    Returns:
        ``x [B, ...]`` after ``num_steps`` updates.

    Raises:
        ValueError: if ``step_size <= 0`` or ``num_steps < 1``.
    """
    check_positive("step_size", step_size)
    check_positive_int("num_steps", num_steps)

    def body(x, k):
        return _langevin_update(x, score_fn(x), step_size, jax.random.fold_in(key, k)), None

    x, _ = lax.scan(body, x_init, jnp.arange(num_steps))
    return x


def _evaluations(options, num_timesteps):
    """``num_steps * langevin_steps_each`` updates plus the final Tweedie step."""
    del num_timesteps
    return options.num_steps * options.langevin_steps_each + 1


@register("langevin", options=LangevinOptions, evaluations=_evaluations,
          supports_t_start=False, supports_step_hook=False)
def langevin(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """:func:`annealed_langevin_sample` on the variance-exploding view of a VP denoiser.

    The ``L = num_steps`` levels are the DDIM timesteps ``t_l`` with
    ``sigma_l = sqrt((1 - ab_{t_l}) / ab_{t_l})``; the chain starts at ``sigma_0 x_start`` and
    its result (a clean-image estimate) is clipped when ``clip_x0`` is set.
    """
    del t_start, step_hook  # unsupported: run() rejects them
    settings = read(LangevinOptions, options)
    ts = ddim_timesteps(schedule.num_timesteps, settings.num_steps)           # [L] descending
    alpha_bar = schedule.alphas_cumprod[ts]
    sigmas = jnp.sqrt((1.0 - alpha_bar) / alpha_bar)                          # [L] decreasing
    score_fn = _ve_score_fn(denoise, schedule, ts, sigmas, options.pred_type)
    y = annealed_langevin_sample(score_fn, sigmas, sigmas[0] * x_start, key,
                                 n_steps_each=settings.langevin_steps_each,
                                 step_lr=settings.langevin_step_lr)
    return y if options.clip_x0 is None else jnp.clip(y, *options.clip_x0)


def _ve_score_fn(denoise, schedule, ts, sigmas, pred_type):
    """A VP (DDPM) denoiser as the score of the variance-exploding variable y = x_t / sqrt(ab_t).

    ``y = x_0 + sigma eps`` with ``sigma_t = sqrt((1 - ab_t) / ab_t)``, so
    ``score(y, sigma_t) = -eps(sqrt(ab_t) y, t) / sigma_t``. ``sigma [B]`` must be one of
    ``sigmas [L]`` (the levels at timesteps ``ts [L]``).
    """

    def score_fn(y, sigma):
        level = jnp.argmin(jnp.abs(sigmas[None, :] - sigma[:, None]), axis=1)  # [B]
        t = ts[level]
        alpha_bar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (y.ndim - 1))
        x_t = jnp.sqrt(alpha_bar) * y
        _, eps = to_x0_and_eps(call_denoiser(denoise, x_t, t), x_t, alpha_bar, pred_type)
        return -eps / sigma.reshape(alpha_bar.shape)

    return score_fn


def _langevin_update(x, score, step_size, key):
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x + 0.5 * step_size * score + jnp.sqrt(step_size) * noise
