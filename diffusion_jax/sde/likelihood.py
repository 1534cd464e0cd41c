"""Exact log-likelihood through the probability-flow ODE, and dequantised bits per dimension.

Integrating the flow ``dx/dt = F(x, t)`` (:func:`~diffusion_jax.sde.ode.probability_flow_drift`)
from the data at ``t = eps`` to ``z`` at ``t = 1`` with the instantaneous change of variables
(Chen et al., 2018; Song et al., 2021, eq. 39),

    log p_eps(x) = log p_1(z) + int_eps^1 div_x F(x_t, t) dt,

gives the model's exact log-density up to the solver's error. The divergence is either exact
(``D`` Jacobian-vector products, one per coordinate: for small ``D``) or the Hutchinson--Skilling
estimate ``v^T (dF/dx) v`` with one Rademacher probe ``v`` per example, held fixed along the
path, which is unbiased for ``log p`` (one Jacobian-vector product per evaluation).

Everything is batched (each example has its own log-density; examples do not interact because
the score acts per example) and jittable; the fixed-step path is one ``lax.scan``, the adaptive
one diffrax on device.
"""
import math

import jax
import jax.numpy as jnp

from diffusion_jax.sde._util import sum_over_non_batch
from diffusion_jax.sde.ode import (ADAPTIVE_METHODS, FIXED_METHODS, odeint_adaptive, odeint_fixed,
                                   probability_flow_drift)
from diffusion_jax.sde.sdes import check_sde, prior_logp

TRACE_ESTIMATORS = ("hutchinson", "exact")


def divergence_fn(fn, estimator="hutchinson", probe=None):
    """``div(x, t) [B]``: the divergence of ``fn(x [B, ...], t) -> [B, ...]`` per example.

    Args:
        fn: a vector field acting on each example independently.
        estimator: ``exact`` (a Jacobian-vector product per coordinate) or ``hutchinson``
            (``sum(v * J v)`` with the fixed ``probe`` ``v [B, ...]``).
        probe: ``[B, ...]`` Rademacher (or Gaussian) probe for ``hutchinson``.

    Raises:
        ValueError: for an unknown estimator or a missing probe.
    """
    if estimator not in TRACE_ESTIMATORS:
        raise ValueError(f"Unknown trace estimator {estimator!r}; expected one of "
                         f"{list(TRACE_ESTIMATORS)}.")
    if estimator == "hutchinson":
        if probe is None:
            raise ValueError("the hutchinson trace estimator needs a probe.")

        def hutchinson(x, t):
            _, jv = jax.jvp(lambda y: fn(y, t), (x,), (probe,))
            return sum_over_non_batch(probe * jv)

        return hutchinson

    def exact(x, t):
        dim = math.prod(x.shape[1:])

        def diag_entry(j):
            basis = jnp.broadcast_to(jax.nn.one_hot(j, dim, dtype=x.dtype).reshape(x.shape[1:]),
                                     x.shape)
            _, jv = jax.jvp(lambda y: fn(y, t), (x,), (basis,))
            return sum_over_non_batch(basis * jv)

        return jnp.sum(jax.lax.map(diag_entry, jnp.arange(dim)), axis=0)

    return exact


def ode_log_likelihood(score_fn, sde, x, key, *, eps=1e-5, trace="hutchinson", method="rk4",
                       num_steps=100, rtol=1e-5, atol=1e-5, max_steps=4096):
    """``log p_eps(x)`` in nats per example through the probability-flow ODE.

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``.
        sde: the SDE (its prior gives ``log p_1``).
        x: ``[B, ...]`` data (continuous; see :func:`dequantized_bits_per_dim` for 8-bit data).
        key: PRNG key for the Rademacher probe (unused with ``trace="exact"``).
        eps: starting time (the density is that of ``x_eps``; small, > 0 for VP stability).
        trace: ``hutchinson`` or ``exact``.
        method: ``euler`` / ``heun`` / ``rk4`` (``num_steps`` uniform steps) or ``tsit5`` /
            ``dopri5`` (adaptive, ``rtol`` / ``atol`` / ``max_steps``).
        num_steps: static number of fixed steps.

    Returns:
        ``(log_p [B], z [B, ...])``, ``z`` the flow's endpoint at ``t = 1``.

    Raises:
        ValueError: for an unknown method or trace estimator, or ``num_steps < 1``.
    """
    check_sde(sde)
    drift = probability_flow_drift(sde, score_fn)
    probe = None
    if trace == "hutchinson":
        probe = jax.random.rademacher(key, x.shape, jnp.float32)
    div = divergence_fn(drift, trace, probe)
    augmented = lambda y, t: (drift(y[0], t), div(y[0], t))
    y0 = (x.astype(jnp.float32), jnp.zeros((x.shape[0],), jnp.float32))
    if method in FIXED_METHODS:
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
        z, delta = odeint_fixed(augmented, y0, jnp.linspace(eps, 1.0, int(num_steps) + 1), method)
    elif method in ADAPTIVE_METHODS:
        (z, delta), _ = odeint_adaptive(augmented, y0, jnp.float32(eps), jnp.float32(1.0),
                                        method=method, rtol=rtol, atol=atol, max_steps=max_steps)
    else:
        raise ValueError(f"Unknown method {method!r}; expected one of "
                         f"{list(FIXED_METHODS + ADAPTIVE_METHODS)}.")
    return prior_logp(sde, z) + delta, z


def dequantized_bits_per_dim(log_likelihood_fn, x, key, num_bits=8):
    """Bits per dimension of discrete data under a continuous density, by uniform dequantisation.

    ``x`` lies on the ``K = 2^num_bits`` level grid ``x = 2k / (K - 1) - 1`` (the project's 8-bit
    convention). With ``u ~ U[0, 1)^D`` the dequantised point is ``y = 2 (k + u) / K - 1`` and

        bpd = -log p(y) / (D log 2) + log2(K / 2),

    the negated variational lower bound ``E_u log p(y) + D log(2 / K) <= log P(k)`` on the model's
    probability of the integer data, in bits per dimension. Since ``P(k) <= 1``, its expectation
    over ``u`` is never negative (a density concentrated on the grid points, which gives
    arbitrarily negative continuous "bits", is no exception); a uniform density on
    ``[-1, 1]^D`` gives exactly ``num_bits``.

    Args:
        log_likelihood_fn: ``log_likelihood_fn(y [B, ...], key) -> log p(y) [B]`` nats, e.g.
            ``lambda y, k: ode_log_likelihood(score_fn, sde, y, k)[0]``.
        x: ``[B, ...]`` data on the grid (values in ``[-1, 1]``).
        key: PRNG key (split for the dequantisation noise and the likelihood).
        num_bits: bits per value (8 for images).

    Returns:
        ``[B]`` bits per dimension.
    """
    levels = 2**num_bits
    dim = math.prod(x.shape[1:])
    key_u, key_ll = jax.random.split(key)
    k = jnp.round((x.astype(jnp.float32) + 1.0) * 0.5 * (levels - 1))
    u = jax.random.uniform(key_u, x.shape, jnp.float32)
    y = 2.0 * (k + u) / levels - 1.0
    log_p = log_likelihood_fn(y, key_ll)
    return -log_p / (dim * math.log(2.0)) + math.log2(levels / 2.0)
