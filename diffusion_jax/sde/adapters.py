"""Bridges between model parameterisations: discrete DDPM models, x0-denoisers and SDE scores.

The continuous samplers (:mod:`diffusion_jax.samplers`) take one of two callables:

* an x0-denoiser of VE noise level (Karras et al., 2022): ``D(x, sigma) ~ E[x_0 | x]`` for
  ``x = x_0 + sigma n``, with ``x: [B, ...]`` and ``sigma: [B]``;
* a score of an SDE's time: ``score(x, t) ~ grad_x log q_t(x)``, ``t: [B]``.

Any SDE's ``x_t = m x_0 + s n`` is ``m (x_0 + sigma n)`` with ``sigma = s / m``, so by Tweedie

    score(x_t, t) = (m D(x_t / m, sigma) - x_t) / s^2

(:func:`score_from_denoiser`). A discrete DDPM model ``denoise(x_t, t_int)`` (``pred_type`` eps,
x0, v or score, :class:`~diffusion_jax.schedules.DiscreteSchedule`) is a denoiser at the levels
``sigma_k = sqrt((1 - alpha_bar_k) / alpha_bar_k)``; :func:`ddpm_denoiser` extends it to every
``sigma`` (see there), so a model trained in discrete time drives every continuous sampler;
:func:`sde_for_schedule` is the SDE matching its schedule.
"""
import jax.numpy as jnp

from diffusion_jax.diffusion import PRED_TYPES, to_x0_and_eps
from diffusion_jax.sde._util import expand, per_example
from diffusion_jax.sde.sdes import VESDE, SubVPSDE, VPSDE, marginal_coefficients


def discrete_sigmas(schedule):
    """``sigma_k = sqrt((1 - alpha_bar_k) / alpha_bar_k)`` of a schedule: ``[T]``, increasing."""
    return schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod


def nearest_timestep(schedule, sigma):
    """The discrete step whose ``sigma_k`` is nearest to ``sigma`` in ``log sigma``.

    Returns int32 shaped as ``sigma``.

    ``sigma`` below ``sigma_0`` gives 0 and above ``sigma_{T-1}`` gives ``T - 1``.
    """
    log_sigmas = jnp.log(discrete_sigmas(schedule))                         # [T] increasing
    log_sigma = jnp.log(jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-20))
    hi = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma), 1, log_sigmas.shape[0] - 1)
    lo = hi - 1
    pick_hi = (log_sigmas[hi] - log_sigma) < (log_sigma - log_sigmas[lo])
    return jnp.where(pick_hi, hi, lo).astype(jnp.int32)


def ddpm_denoiser(denoise, schedule, pred_type="eps", clip_x0=None):
    """A discrete DDPM model as an x0-denoiser ``D(x, sigma)`` of continuous VE noise level.

    ``D(x, sigma)``: with ``alpha_bar = 1 / (1 + sigma^2)`` the model sees the VP-scaled input
    ``x_vp = sqrt(alpha_bar) x`` at the discrete step ``k`` nearest to ``sigma`` in ``log sigma``
    (:func:`nearest_timestep`), and its prediction is turned into ``x_0`` with the *actual*
    ``alpha_bar`` (so an eps-model gives ``x - sigma eps``).

    Why the nearest step: the model takes integer timesteps (the registry's ``int32`` contract),
    and interpolating two evaluations would double the network evaluations per step. With
    ``T = 1000`` neighbouring ``log sigma_k`` are < 0.03 apart over most of the range, so the
    rounding error is small (EDM's ``iDDPMPrecond`` rounds the same way); on the grid
    (``sigma = sigma_k``) ``D`` is exactly the model's x0 prediction.

    Args:
        denoise: ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]`` of ``pred_type``.
        schedule: :class:`~diffusion_jax.schedules.DiscreteSchedule` the model was trained with.
        pred_type: ``eps``, ``x0``, ``v`` or ``score``.
        clip_x0: ``None`` or ``(lo, hi)`` (``True`` means ``(-1, 1)``): clip the x0 prediction.

    Returns:
        ``D(x [B, ...], sigma [B]) -> x0 [B, ...]``.

    Raises:
        ValueError: for an unknown ``pred_type`` or a malformed ``clip_x0``.
    """
    if pred_type not in PRED_TYPES:
        raise ValueError(f"Unknown pred_type {pred_type!r}; expected one of {PRED_TYPES}.")
    bounds = clip_bounds(clip_x0)

    def denoiser(x, sigma):
        sigma = per_example(sigma, x.shape[0])
        alpha_bar = expand(1.0 / (1.0 + sigma**2), x.ndim)
        x_vp = jnp.sqrt(alpha_bar) * x
        pred = denoise(x_vp, nearest_timestep(schedule, sigma)).astype(jnp.float32)
        x0, _ = to_x0_and_eps(pred, x_vp, alpha_bar, pred_type)
        return x0 if bounds is None else jnp.clip(x0, *bounds)

    return denoiser


def score_from_denoiser(sde, denoiser):
    """The score ``(m D(x / m, s / m) - x) / s^2`` of a denoiser; ``(m, s)`` from ``sde`` at ``t``.

    Args:
        sde: a :class:`~diffusion_jax.sde.sdes.VESDE`, ``VPSDE`` or ``SubVPSDE``.
        denoiser: ``D(x [B, ...], sigma [B]) -> x0 [B, ...]``.

    Returns:
        ``score(x [B, ...], t [B]) -> [B, ...]``.
    """

    def score(x, t):
        m, s = marginal_coefficients(sde, per_example(t, x.shape[0]))
        m_b, s_b = expand(m, x.ndim), expand(s, x.ndim)
        return (m_b * denoiser(x / m_b, s / m) - x) / s_b**2

    return score


def ddpm_score(denoise, schedule, sde, pred_type="eps", clip_x0=None):
    """A discrete DDPM model as the score of ``sde``'s time: :func:`score_from_denoiser` of
    :func:`ddpm_denoiser`. Returns ``score(x [B, ...], t [B]) -> [B, ...]``."""
    return score_from_denoiser(sde, ddpm_denoiser(denoise, schedule, pred_type, clip_x0))


def dynamic_threshold(x0, percentile=0.995):
    """Imagen's dynamic thresholding (Saharia et al., 2022) of an x0 prediction ``[B, ...]``.

    ``s_b = max(quantile_p(|x0_b|), 1)`` over each example's entries, then
    ``x0_b <- clip(x0_b, -s_b, s_b) / s_b``; with ``s_b = 1`` this is plain clipping to ``[-1, 1]``.

    Args:
        x0: ``[B, ...]``.
        percentile: ``p`` in ``(0, 1]``.

    Raises:
        ValueError: if ``percentile`` is outside ``(0, 1]``.
    """
    if isinstance(percentile, (int, float)) and not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic threshold percentile must lie in (0, 1], got {percentile}.")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)          # [B]
    s = expand(s, x0.ndim)
    return jnp.clip(x0, -s, s) / s


def thresholded(denoiser, percentile=0.995):
    """``D'(x, sigma) = dynamic_threshold(D(x, sigma), percentile)`` (x0-predicting samplers)."""
    return lambda x, sigma: dynamic_threshold(denoiser(x, sigma), percentile)


def clip_bounds(clip_x0):
    """``None`` or a validated ``(lo, hi)``; ``True`` -> ``(-1, 1)``, ``False`` -> ``None``.

    Raises:
        ValueError: unless ``clip_x0`` is ``None``, a bool or a pair with ``lo < hi``.
    """
    if clip_x0 is None or clip_x0 is False:
        return None
    if clip_x0 is True:
        return (-1.0, 1.0)
    if not (isinstance(clip_x0, (tuple, list)) and len(clip_x0) == 2 and clip_x0[0] < clip_x0[1]):
        raise ValueError(
            f"clip_x0 must be None, True or a pair (lo, hi) with lo < hi, got {clip_x0!r}.")
    return (float(clip_x0[0]), float(clip_x0[1]))


def sde_for_schedule(schedule, name="vp", num_scales=1000):
    """The continuous SDE that matches a discrete schedule.

    VP / sub-VP: ``beta_min = T beta_0``, ``beta_max = T beta_{T-1}`` (exact for the linear
    schedule, whose ``beta_i`` are ``beta(t_i) / T``; for other schedules only the time
    parameterisation differs, since the model is queried by noise level). VE: ``sigma_min`` and
    ``sigma_max`` are the schedule's first and last
    :func:`~diffusion_jax.sde.adapters.discrete_sigmas`.

    Raises:
        ValueError: for an unknown ``name``.
    """
    t = schedule.num_timesteps
    if name in ("vp", "subvp"):
        cls = VPSDE if name == "vp" else SubVPSDE
        return cls(t * schedule.betas[0], t * schedule.betas[-1], int(num_scales))
    if name == "ve":
        sigmas = discrete_sigmas(schedule)
        return VESDE(sigmas[0], sigmas[-1], int(num_scales))
    raise ValueError(f"Unknown sde {name!r}; expected one of ['subvp', 've', 'vp'].")
