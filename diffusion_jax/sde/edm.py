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
"""
import math

import jax
import jax.numpy as jnp
from diffusion_jax.sde import chain
from diffusion_jax.sde.adapters import thresholded


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's noise levels (Karras et al., 2022, eq. 5).

    ``sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.

    Args:
        num_steps: static ``N >= 1`` (``N = 1`` gives ``[sigma_max]``).
        sigma_min, sigma_max: ``0 < sigma_min < sigma_max`` (may be traced).
        rho: ``> 0``; larger concentrates the steps at small sigma (EDM uses 7).

    Returns:
        ``[N]`` float32, decreasing from ``sigma_max`` to ``sigma_min`` (no trailing zero).

    Raises:
        ValueError: for ``N < 1``, ``rho <= 0`` or a bad sigma range.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if _concrete(sigma_min, sigma_max) and not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max, got sigma_min="
                         f"{sigma_min}, sigma_max={sigma_max}.")
    if _concrete(rho) and not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}.")
    ramp = jnp.linspace(0.0, 1.0, int(num_steps)) if num_steps > 1 else jnp.zeros(1)
    lo, hi = jnp.asarray(sigma_min) ** (1.0 / rho), jnp.asarray(sigma_max) ** (1.0 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).astype(jnp.float32)


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


def _concrete(*values):
    return all(isinstance(v, (int, float)) for v in values)
