"""DDPM ancestral sampling (Ho et al., 2020): the step, the chain and the registry entry ``ddpm``.

Every step samples the Gaussian reverse transition with the mean of the forward posterior
``q(x_{t-1} | x_t, x0_pred)`` and the variance ``beta~_t`` (``posterior``) or ``beta_t``; the
chain visits every timestep, so ``ddpm`` has no ``num_steps`` and ``T`` network evaluations.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import PRED_TYPES, q_posterior
from diffusion_jax.samplers._checks import check_choice, check_t_start, check_x, one_of
from diffusion_jax.samplers._discrete import predict_x0_eps, run_chain, with_dynamic_threshold
from diffusion_jax.samplers.options import ThresholdOptions, option, read
from diffusion_jax.samplers.registry import register
from diffusion_jax.schedules import extract
from diffusion_jax.sde.adapters import clip_bounds

DDPM_VARIANCES = ("posterior", "beta")


@dataclasses.dataclass(frozen=True)
class DDPMOptions(ThresholdOptions):
    """Settings of ``ddpm``."""
    variance: str = option(
        "posterior", "DDPM reverse variance, ``posterior`` (``beta~_t``) or ``beta`` "
        "(``beta_t``); ``config.sample.ddpm_variance``.",
        check=one_of(DDPM_VARIANCES), config="ddpm_variance")


def ddpm_step(denoise, sched, x_t, t, key, *, pred_type="eps", variance="posterior", clip_x0=None):
    """One ancestral step ``x_t -> x_{t-1}`` of DDPM (Ho et al., 2020).

    The denoiser's prediction gives ``x0_pred`` (clipped to ``clip_x0`` if set); the step samples
    from the Gaussian with the mean of the forward posterior ``q(x_{t-1} | x_t, x0_pred)``:

        mu = coef1_t * x0_pred + coef2_t * x_t,
        x_{t-1} = mu + [t > 0] * sigma_t * z,   z ~ N(0, I),

    with ``sigma_t^2 = beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)`` for
    ``variance="posterior"`` or ``sigma_t^2 = beta_t`` for ``variance="beta"``. No noise is added
    at ``t = 0``, where ``mu = x0_pred``. Without clipping, ``mu`` equals the familiar
    ``(x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t)``.

    Args:
        denoise: ``denoise(x [B, ...], t [B] int32) -> prediction [B, ...]`` of ``pred_type``.
        sched: :class:`diffusion_jax.schedules.DiscreteSchedule`.
        x_t: ``[B, ...]`` current sample at step ``t``.
        t: scalar int (may be traced), ``0 <= t <= T-1``.
        key: PRNG key for ``z``.
        pred_type: what ``denoise`` predicts: ``eps``, ``x0``, ``v`` or ``score``.
        variance: ``posterior`` (``beta~_t``) or ``beta`` (``beta_t``).
        clip_x0: ``None`` or ``(lo, hi)``: clip ``x0_pred`` to ``[lo, hi]`` before the posterior
            mean. ``True`` means ``(-1, 1)``, the image range; ``False`` means ``None``.

    Returns:
        ``(x_prev [B, ...], x0_pred [B, ...])``.

    Raises:
        ValueError: for an unknown ``pred_type`` or ``variance`` or a malformed ``clip_x0``.
    """
    check_choice("pred_type", pred_type, PRED_TYPES)
    check_choice("variance", variance, DDPM_VARIANCES)
    clip_x0 = clip_bounds(clip_x0)
    t_b = jnp.full((x_t.shape[0],), t, jnp.int32)                          # [B]
    x0_pred, _ = predict_x0_eps(denoise, sched, x_t, t_b, pred_type, clip_x0)
    mean, _, _ = q_posterior(sched, x0_pred, x_t, t_b)
    var_table = sched.posterior_variance if variance == "posterior" else sched.betas
    std = jnp.sqrt(extract(var_table, t_b, x_t.ndim))                      # [B, 1, ..., 1]
    z = jax.random.normal(key, x_t.shape, x_t.dtype)
    x_prev = mean + jnp.where(t > 0, std, 0.0) * z
    return x_prev, x0_pred


def ddpm_sample(denoise, sched, x_T, key, *, pred_type="eps", variance="posterior", clip_x0=None,
                t_start=None, step_hook=None, return_trajectory=False):
    """DDPM ancestral sampling: :func:`ddpm_step` for ``t = t_start, ..., 0`` in one ``lax.scan``.

    Step ``i`` (``t = t_start - i``) draws ``z`` with ``fold_in(key, i)`` (split into the noise key
    and the hook's key). After each step, ``x_{t-1} = step_hook(x_{t-1}, x0_pred, t - 1, hook_key)``
    if a hook is given (``t - 1 = -1`` after the last step).

    Args:
        denoise: ``denoise(x [B, ...], t [B] int32) -> prediction [B, ...]``.
        sched: :class:`diffusion_jax.schedules.DiscreteSchedule` with ``T`` steps.
        x_T: ``[B, ...]`` starting sample at step ``t_start`` (``N(0, I)`` for ``t_start = T-1``).
        key: PRNG key.
        pred_type: ``eps``, ``x0``, ``v`` or ``score``.
        variance: ``posterior`` (``beta~_t``) or ``beta`` (``beta_t``).
        clip_x0: ``None``, ``(lo, hi)`` or ``True`` (``(-1, 1)``); see :func:`ddpm_step`.
        t_start: static int in ``[0, T-1]``; the chain starts at this step (SDEdit).
            Default ``T-1``.
        step_hook: optional ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev``
            (inpainting, ILVR).
        return_trajectory: also return every ``x_{t-1}`` (after the hook).

    Returns:
        ``x_0 [B, ...]``, or ``(x_0, trajectory [S, B, ...])`` with ``S = t_start + 1`` and
        ``trajectory[i]`` the sample after step ``i``.

    Raises:
        ValueError: for a bad ``pred_type``, ``variance``, ``clip_x0`` or ``t_start``.

    Example:
        >>> sched = make_schedule(linear_beta_schedule(1000))
        >>> sample = jax.jit(functools.partial(ddpm_sample, denoise, variance="beta"))
        >>> x0 = sample(sched, jax.random.normal(key, (16, 32, 32, 3)), key)   # [16, 32, 32, 3]
    """
    check_x(x_T, "x_T")
    check_choice("pred_type", pred_type, PRED_TYPES)
    check_choice("variance", variance, DDPM_VARIANCES)
    clip_x0 = clip_bounds(clip_x0)
    t_top = check_t_start(t_start, sched.num_timesteps)
    ts = jnp.arange(t_top, -1, -1, dtype=jnp.int32)                        # [S] descending

    def step(x, t, t_prev, step_key):
        return ddpm_step(denoise, sched, x, t, step_key, pred_type=pred_type, variance=variance,
                         clip_x0=clip_x0)

    return run_chain(step, x_T, key, ts, ts - 1, step_hook, return_trajectory)


def _every_step(options, num_timesteps):
    """``T`` network evaluations: the chain takes every step."""
    del options
    return int(num_timesteps)


@register("ddpm", options=DDPMOptions, evaluations=_every_step)
def ddpm(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """:func:`ddpm_sample` over every step, the registry's ``ddpm``."""
    settings = read(DDPMOptions, options)
    denoise, pred_type = with_dynamic_threshold(denoise, schedule, options.pred_type,
                                                settings.dynamic_threshold)
    return ddpm_sample(denoise, schedule, x_start, key, pred_type=pred_type,
                       variance=settings.variance, clip_x0=options.clip_x0, t_start=t_start,
                       step_hook=step_hook)
