"""EDM's sampler (Karras et al., 2022, Algorithm 2): Heun steps over Karras sigmas, optional churn.

The sampler integrates the probability-flow ODE of the VE parameterisation,
``dx/dsigma = (x - D(x, sigma)) / sigma``, over a decreasing grid ``sigma_0 > ... > sigma_{N-1}``
followed by ``sigma_N = 0``. Step ``i``:

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= sigma_i <= S_max else 0,
    sigma_hat = (1 + gamma_i) sigma_i,
    x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z,           z ~ N(0, I)
    d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat,
    x' = x_hat + (sigma_{i+1} - sigma_hat) d,
    if sigma_{i+1} > 0:  d' = (x' - D(x', sigma_{i+1})) / sigma_{i+1},
                         x' = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2,

``2N - 1`` evaluations of ``D`` in all (the last step, to ``sigma = 0``, is an Euler step whose
result is ``D(x_hat, sigma_hat)``). ``S_churn = 0`` is the deterministic Heun sampler.

The registry entry ``edm_heun`` runs it on a discrete model (:mod:`.continuous`) over Karras
sigmas by default.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import check_non_negative, check_positive
from diffusion_jax.samplers.continuous import (SigmaGridOptions, denoiser_setup, karras_sigmas,
                                               vp_hook)
from diffusion_jax.samplers.options import ThresholdOptions, option, read
from diffusion_jax.samplers.registry import register
from diffusion_jax.sde.adapters import thresholded

__all__ = ["EDMOptions", "edm_heun", "edm_sample", "karras_sigmas"]


@dataclasses.dataclass(frozen=True)
class EDMOptions(SigmaGridOptions, ThresholdOptions):
    """Settings of ``edm_heun``."""
    churn: float = option(0.0, "EDM's ``S_churn`` (0: deterministic Heun).",
                          check=check_non_negative, traced=True)
    s_tmin: float = option(0.0, "churn only for ``s_tmin <= sigma <= s_tmax``.",
                           check=check_non_negative, traced=True)
    s_tmax: float = option(float("inf"), "see ``s_tmin``.", traced=True)
    s_noise: float = option(1.0, "EDM's ``S_noise`` (scale of the churn noise).",
                            check=check_positive, traced=True)


def edm_sample(denoiser, sigmas, x_init, key, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
               s_noise=1.0, dynamic_threshold=None, step_hook=None):
    """EDM's Heun sampler with optional stochastic churn (see the module docstring).

    The first ``N - 1`` steps are one ``lax.scan`` (step ``i`` draws its churn noise from
    ``fold_in(key, i)``); the final Euler step to ``sigma = 0`` follows it.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0 [B, ...]``.
        sigmas: ``[N]`` decreasing positive noise levels (e.g. :func:`karras_sigmas`).
        x_init: ``[B, ...]``, a sample at ``sigmas[0]`` (e.g. ``sigmas[0] * N(0, I)``).
        key: PRNG key.
        s_churn, s_tmin, s_tmax, s_noise: churn settings (``s_churn = 0``: deterministic).
        dynamic_threshold: ``None`` or Imagen's percentile ``p``: threshold every ``D`` output.
        step_hook: optional ``step_hook(x, x0_pred, sigma_next, key) -> x`` after each step
            (``sigma_next = 0`` after the last).

    Returns:
        ``[B, ...]`` samples at ``sigma = 0``.

    Raises:
        ValueError: if ``sigmas`` is not ``[N]`` or ``s_churn`` / ``s_noise`` is negative.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must have shape [N] with N >= 1, got shape {sigmas.shape}.")
    for field, value in (("s_churn", s_churn), ("s_noise", s_noise)):
        if isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"{field} must be >= 0, got {value}.")
    if dynamic_threshold is not None:
        denoiser = thresholded(denoiser, dynamic_threshold)
    num = sigmas.shape[0]
    gamma_max = min(s_churn / num, math.sqrt(2.0) - 1.0) if isinstance(s_churn, (int, float)) \
        else jnp.minimum(s_churn / num, math.sqrt(2.0) - 1.0)
    batch = x_init.shape[0]
    d_of = lambda x, sigma: denoiser(x, jnp.full((batch,), sigma, jnp.float32))

    def churn(x, sigma, step_key):
        gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        z = jax.random.normal(step_key, x.shape, x.dtype)
        # sqrt(sigma_hat^2 - sigma^2) written so that gamma = 0 gives exactly 0 (no NaN).
        return x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z, sigma_hat

    def body(x, inputs):
        i, sigma, sigma_next = inputs
        noise_key, hook_key = jax.random.split(jax.random.fold_in(key, i))
        x_hat, sigma_hat = churn(x, sigma, noise_key)
        x0 = d_of(x_hat, sigma_hat)
        d = (x_hat - x0) / sigma_hat
        x_euler = x_hat + (sigma_next - sigma_hat) * d
        x0_next = d_of(x_euler, sigma_next)
        d_next = (x_euler - x0_next) / sigma_next
        x_next = x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        if step_hook is not None:
            x_next = step_hook(x_next, x0, sigma_next, hook_key)
        return x_next, None

    x, _ = chain.scan(body, x_init, (jnp.arange(num - 1), sigmas[:-1], sigmas[1:]),
                      levels=sigmas[:-1], level_name="sigma")
    noise_key, hook_key = jax.random.split(jax.random.fold_in(key, num - 1))
    x_hat, sigma_hat = churn(x, sigmas[-1], noise_key)
    x = d_of(x_hat, sigma_hat)
    if step_hook is not None:
        x = step_hook(x, x, jnp.float32(0.0), hook_key)
    chain.record_step(level=sigmas[-1], level_name="sigma")
    return x


def _evaluations(options, num_timesteps):
    """Two per step but the last, an Euler step: ``2 num_steps - 1``."""
    del num_timesteps
    return 2 * options.num_steps - 1


@register("edm_heun", options=EDMOptions, evaluations=_evaluations)
def edm_heun(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """EDM's Heun sampler (:func:`edm_sample`) on a discrete model, the registry's
    ``edm_heun``; ``2 num_steps - 1`` network evaluations."""
    settings = read(EDMOptions, options)
    denoiser, sigmas, x_ve = denoiser_setup(denoise, schedule, x_start, options, settings,
                                            t_start, "karras")
    return edm_sample(denoiser, sigmas, x_ve, key, s_churn=settings.churn,
                      s_tmin=settings.s_tmin, s_tmax=settings.s_tmax, s_noise=settings.s_noise,
                      dynamic_threshold=settings.dynamic_threshold,
                      step_hook=vp_hook(step_hook, schedule))
