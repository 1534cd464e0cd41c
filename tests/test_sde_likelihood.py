"""Tests for diffusion_jax.sde.likelihood: ODE log-likelihood of Gaussian data against its closed
form (exact trace and Hutchinson), and dequantised bits per dimension."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import gaussian_oracle as oracle
from diffusion_jax.sde import likelihood, sdes

MU = np.array([0.5, -0.3])
COV = np.array([[0.6, 0.2], [0.2, 0.3]])
SDE = sdes.VPSDE()
EPS = 1e-5


def _score(x, t):
    m, s = sdes.marginal_coefficients(SDE, t)
    return oracle.gaussian_score(x / m[:, None], s / m, MU, COV) / m[:, None]


def _marginal(t):
    m, s = (float(v) for v in sdes.marginal_coefficients(SDE, t))
    return m * MU, m**2 * COV + s**2 * np.eye(2)


def _analytic(x):
    """What the ODE computes for N(MU, COV) data, in float64: the flow is linear (it keeps the
    whitened coordinates of the Gaussian marginals), z = mean_1 + V_1^1/2 V_eps^-1/2 (x - mean_eps),
    and log p = log N(z; 0, I) + log p_eps(x) - log p_1(z)."""
    x = np.asarray(x, np.float64)
    (m_e, v_e), (m_1, v_1) = _marginal(EPS), _marginal(1.0)
    lam, u = np.linalg.eigh(COV)                       # V_t = U diag(m^2 lam + s^2) U^T
    d_e, d_1 = np.diag(u.T @ v_e @ u), np.diag(u.T @ v_1 @ u)
    z = m_1 + ((x - m_e) @ u * np.sqrt(d_1 / d_e)) @ u.T
    log_p = (stats.multivariate_normal(np.zeros(2), np.eye(2)).logpdf(z)
             + stats.multivariate_normal(m_e, v_e).logpdf(x)
             - stats.multivariate_normal(m_1, v_1).logpdf(z))
    return log_p, z


def _data(num, seed=0):
    return jnp.asarray(oracle.gmm_sample(np.random.default_rng(seed), num, [1.0], MU[None],
                                         COV[None])[0])


@pytest.mark.parametrize("method", ["rk4", "tsit5"])
def test_exact_trace_log_likelihood_matches_closed_form(method):
    # Measured: |error| < 1e-4 nats with rk4 at 100 steps and with tsit5 at rtol = atol = 1e-6.
    x = _data(16)
    run = jax.jit(functools.partial(likelihood.ode_log_likelihood, _score, SDE, trace="exact",
                                    method=method, num_steps=100, rtol=1e-6, atol=1e-6, eps=EPS))
    log_p, z = run(x, jax.random.PRNGKey(0))
    ref, z_ref = _analytic(x)
    np.testing.assert_allclose(z, z_ref, atol=1e-3)
    np.testing.assert_allclose(log_p, ref, atol=2e-3)


def test_hutchinson_estimate_is_unbiased_within_its_standard_error():
    # 4 points x 512 Rademacher probes each (one probe per batch row, fixed along the path).
    # The mean of each point's 512 estimates is within 5 SE of the closed form; the estimator is
    # genuinely random (its spread is > 0.01 nats) so the check is not vacuous.
    points, probes = _data(4, seed=3), 512
    x = jnp.repeat(points, probes, axis=0)
    run = jax.jit(functools.partial(likelihood.ode_log_likelihood, _score, SDE, num_steps=50,
                                    eps=EPS))
    log_p, _ = run(x, jax.random.PRNGKey(1))
    est = np.asarray(log_p, np.float64).reshape(4, probes)
    ref, _ = _analytic(points)
    se = est.std(1, ddof=1) / np.sqrt(probes)
    assert np.all(est.std(1) > 0.01)
    np.testing.assert_array_less(np.abs(est.mean(1) - ref), 5 * se + 1e-3)


def test_uniform_density_gives_exactly_num_bits():
    x = 2.0 * jax.random.randint(jax.random.PRNGKey(0), (8, 4, 4, 3), 0, 256) / 255.0 - 1.0
    dim = 4 * 4 * 3
    uniform = lambda y, key: jnp.full((y.shape[0],), -dim * math.log(2.0))   # density 2^-D
    bpd = jax.jit(functools.partial(likelihood.dequantized_bits_per_dim, uniform))(
        x, jax.random.PRNGKey(1))
    np.testing.assert_allclose(bpd, 8.0, rtol=1e-6)


def test_dequantized_bits_per_dim_is_not_negative_for_a_density_spiked_on_the_grid():
    # A comb of narrow Gaussians (std 1e-4) on the 256 grid values, per dimension: evaluated at the
    # grid points it has negative "bits per dim" (8 + log2(sqrt(2 pi) 1e-4) = -3.96), but the
    # dequantised estimate is >= 7 - log2(max density 15.6) = 3.04 whatever the noise draw.
    grid = jnp.asarray(2.0 * np.arange(256) / 255.0 - 1.0, jnp.float32)
    std = 1e-4

    def comb_log_density(y, key=None):
        per_dim = jax.scipy.special.logsumexp(
            jax.scipy.stats.norm.logpdf(y[..., None], grid, std), axis=-1) - math.log(256)
        return jnp.sum(per_dim.reshape(y.shape[0], -1), axis=1)

    x = grid[jax.random.randint(jax.random.PRNGKey(0), (64, 6), 0, 256)]
    continuous = -jax.jit(comb_log_density)(x) / (6 * math.log(2.0))
    np.testing.assert_allclose(continuous, 8 + math.log2(math.sqrt(2 * math.pi) * std), rtol=1e-3)
    bpd = jax.jit(functools.partial(likelihood.dequantized_bits_per_dim, comb_log_density))(
        x, jax.random.PRNGKey(2))
    assert float(bpd.min()) >= 3.0


def test_ode_bits_per_dim_matches_closed_form_density():
    # Discrete data on the 8-bit grid, dequantised; the ODE's bits/dim (exact trace) equals the
    # closed-form log-density's at the same dequantised points (same key), and is positive.
    x = jnp.clip(jnp.round((_data(32, seed=5) * 0.3 + 1.0) * 127.5) / 127.5 - 1.0, -1.0, 1.0)
    ode_ll = lambda y, key: likelihood.ode_log_likelihood(_score, SDE, y, key, trace="exact",
                                                          num_steps=100, eps=EPS)[0]
    seen = {}

    def analytic_ll(y, key):
        seen["y"] = np.asarray(y)
        return jnp.asarray(_analytic(y)[0], jnp.float32)

    bpd = jax.jit(functools.partial(likelihood.dequantized_bits_per_dim, ode_ll))(
        x, jax.random.PRNGKey(4))
    ref = likelihood.dequantized_bits_per_dim(analytic_ll, x, jax.random.PRNGKey(4))
    np.testing.assert_allclose(bpd, ref, atol=2e-3)
    assert float(bpd.min()) > 0.0
    assert np.all(np.abs(seen["y"] - np.asarray(x)) <= 2.0 / 255.0)


@pytest.mark.parametrize("call,match", [
    (lambda: likelihood.ode_log_likelihood(_score, SDE, jnp.ones((2, 2)), None, trace="hutch"),
     "trace"),
    (lambda: likelihood.ode_log_likelihood(_score, SDE, jnp.ones((2, 2)), None, trace="exact",
                                           method="rk45"), "method"),
    (lambda: likelihood.ode_log_likelihood(_score, SDE, jnp.ones((2, 2)), None, trace="exact",
                                           num_steps=0), "num_steps"),
    (lambda: likelihood.divergence_fn(lambda x, t: x, "hutchinson"), "probe"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_hutchinson_log_likelihood_on_nhwc_images():
    # Per-pixel i.i.d. N(0.2, 0.3^2) data on [64, 4, 4, 2]; the flow acts pixel by pixel, so the
    # closed form is the 1-D one of _analytic summed over the 32 pixels. The Jacobian is then
    # diagonal and a Rademacher probe (v_i^2 = 1) gives its trace exactly: every image's
    # estimate matches to solver accuracy (measured < 1e-4 nats; Gaussian probes, with random
    # v_i^2, would not).
    mean, var = 0.2, 0.09

    def score(x, t):
        m, s = sdes.marginal_coefficients(SDE, t)
        m, s = m[:, None, None, None], s[:, None, None, None]
        return -(x - m * mean) / (m**2 * var + s**2)

    x = mean + np.sqrt(var) * np.random.default_rng(7).standard_normal((64, 4, 4, 2))
    log_p, _ = jax.jit(functools.partial(likelihood.ode_log_likelihood, score, SDE, num_steps=50,
                                         eps=EPS))(jnp.asarray(x, jnp.float32),
                                                   jax.random.PRNGKey(3))
    (m_e, s_e), (m_1, s_1) = (tuple(float(v) for v in sdes.marginal_coefficients(SDE, t))
                              for t in (EPS, 1.0))
    v_e, v_1 = m_e**2 * var + s_e**2, m_1**2 * var + s_1**2
    z = m_1 * mean + np.sqrt(v_1 / v_e) * (x - m_e * mean)
    per_pixel = (stats.norm.logpdf(z) + stats.norm.logpdf(x, m_e * mean, np.sqrt(v_e))
                 - stats.norm.logpdf(z, m_1 * mean, np.sqrt(v_1)))
    err = np.asarray(log_p, np.float64) - per_pixel.reshape(64, -1).sum(1)
    np.testing.assert_allclose(err, 0.0, atol=2e-3)
