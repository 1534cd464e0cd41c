"""Rectified flow (flow matching) mathematics: the path, its time sampling and shifts, the loss,
and the conversions between a velocity and eps / x0 / score / an EDM denoiser.

Conventions (Stable Diffusion 3, Flux, diffusers' ``FlowMatch*`` schedulers): flow time
``t`` in [0, 1] runs from data to noise,

    x_t = (1 - t) x_0 + t eps,        eps ~ N(0, I),
    v   = dx_t/dt = eps - x_0         (the regression target),

so a velocity model ``v(x_t, t)`` gives ``x_0 = x_t - t v``, ``eps = x_t + (1 - t) v`` and, as
``E[eps | x_t] = -t grad log p_t(x_t)``, the score ``-(x_t + (1 - t) v) / t``. The optimum of
the loss is ``v*(x, t) = E[eps - x_0 | x_t = x]``.

Relation to the other noise scales: ``x_t = (1 - t) (x_0 + sigma n)`` with
``sigma = t / (1 - t)`` (EDM/VE noise level), so ``y = x_t / (1 - t)`` is a VE sample and
``D(y, sigma) = x_t - t v(x_t, t)`` with ``t = sigma / (1 + sigma)`` is an EDM denoiser
(:func:`denoiser_from_velocity`). In VP scale ``x_vp = sqrt(ab) x_0 + sqrt(1 - ab) n``:
``t = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))`` and ``x_t = x_vp / (sqrt(ab) + sqrt(1 - ab))``.

Time sampling (Esser et al., 2024, "Scaling rectified flow transformers", section 3.1; the
densities there are used as sampling distributions, as diffusers'
``compute_density_for_timestep_sampling`` does), :data:`TIME_SAMPLINGS`:

* ``uniform``: ``t ~ U(0, 1)``;
* ``logit_normal``: ``t = sigmoid(n)``, ``n ~ N(mean, std^2)``;
* ``mode``: ``t = 1 - u - s (cos^2(pi u / 2) - 1 + u)``, ``u ~ U(0, 1)``, scale ``s`` in
  ``[-1, 2 / (pi - 2)]`` (monotone there);
* ``cosmap``: ``t = 1 - 1 / (tan(pi u / 2) + 1)``.

Then the resolution shift ``t' = s t / (1 + (s - 1) t)`` (:func:`shift_time`; ``s = 1``: none).
Flux's dynamic shift (:func:`dynamic_shift_mu`, :func:`exponential_time_shift`) takes
``mu`` linear in the image's token count and ``t' = e^mu / (e^mu + (1 / t - 1))``.

Loss weights of the per-example squared error, :data:`WEIGHTINGS` (as diffusers'
``compute_loss_weighting_for_sd3``): ``none`` (1), ``sigma_sqrt`` (``t^-2``), ``cosmap``
(``2 / (pi (1 - 2 t + 2 t^2))``).

All functions are pure and work under ``jax.jit`` / ``vmap`` / ``grad``; ``x: [B, ...]``,
``t: [B]`` (broadcast over the trailing axes).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from diffusion_jax.sde._util import check_choice, expand

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))  # f_mode is monotone for s in this range
TIME_SCALE = 1000.0  # the network's time input is 1000 t (SD3 / Flux timesteps)


def interpolate(x0, noise, t):
    """``x_t = (1 - t) x_0 + t eps``; ``x0, noise: [B, ...]``, ``t: [B]``."""
    t = expand(t, x0.ndim)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
    """``v = eps - x_0`` (the time derivative of :func:`interpolate`)."""
    return noise - x0


def x0_from_velocity(x_t, v, t):
    """``x_0 = x_t - t v``."""
    return x_t - expand(t, x_t.ndim) * v


def eps_from_velocity(x_t, v, t):
    """``eps = x_t + (1 - t) v``."""
    return x_t + (1.0 - expand(t, x_t.ndim)) * v


def score_from_velocity(x_t, v, t):
    """``score = grad log p_t(x_t) = -eps / t = -(x_t + (1 - t) v) / t`` (``t > 0``)."""
    return -eps_from_velocity(x_t, v, t) / expand(t, x_t.ndim)


def velocity_from_x0(x_t, x0, t):
    """``v = (x_t - x_0) / t`` (``t > 0``)."""
    return (x_t - x0) / expand(t, x_t.ndim)


def velocity_from_eps(x_t, eps, t):
    """``v = (eps - x_t) / (1 - t)`` (``t < 1``)."""
    return (eps - x_t) / (1.0 - expand(t, x_t.ndim))


def velocity_from_score(x_t, score, t):
    """``v = (-t score - x_t) / (1 - t)`` (``t < 1``)."""
    return velocity_from_eps(x_t, -expand(t, x_t.ndim) * score, t)


def shift_time(t, shift):
    """SD3's resolution shift ``t' = s t / (1 + (s - 1) t)`` (``s = 1``: identity; ``s > 1``
    moves times toward noise). Maps [0, 1] onto itself, monotone increasing for ``s > 0``."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def dynamic_shift_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5,
                     max_shift=1.15):
    """Flux's ``mu``: linear in the token count, ``base_shift`` at ``base_seq_len`` and
    ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``).

    ``mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len -
    base_seq_len)``.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def exponential_time_shift(t, mu):
    """Flux's time shift ``t' = e^mu / (e^mu + (1 / t - 1))``, i.e. :func:`shift_time` with
    ``s = e^mu`` (``mu``: a host number)."""
    return shift_time(t, math.exp(mu))


def flow_sigmas(num_steps, shift=1.0, mu=None, num_train_timesteps=1000):
    """The sampling grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``.

    ``sigma_max = 1``, ``sigma_min = shift(1 / T)`` (the scheduler's training grid is
    already shifted when ``mu`` is ``None``); ``N`` times uniform from ``sigma_max`` to
    ``sigma_min``, then shifted: :func:`exponential_time_shift` by ``mu`` (dynamic shifting) or
    :func:`shift_time` by ``shift``; a final ``0`` is appended. Host numpy, float64 then
    float32 as diffusers computes it.

    Args:
        num_steps: ``N >= 1``.
        shift: the static shift ``s > 0`` (unused when ``mu`` is given).
        mu: ``None`` or Flux's ``mu`` (:func:`dynamic_shift_mu`).
        num_train_timesteps: ``T`` of the scheduler (1000 for SD3 / Flux).

    Returns:
        ``sigmas [N + 1]`` float32 numpy, decreasing from 1 to 0; the model's timesteps are
        ``T sigmas[:N]``.
    """
    sigma_min = 1.0 / num_train_timesteps
    if mu is None:
        sigma_min = float(np.float32(shift_time(np.float32(sigma_min), np.float32(shift))))
    times = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, int(num_steps))
    sigmas = times / num_train_timesteps
    sigmas = exponential_time_shift(sigmas, mu) if mu is not None else shift_time(sigmas, shift)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def check_time_sampling(time_sampling, *, mode_scale=0.0, logit_std=1.0, shift=1.0,
                        prefix="diffusion.flow_"):
    """Raise ``ValueError`` naming the field unless the time-sampling settings are valid.

    Args:
        time_sampling: one of :data:`TIME_SAMPLINGS`.
        mode_scale: ``mode``'s scale, in :data:`MODE_SCALE_RANGE`.
        logit_std: ``logit_normal``'s std, ``> 0``.
        shift: the resolution shift ``s > 0``.
        prefix: the fields' prefix in error messages (the config section).
    """
    check_choice(f"{prefix}time_sampling", time_sampling, TIME_SAMPLINGS)
    lo, hi = MODE_SCALE_RANGE
    if not lo <= mode_scale <= hi:
        raise ValueError(f"{prefix}mode_scale must lie in [{lo}, {hi:.4f}] (where SD3's mode "
                         f"density is monotone), got {mode_scale}.")
    if not logit_std > 0:
        raise ValueError(f"{prefix}logit_std must be > 0, got {logit_std}.")
    if not shift > 0:
        raise ValueError(f"{prefix}shift must be > 0 (1 = no shift), got {shift}.")


def sample_times(key, batch, time_sampling="uniform", *, logit_mean=0.0, logit_std=1.0,
                 mode_scale=1.29, shift=1.0):
    """Training times ``t [B]`` of ``time_sampling`` (module docstring), then shifted.

    Args:
        key: PRNG key.
        batch: ``B``.
        time_sampling: one of :data:`TIME_SAMPLINGS` (static).
        logit_mean, logit_std: ``logit_normal``'s ``n ~ N(mean, std^2)``.
        mode_scale: ``mode``'s ``s``.
        shift: :func:`shift_time`'s ``s``.

    Returns:
        ``(t [B], quantile [B])``: the times, and each one's quantile under its own
        distribution (in [0, 1], increasing with ``t``), for loss-by-noise-level metrics.

    Raises:
        ValueError: for an unknown ``time_sampling``.
    """
    check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    if time_sampling == "logit_normal":
        n = jax.random.normal(key, (batch,))
        t, quantile = jax.nn.sigmoid(logit_mean + logit_std * n), norm.cdf(n)
    else:
        u = jax.random.uniform(key, (batch,))
        if time_sampling == "mode":
            t = 1.0 - u - mode_scale * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)
            quantile = 1.0 - u
        elif time_sampling == "cosmap":
            t, quantile = 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0), u
        else:
            t, quantile = u, u
    return shift_time(t, shift), quantile


def loss_weight(t, weighting="none"):
    """Per-example loss weight of :data:`WEIGHTINGS` at times ``t [B]`` (module docstring)."""
    check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "sigma_sqrt":
        return t**-2.0
    if weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    return jnp.ones_like(t)


def flow_matching_loss(velocity_fn, x0, key, *, time_sampling="uniform", logit_mean=0.0,
                       logit_std=1.0, mode_scale=1.29, shift=1.0, weighting="none"):
    """Conditional flow matching: ``E_t,eps [w(t) |v(x_t, t) - (eps - x_0)|^2]`` (mean over
    the non-batch axes per example, then over the batch).

    Args:
        velocity_fn: ``velocity_fn(x_t [B, ...], t [B]) -> v [B, ...]``.
        x0: ``[B, ...]`` data.
        key: PRNG key (times and noise).
        time_sampling, logit_mean, logit_std, mode_scale, shift: :func:`sample_times`.
        weighting: one of :data:`WEIGHTINGS`.

    Returns:
        ``(loss, per_example [B], quantile [B])``, ``quantile`` as :func:`sample_times`'.
    """
    t_key, noise_key = jax.random.split(key)
    t, quantile = sample_times(t_key, x0.shape[0], time_sampling, logit_mean=logit_mean,
                               logit_std=logit_std, mode_scale=mode_scale, shift=shift)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = interpolate(x0, noise, t)
    err = (velocity_fn(x_t, t).astype(jnp.float32) - velocity_target(x0, noise)) ** 2
    per_example = loss_weight(t, weighting) * jnp.mean(err, axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_example), per_example, quantile


def denoiser_from_velocity(velocity_fn):
    """A velocity model as an EDM denoiser of VE noise level.

    ``D(y, sigma) = x_t - t v(x_t, t)`` with ``t = sigma / (1 + sigma)``, ``x_t = y / (1 +
    sigma) = (1 - t) y``: ``y = x_0 + sigma n`` is ``x_t / (1 - t)``, so ``D = E[x_0 | y]``.

    Args:
        velocity_fn: ``velocity_fn(x_t [B, ...], t [B]) -> v [B, ...]``.

    Returns:
        ``D(y [B, ...], sigma [B]) -> x0 [B, ...]``.
    """

    def denoiser(y, sigma):
        t = sigma / (1.0 + sigma)
        x_t = y * expand(1.0 - t, y.ndim)
        return x0_from_velocity(x_t, velocity_fn(x_t, t), t)

    return denoiser


def velocity_from_denoiser(denoiser):
    """An EDM denoiser ``D(y, sigma)`` as a velocity model (inverse of
    :func:`denoiser_from_velocity`): ``v(x_t, t) = (x_t - D(x_t / (1 - t), t / (1 - t))) / t``
    for ``0 < t < 1``."""

    def velocity(x_t, t):
        x0 = denoiser(x_t / expand(1.0 - t, x_t.ndim), t / (1.0 - t))
        return velocity_from_x0(x_t, x0, t)

    return velocity


def vp_to_flow(x_vp, alpha_bar):
    """A VP-scale sample ``sqrt(ab) x_0 + sqrt(1 - ab) n`` as ``(x_t, t)`` of the flow path:
    ``c = sqrt(ab) + sqrt(1 - ab)``, ``x_t = x_vp / c``, ``t = sqrt(1 - ab) / c``.

    Args:
        x_vp: ``[B, ...]``.
        alpha_bar: ``[B]``.
    """
    a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    return x_vp / expand(a + s, x_vp.ndim), s / (a + s)
