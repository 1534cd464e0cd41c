"""VE, VP and sub-VP SDEs of Song et al. (2021): drift, diffusion, marginals, prior, discretisation.

Each SDE is a small NamedTuple of Python floats (a pytree whose type survives ``jax.jit``), and the
functions below dispatch on its type. Time is continuous, ``t in [0, 1]``; the forward SDE is

    dx = f(x, t) dt + g(t) dW,

with the marginal ``q_t(x_t | x_0) = N(m(t) x_0, s(t)^2 I)``:

* VE: ``f = 0``, ``g = sigma(t) sqrt(2 log(sigma_max / sigma_min))``,
  ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``; ``m = 1``, ``s = sigma(t)``;
  prior ``N(0, sigma_max^2 I)``.
* VP: ``beta(t) = beta_min + t (beta_max - beta_min)``, ``f = -beta(t) x / 2``,
  ``g = sqrt(beta(t))``; ``log m = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``,
  ``s = sqrt(1 - m^2)``; prior ``N(0, I)``.
* sub-VP: VP's drift, ``g = sqrt(beta(t) (1 - exp(-2 beta_min t - (beta_max - beta_min) t^2)))``;
  ``m`` as VP, ``s = 1 - m^2``; prior ``N(0, I)``.

(VE's ``s(0) = sigma_min`` rather than 0, as in score_sde.) Every SDE is also a noisy version of
the data at the "VE noise level" ``sigma_ve(t) = s(t) / m(t)``: ``x_t / m(t) = x_0 + sigma_ve n``.
That is the bridge to x0-denoisers ``D(x, sigma)`` (:mod:`diffusion_jax.sde.adapters`).

Shapes: ``x`` is ``[B, ...]`` (images ``[B, H, W, C]``); ``t`` is ``[B]`` (or a scalar); per-example
coefficients come back as ``[B]``. ``num_scales`` ``N`` is the number of discretisation steps of
:func:`discretize` (score_sde's ``N``).
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.sde._util import expand, per_example


class VESDE(NamedTuple):
    """Variance-exploding SDE (SMLD / NCSN); default ``sigma`` from 0.01 to 50."""
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000


class VPSDE(NamedTuple):
    """Variance-preserving SDE (DDPM); default ``beta`` from 0.1 to 20."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000


class SubVPSDE(NamedTuple):
    """Sub-variance-preserving SDE; default ``beta`` from 0.1 to 20."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000


SDE_TYPES = (VESDE, VPSDE, SubVPSDE)
SDE_NAMES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def make_sde(name, **kwargs):
    """The SDE called ``name`` (``ve``, ``vp`` or ``subvp``) with fields from ``kwargs``.

    Raises:
        ValueError: for an unknown name or an out-of-range field.
    """
    if name not in SDE_NAMES:
        raise ValueError(f"Unknown sde {name!r}; expected one of {sorted(SDE_NAMES)}.")
    sde = SDE_NAMES[name](**kwargs)
    check_sde(sde)
    return sde


def check_sde(sde):
    """Raises ``ValueError`` naming the field if ``sde``'s (concrete) parameters are invalid."""
    if not isinstance(sde, SDE_TYPES):
        raise ValueError(f"sde must be a VESDE, VPSDE or SubVPSDE, got {type(sde).__name__}.")
    if isinstance(sde, VESDE):
        lo, hi, names = sde.sigma_min, sde.sigma_max, ("sigma_min", "sigma_max")
    else:
        lo, hi, names = sde.beta_min, sde.beta_max, ("beta_min", "beta_max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and not 0 < lo < hi:
        raise ValueError(f"{type(sde).__name__} needs 0 < {names[0]} < {names[1]}, got "
                         f"{names[0]}={lo}, {names[1]}={hi}.")
    if int(sde.num_scales) != sde.num_scales or sde.num_scales < 2:
        raise ValueError(f"num_scales must be an integer >= 2, got {sde.num_scales!r}.")


def drift_and_diffusion(sde, x, t):
    """Forward SDE coefficients ``(f(x, t) [B, ...], g(t) [B])`` (see the module docstring).

    Args:
        sde: a :class:`VESDE`, :class:`VPSDE` or :class:`SubVPSDE`.
        x: ``[B, ...]``.
        t: ``[B]`` times in ``[0, 1]``.
    """
    t = per_example(t, x.shape[0])
    if isinstance(sde, VESDE):
        sigma = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
        g = sigma * jnp.sqrt(2.0 * jnp.log(sde.sigma_max / sde.sigma_min))
        return jnp.zeros_like(x), g
    beta = _beta(sde, t)
    drift = -0.5 * expand(beta, x.ndim) * x
    if isinstance(sde, VPSDE):
        return drift, jnp.sqrt(beta)
    discount = -jnp.expm1(-2.0 * sde.beta_min * t - (sde.beta_max - sde.beta_min) * t**2)
    return drift, jnp.sqrt(beta * discount)


def marginal_coefficients(sde, t):
    """``(m(t), s(t))``: mean coefficient and std of ``q_t(x_t | x_0)``, each shaped as ``t``."""
    t = jnp.asarray(t, jnp.float32)
    if isinstance(sde, VESDE):
        return jnp.ones_like(t), sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
    log_m = -0.25 * t**2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
    one_minus_m2 = -jnp.expm1(2.0 * log_m)
    std = jnp.sqrt(one_minus_m2) if isinstance(sde, VPSDE) else one_minus_m2
    return jnp.exp(log_m), std


def marginal_prob(sde, x0, t):
    """Mean ``m(t) x_0`` ``[B, ...]`` and std ``s(t)`` ``[B]`` of ``q_t(x_t | x_0)``."""
    m, s = marginal_coefficients(sde, per_example(t, x0.shape[0]))
    return expand(m, x0.ndim) * x0, s


def sigma_ve(sde, t):
    """VE-equivalent noise level ``s(t) / m(t)`` (``x_t / m(t) = x_0 + sigma_ve n``), as ``t``."""
    m, s = marginal_coefficients(sde, t)
    return s / m


def time_for_sigma(sde, sigma):
    """Inverse of :func:`sigma_ve`: the ``t`` with ``s(t) / m(t) = sigma``; shaped as ``sigma``.

    VE: ``t = log(sigma / sigma_min) / log(sigma_max / sigma_min)``. VP: ``m = (1 + sigma^2)^-1/2``;
    sub-VP: ``m`` solves ``m^2 + sigma m - 1 = 0``; then ``t`` is the positive root of
    ``(beta_max - beta_min) t^2 / 4 + beta_min t / 2 + log m = 0``. Values outside the SDE's
    range give times outside ``[0, 1]`` (not clipped).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    if isinstance(sde, VESDE):
        return jnp.log(sigma / sde.sigma_min) / jnp.log(sde.sigma_max / sde.sigma_min)
    if isinstance(sde, VPSDE):
        log_m = -0.5 * jnp.log1p(sigma**2)
    else:
        log_m = jnp.log(2.0 / (sigma + jnp.sqrt(sigma**2 + 4.0)))
    a, b = 0.25 * (sde.beta_max - sde.beta_min), 0.5 * sde.beta_min
    # Root of a t^2 + b t + log_m = 0 written as 2c / (-b - sqrt(b^2 - 4ac)) to avoid cancellation.
    return -2.0 * log_m / (b + jnp.sqrt(b**2 - 4.0 * a * log_m))


def prior_sample(sde, key, shape):
    """Draws ``x_1 [B, ...]`` from the prior: ``N(0, sigma_max^2 I)`` (VE) or ``N(0, I)``."""
    z = jax.random.normal(key, shape, jnp.float32)
    return sde.sigma_max * z if isinstance(sde, VESDE) else z


def prior_logp(sde, z):
    """Log-density of the prior at ``z [B, ...]``, summed over non-batch dims: ``[B]`` nats.

    ``log N(z; 0, v I) = -D/2 log(2 pi v) - ||z||^2 / (2 v)``, ``v = sigma_max^2`` (VE) or 1.
    """
    var = sde.sigma_max**2 if isinstance(sde, VESDE) else 1.0
    flat = z.reshape(z.shape[0], -1)
    dim = flat.shape[1]
    return -0.5 * dim * jnp.log(2.0 * math.pi * var) - 0.5 * jnp.sum(flat**2, axis=1) / var


def discretize(sde, x, t):
    """score_sde's discretisation ``x_{i+1} = x_i + f_i + G_i z`` at index ``i = round(t (N - 1))``.

    * VP: ``beta_i = (beta_min + (beta_max - beta_min) i / (N - 1)) / N`` (``linspace`` of
      ``beta / N``), ``f_i = (sqrt(1 - beta_i) - 1) x``, ``G_i = sqrt(beta_i)`` (DDPM's step).
    * VE: ``sigma_i = sigma_min (sigma_max / sigma_min)^(i / (N - 1))``, ``f_i = 0``,
      ``G_i = sqrt(sigma_i^2 - sigma_{i-1}^2)`` with ``sigma_{-1} = 0`` (SMLD's step).
    * sub-VP: Euler--Maruyama, ``f_i = f(x, t) / N``, ``G_i = g(t) / sqrt(N)``.

    (score_sde truncates ``t (N - 1)``; rounding gives the same index on the sampler's grid
    ``linspace(1, eps, N)`` and is robust to float error.)

    Args:
        sde: the SDE (its ``num_scales`` is ``N``).
        x: ``[B, ...]``.
        t: ``[B]`` times.

    Returns:
        ``(f [B, ...], G [B])``.
    """
    t = per_example(t, x.shape[0])
    n = sde.num_scales
    idx = discrete_grid_index(sde, t)
    if isinstance(sde, VPSDE):
        beta = vp_grid_beta(sde, idx)
        return expand(jnp.sqrt(1.0 - beta) - 1.0, x.ndim) * x, jnp.sqrt(beta)
    if isinstance(sde, VESDE):
        sigma, prev = ve_grid_sigmas(sde, idx)
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)
    f, g = drift_and_diffusion(sde, x, t)
    return f / n, g / math.sqrt(n)


def discrete_grid_index(sde, t):
    """``round(t (N - 1))`` clipped to ``[0, N - 1]``, the grid index :func:`discretize` uses."""
    n = sde.num_scales
    return jnp.clip(jnp.round(jnp.asarray(t, jnp.float32) * (n - 1)), 0, n - 1)


def vp_grid_beta(sde, idx):
    """DDPM's ``beta_i = (beta_min + (beta_max - beta_min) i / (N - 1)) / N`` on the VP grid."""
    n = sde.num_scales
    return (sde.beta_min + (sde.beta_max - sde.beta_min) * idx / (n - 1)) / n


def ve_grid_sigmas(sde, idx):
    """``(sigma_i, sigma_{i-1})`` on SMLD's grid ``sigma_min (sigma_max / sigma_min)^(i/(N-1))``.

    ``sigma_{-1} = 0``; ``idx`` is any array of (float or int) grid indices.
    """
    ratio = sde.sigma_max / sde.sigma_min
    n = sde.num_scales
    sigma = sde.sigma_min * ratio ** (idx / (n - 1))
    prev = jnp.where(idx > 0, sde.sigma_min * ratio ** ((idx - 1) / (n - 1)), 0.0)
    return sigma, prev


def _beta(sde, t):
    return sde.beta_min + t * (sde.beta_max - sde.beta_min)



def vp_marginal(t, beta_min=0.1, beta_max=20.0):
    """``(m(t), s(t))`` of the VP SDE with ``beta(t) = beta_min + t (beta_max - beta_min)``:
    :func:`marginal_coefficients` of ``VPSDE(beta_min, beta_max)``, each shaped as ``t``."""
    return marginal_coefficients(VPSDE(beta_min, beta_max), t)


def ve_sigma(t, sigma_min=0.01, sigma_max=50.0):
    """``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` of the VE SDE (its marginal std),
    shaped as ``t``."""
    return marginal_coefficients(VESDE(sigma_min, sigma_max), t)[1]


def geometric_sigmas(sigma_max, sigma_min, num_levels):
    """Decreasing geometric noise levels of NCSN (Song & Ermon, 2019).

    ``sigma_i = sigma_max (sigma_min / sigma_max)^(i / (L - 1))`` for ``i = 0, ..., L-1``.

    Args:
        sigma_max: first (largest) level.
        sigma_min: last (smallest) level, ``0 < sigma_min < sigma_max``.
        num_levels: static number of levels ``L >= 2``.

    Returns:
        sigmas: ``[L]`` float32, decreasing.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
                f"geometric_sigmas needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}.")
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
    return jnp.exp(jnp.linspace(jnp.log(sigma_max), jnp.log(sigma_min), num_levels)).astype(
            jnp.float32)
