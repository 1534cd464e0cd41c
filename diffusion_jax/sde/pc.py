"""Predictor--corrector samplers of the reverse-time SDE (Song et al., 2021, Algorithms 1--3).

The reverse SDE of ``dx = f dt + g dW`` is ``dx = [f - g^2 score(x, t)] dt + g dW_bar``. The
sampler walks the grid ``t_i = linspace(1, eps, N)`` (``N = sde.num_scales``) and at each
``t_i`` runs ``n_corrector_steps`` corrector updates and then one predictor update:

Predictors (``x -> (x, x_mean)``, ``z ~ N(0, I)``):

* ``euler_maruyama``: ``x_mean = x - [f - g^2 s] / N``, ``x = x_mean + g sqrt(1 / N) z``.
* ``reverse_diffusion``: with :func:`~diffusion_jax.sde.sdes.discretize`'s ``(f_i, G_i)``,
  ``x_mean = x - f_i + G_i^2 s``, ``x = x_mean + G_i z``.
* ``ancestral`` (VP, VE): DDPM's ``x_mean = (x + beta_i s) / sqrt(1 - beta_i)``,
  ``x = x_mean + sqrt(beta_i) z``; SMLD's ``x_mean = x + (sigma_i^2 - sigma_{i-1}^2) s``,
  ``x = x_mean + sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2) z``.
* ``none``.

Correctors (``alpha_i = 1 - beta_i`` for VP / sub-VP, 1 for VE):

* ``langevin``: ``delta = 2 alpha_i (snr mean_b ||z_b|| / mean_b ||s_b||)^2``,
  ``x <- x + delta s + sqrt(2 delta) z``. As in score_sde the two norms are averaged over the
  batch: per-example norms are fine for images, but in low dimension ``||s_b||`` can be near 0
  for a single chain and the step explodes (the 2-D mixture test then fails).
* ``annealed_langevin``: the same update with ``delta = 2 alpha_i (snr s(t))^2``,
  ``s(t)`` the marginal std.
* ``none``.

The result is the last predictor's ``x_mean`` (``denoise_final``, score_sde's noise removal) or
``x``. One ``lax.scan`` over the grid; step ``i`` draws its noise from ``fold_in(key, i)``.
"""
import jax
import jax.numpy as jnp
import numpy as np
from diffusion_jax.sde import chain
from diffusion_jax.sde._util import check_choice, expand
from diffusion_jax.sde.sdes import (VESDE, SubVPSDE, VPSDE, check_sde, discrete_grid_index,
                                    discretize, drift_and_diffusion, marginal_coefficients,
                                    ve_grid_sigmas, vp_grid_beta)

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "annealed_langevin", "none")


def pc_sample(score_fn, sde, x_init, key, *, predictor="reverse_diffusion", corrector="langevin",
              snr=0.16, n_corrector_steps=1, eps=1e-3, t_start=1.0, denoise_final=True,
              step_hook=None):
    """Predictor--corrector sampling from ``t_start`` down to ``eps`` (see the module docstring).

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``, the score of ``sde``'s marginals.
        sde: :class:`~diffusion_jax.sde.sdes.VESDE`, ``VPSDE`` or ``SubVPSDE``; ``num_scales`` is
            the number of grid points ``N`` (and of predictor steps from ``t = 1``).
        x_init: ``[B, ...]`` sample of ``q_{t_start}`` (the prior for ``t_start = 1``).
        key: PRNG key.
        predictor: one of :data:`PREDICTORS` (``ancestral`` needs VP or VE).
        corrector: one of :data:`CORRECTORS`.
        snr: corrector signal-to-noise ratio ``r > 0``.
        n_corrector_steps: static number of corrector updates per grid point (``>= 0``).
        eps: last time, ``0 < eps < t_start``.
        t_start: static Python float in ``(eps, 1]``: start on the grid's tail
            ``{t_i <= t_start}`` (SDEdit).
        denoise_final: return the last predictor's mean instead of its noisy sample.
        step_hook: optional ``step_hook(x, x0_pred, t_next, key) -> x`` after each predictor
            step; ``x0_pred = (x + s^2 score) / m`` (Tweedie at the step's start) and ``t_next``
            the next grid time (``0.0`` after the last step).

    Returns:
        ``x_0`` estimate ``[B, ...]``.

    Raises:
        ValueError: for an unknown predictor / corrector, ``ancestral`` with sub-VP, or bad
            ``snr``, ``n_corrector_steps``, ``eps`` or ``t_start``.
    """
    check_sde(sde)
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    if predictor == "ancestral" and isinstance(sde, SubVPSDE):
        raise ValueError("predictor 'ancestral' is defined for VPSDE and VESDE, not SubVPSDE.")
    if isinstance(snr, (int, float)) and not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}.")
    if int(n_corrector_steps) != n_corrector_steps or n_corrector_steps < 0:
        raise ValueError(f"n_corrector_steps must be an integer >= 0, got {n_corrector_steps!r}.")
    ts = jnp.asarray(sde_time_grid(sde.num_scales, eps, t_start))            # [S]
    t_nexts = jnp.concatenate([ts[1:], jnp.zeros((1,), jnp.float32)])
    batch = x_init.shape[0]

    def body(carry, inputs):
        x, _ = carry
        i, t, t_next = inputs
        step_key = jax.random.fold_in(key, i)
        t_b = jnp.full((batch,), t, jnp.float32)
        for c in range(n_corrector_steps if corrector != "none" else 0):
            x = _correct(corrector, score_fn, sde, x, t_b, snr, jax.random.fold_in(step_key, c + 1))
        noise_key, hook_key = jax.random.split(step_key)
        score = score_fn(x, t_b)
        x_new, x_mean = _predict(predictor, sde, x, t_b, score, noise_key)
        if step_hook is not None:
            m, s = marginal_coefficients(sde, t_b)
            x0_pred = (x + expand(s**2, x.ndim) * score) / expand(m, x.ndim)
            x_new = step_hook(x_new, x0_pred, t_next, hook_key)
            x_mean = jnp.where(t_next > 0, x_mean, x_new)
        return (x_new, x_mean), None

    (x, x_mean), _ = chain.scan(body, (x_init, x_init), (jnp.arange(ts.shape[0]), ts, t_nexts),
                                levels=ts, level_name="time", state_of=lambda c: c[0])
    return x_mean if denoise_final else x


def sde_time_grid(num_scales, eps=1e-3, t_start=1.0):
    """score_sde's grid ``linspace(1, eps, N)`` from its first point ``<= t_start``.

    Returns float32 ``[S]`` (numpy).

    Raises:
        ValueError: unless ``0 < eps < t_start <= 1`` (Python floats) and the tail is non-empty.
    """
    if not 0.0 < eps < t_start <= 1.0:
        raise ValueError(f"need 0 < eps < t_start <= 1, got eps={eps}, t_start={t_start}.")
    grid = np.linspace(1.0, eps, int(num_scales))
    return grid[grid <= t_start + 1e-7].astype(np.float32)


def _predict(name, sde, x, t, score, key):
    """One predictor update at ``t [B]`` given ``score = score_fn(x, t)``: ``(x, x_mean)``."""
    if name == "none":
        return x, x
    z = jax.random.normal(key, x.shape, x.dtype)
    if name == "euler_maruyama":
        f, g = drift_and_diffusion(sde, x, t)
        n = sde.num_scales
        x_mean = x - (f - expand(g**2, x.ndim) * score) / n
        return x_mean + expand(g / np.sqrt(n), x.ndim) * z, x_mean
    if name == "reverse_diffusion":
        f, big_g = discretize(sde, x, t)
        big_g = expand(big_g, x.ndim)
        x_mean = x - f + big_g**2 * score
        return x_mean + big_g * z, x_mean
    idx = discrete_grid_index(sde, t)
    if isinstance(sde, VPSDE):
        beta = expand(vp_grid_beta(sde, idx), x.ndim)
        x_mean = (x + beta * score) / jnp.sqrt(1.0 - beta)
        return x_mean + jnp.sqrt(beta) * z, x_mean
    sigma, prev = (expand(v, x.ndim) for v in ve_grid_sigmas(sde, idx))
    x_mean = x + (sigma**2 - prev**2) * score
    return x_mean + jnp.sqrt(prev**2 * (sigma**2 - prev**2) / sigma**2) * z, x_mean


def _correct(name, score_fn, sde, x, t, snr, key):
    """One corrector update at ``t [B]`` (see the module docstring)."""
    score = score_fn(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    if isinstance(sde, VESDE):
        alpha = jnp.ones_like(t)
    else:
        alpha = 1.0 - vp_grid_beta(sde, discrete_grid_index(sde, t))
    if name == "langevin":
        ratio = jnp.mean(_norm(z)) / jnp.mean(_norm(score))
        step = 2.0 * alpha * (snr * ratio) ** 2
    else:
        _, std = marginal_coefficients(sde, t)
        step = 2.0 * alpha * (snr * std) ** 2
    step = expand(step, x.ndim)
    return x + step * score + jnp.sqrt(2.0 * step) * z


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))

