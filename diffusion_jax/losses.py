"""Training and evaluation objectives: denoising losses, the DDPM variational bound, DSM.

A denoiser is a callable ``denoise(x_t, t) -> prediction`` with ``x_t: [B, ...]``, ``t: int32 [B]``
and a prediction of type ``pred_type`` (``eps``, ``x0``, ``v`` or ``score``, see
:mod:`diffusion_jax.diffusion`). Conditioning, guidance and model parameters are closed over.

Loss weightings are defined in one frame: every weighting is a weight ``w(snr)`` on the
``x_0``-error, ``w(snr) ||x_0 - x0_hat||^2`` (Hang et al., 2023; Kingma et al., 2021), with
``snr = alpha_bar / (1 - alpha_bar)``. Since, at fixed ``x_t``,

    ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / snr = ||v - v_hat||^2 / (snr + 1)
                      = ||score - score_hat||^2 (1 - alpha_bar) / snr,

the per-example factor applied to the MSE of the ``pred_type`` target is ``w(snr) c(pred_type)``
with ``c = 1 / snr`` (eps), ``1`` (x0), ``1 / (snr + 1)`` (v), ``(1 - alpha_bar) / snr`` (score).
"""
import math

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from diffusion_jax.diffusion import (PRED_TYPES, from_x0_and_eps, q_mean_variance, q_posterior,
                                     q_sample, to_x0_and_eps)
from diffusion_jax.schedules import extract

WEIGHTINGS = ("uniform", "snr", "min_snr")


def sample_timesteps(key, batch_size, num_timesteps):
    """Uniform timesteps ``t ~ U{0, ..., T-1}``.

    Args:
        key: PRNG key.
        batch_size: static ``B``.
        num_timesteps: static ``T``.

    Returns:
        t: ``[B]`` int32.
    """
    return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def loss_weight(alpha_bar, pred_type, weighting, min_snr_gamma=5.0):
    """Per-example weight on the mean squared error of the ``pred_type`` target.

    ``weighting`` names ``w(snr)``, the weight on the ``x_0``-error (see the module docstring):

    * ``uniform``: plain MSE of the ``pred_type`` target; the weight is 1 whatever ``pred_type``.
    * ``snr``: ``w = snr``, so the loss is ``snr ||x0 - x0_hat||^2 = ||eps - eps_hat||^2`` for every
      ``pred_type`` (the DDPM "simple" loss; weights: eps 1, x0 ``snr``, v ``snr / (snr + 1)``).
    * ``min_snr``: ``w = min(snr, gamma)`` (Min-SNR-gamma, Hang et al. 2023); weights:
      eps ``min(snr, gamma) / snr``, x0 ``min(snr, gamma)``, v ``min(snr, gamma) / (snr + 1)``.

    Args:
        alpha_bar: ``alpha_bar_t`` of each example, any shape (e.g. ``[B]``).
        pred_type: one of ``eps``, ``x0``, ``v``, ``score``.
        weighting: one of ``uniform``, ``snr``, ``min_snr``.
        min_snr_gamma: ``gamma`` of ``min_snr``.

    Returns:
        weights, the shape of ``alpha_bar``.

    Raises:
        ValueError: if ``pred_type`` or ``weighting`` is unknown.
    """
    if pred_type not in PRED_TYPES:
        raise ValueError(f"Unknown pred_type {pred_type!r}; expected one of {PRED_TYPES}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}.")
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    if weighting == "uniform":
        return jnp.ones_like(alpha_bar)
    snr = alpha_bar / (1.0 - alpha_bar)
    w_x0 = snr if weighting == "snr" else jnp.minimum(snr, min_snr_gamma)
    to_x0 = {"eps": 1.0 / snr, "x0": jnp.ones_like(snr), "v": 1.0 / (snr + 1.0),
             "score": (1.0 - alpha_bar) / snr}[pred_type]
    return w_x0 * to_x0


def denoising_loss(denoise, sched, x0, key, *, pred_type="eps", weighting="uniform",
                   min_snr_gamma=5.0):
    """Weighted denoising regression loss with uniformly drawn timesteps.

    ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = q_sample(x0, t, eps)`` and

        per_example_b = w_b * mean_{non-batch dims} (denoise(x_t, t) - target)^2,
        loss = mean_b per_example_b,

    with ``target = from_x0_and_eps(x0, eps)`` and ``w_b = loss_weight(alpha_bar_{t_b}, ...)``.

    Args:
        denoise: ``denoise(x_t [B, ...], t int32 [B]) -> [B, ...]`` prediction of ``pred_type``.
        sched: a :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` clean data.
        key: PRNG key (split into one for ``t`` and one for ``eps``).
        pred_type: one of ``eps``, ``x0``, ``v``, ``score``.
        weighting: one of ``uniform``, ``snr``, ``min_snr`` (see :func:`loss_weight`).
        min_snr_gamma: ``gamma`` of ``min_snr``.

    Returns:
        ``(loss scalar, per_example [B], t int32 [B])``.
    """
    key_t, key_eps = jax.random.split(key)
    t = sample_timesteps(key_t, x0.shape[0], sched.num_timesteps)
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    x_t = q_sample(sched, x0, t, eps)
    alpha_bar = extract(sched.alphas_cumprod, t, x0.ndim)
    target = from_x0_and_eps(x0, eps, alpha_bar, pred_type)
    pred = denoise(x_t, t).astype(jnp.float32)
    mse = _mean_over_non_batch(jnp.square(pred - target))
    per_example = loss_weight(sched.alphas_cumprod[t], pred_type, weighting, min_snr_gamma) * mse
    return jnp.mean(per_example), per_example, t


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats.

    ``KL = 1/2 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)``.

    Args:
        mean1, logvar1, mean2, logvar2: mutually broadcastable arrays.

    Returns:
        KL, the broadcast shape.
    """
    return 0.5 * (logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability of 8-bit data in ``[-1, 1]`` under a Gaussian discretised to 256 bins.

    Data lie on the grid ``x = 2k / 255 - 1``, ``k = 0..255``; bin ``k`` is
    ``[x - 1/255, x + 1/255]`` except that the first bin extends to ``-inf`` and the last to
    ``+inf`` (Ho et al., 2020), so the 256 probabilities sum to 1:

        log P(x) = log(Phi((x + 1/255 - mean) / scale) - Phi((x - 1/255 - mean) / scale)).

    The difference of CDFs is evaluated in log space on the tail it lies nearer to, so it stays
    finite far from the mean (no clamping).

    Args:
        x: ``[B, ...]`` data on the grid.
        means: Gaussian means, broadcastable to ``x``.
        log_scales: log standard deviations, broadcastable to ``x``.

    Returns:
        log-probabilities in nats, ``[B, ...]``.
    """
    inv_scale = jnp.exp(-log_scales)
    centered = x - means
    lo = jnp.where(x < -0.999, -jnp.inf, (centered - 1.0 / 255.0) * inv_scale)
    hi = jnp.where(x > 0.999, jnp.inf, (centered + 1.0 / 255.0) * inv_scale)
    # log(Phi(hi) - Phi(lo)) = log(Phi(-lo) - Phi(-hi)); use the side whose CDFs are small.
    flip = (lo + hi) > 0
    a = jnp.where(flip, -hi, lo)
    b = jnp.where(flip, -lo, hi)
    log_b = norm.logcdf(b)
    return log_b + jnp.log(-jnp.expm1(norm.logcdf(a) - log_b))


def vlb_terms(denoise, sched, x0, t, noise, pred_type, clip_x0=False):
    """One term of the DDPM variational bound per example, in bits per dimension.

    With ``x_t = q_sample(x0, t, noise)``, ``x0_hat`` the denoiser's prediction of ``x_0`` and
    ``p(x_{t-1} | x_t) = N(mu~(x0_hat, x_t), beta~_t)`` (the "fixed small" variance; at ``t = 0``
    the clipped ``beta~_1``):

    * ``t > 0``: ``L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``,
    * ``t = 0``: ``L_0 = -log p(x_0 | x_1)`` under the discretised Gaussian decoder
      (:func:`discretized_gaussian_log_likelihood`) with mean ``x0_hat`` and variance ``beta~_1``,

    each averaged over the non-batch dimensions and divided by ``log 2``.

    Args:
        denoise: ``denoise(x_t [B, ...], t int32 [B]) -> [B, ...]`` prediction of ``pred_type``.
        sched: a :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` data on the 8-bit grid in ``[-1, 1]``.
        t: ``[B]`` int timesteps.
        noise: ``[B, ...]`` standard normal noise.
        pred_type: one of ``eps``, ``x0``, ``v``, ``score``.
        clip_x0: clip ``x0_hat`` to ``[-1, 1]`` before forming the reverse mean.

    Returns:
        ``[B]`` bits per dimension.
    """
    x_t = q_sample(sched, x0, t, noise)
    true_mean, _, true_log_var = q_posterior(sched, x0, x_t, t)
    alpha_bar = extract(sched.alphas_cumprod, t, x0.ndim)
    x0_hat, _ = to_x0_and_eps(denoise(x_t, t).astype(jnp.float32), x_t, alpha_bar, pred_type)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    model_mean, _, model_log_var = q_posterior(sched, x0_hat, x_t, t)
    kl = _mean_over_non_batch(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder_nll = -_mean_over_non_batch(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)


def bits_per_dim(denoise, sched, x0, key, pred_type, clip_x0=False):
    """Full DDPM variational bound on ``-log2 p(x_0)`` per dimension.

    ``bpd = [KL(q(x_T | x_0) || N(0, I)) + sum_{t=0}^{T-1} L_t] / (D log 2)`` where ``L_t`` are the
    terms of :func:`vlb_terms` (all ``T`` computed, one ``lax.map`` step per ``t``; the noise for
    step ``t`` is ``jax.random.normal(jax.random.fold_in(key, t), x0.shape)``). Jittable.

    Args:
        denoise: ``denoise(x_t [B, ...], t int32 [B]) -> [B, ...]`` prediction of ``pred_type``.
        sched: a :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` data on the 8-bit grid in ``[-1, 1]``.
        key: PRNG key.
        pred_type: one of ``eps``, ``x0``, ``v``, ``score``.
        clip_x0: forwarded to :func:`vlb_terms`.

    Returns:
        ``[B]`` bits per dimension.
    """
    num_timesteps = sched.num_timesteps
    t_last = jnp.full((x0.shape[0],), num_timesteps - 1, jnp.int32)
    prior_mean, _, prior_log_var = q_mean_variance(sched, x0, t_last)
    prior = _mean_over_non_batch(normal_kl(prior_mean, prior_log_var, 0.0, 0.0)) / math.log(2.0)

    def term(t):
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, jnp.float32)
        t_batch = jnp.full((x0.shape[0],), t, jnp.int32)
        return vlb_terms(denoise, sched, x0, t_batch, noise, pred_type, clip_x0)

    terms = jax.lax.map(term, jnp.arange(num_timesteps, dtype=jnp.int32))    # [T, B]
    return prior + jnp.sum(terms, axis=0)


def _mean_over_non_batch(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)
