"""Tests for diffusion_jax.sde.training: continuous DSM and EDM objectives against closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion_jax.sde import sdes, training

LAM = np.array([0.05, 0.4, 1.5])            # diagonal data covariance


def _exact_score(sde):
    """Score of the marginal N(0, diag(m^2 LAM + s^2)) of N(0, diag(LAM)) data.

    Written out rather than taken from ``gaussian_oracle``: under jit with more than 32768
    entries (here 20000 x 3) the oracle's eigenbasis contraction returns wrong values past
    flat index 32768 on this jax / XLA CPU build (eager is right); the closed form is exact.
    """
    def score(x, t):
        m, s = sdes.marginal_coefficients(sde, t)
        return -x / (m[:, None] ** 2 * LAM + s[:, None] ** 2)

    return score


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_dsm_loss_of_the_exact_score_has_its_closed_form_mean(name, likelihood_weighting):
    # For N(0, diag(LAM)) data and the exact score, E[||s score + z||^2 | t] = sum_i m^2 lam_i /
    # (m^2 lam_i + s^2); with likelihood weighting the integrand gains g^2 / s^2. The loss averages
    # over the 3 dims and t ~ U(eps, 1): the batch mean is within 5 SE of the integral (scipy).
    sde = sdes.make_sde(name)
    eps = 1e-2 if likelihood_weighting else 1e-5

    def expected_at(t):
        m, s = (float(v) for v in sdes.marginal_coefficients(sde, t))
        _, g = sdes.drift_and_diffusion(sde, jnp.zeros((1, 1)), jnp.array([t]))
        weight = float(g[0]) ** 2 / s**2 if likelihood_weighting else 1.0
        return weight * np.mean(m**2 * LAM / (m**2 * LAM + s**2))

    expected = integrate.quad(expected_at, eps, 1.0, limit=200)[0] / (1.0 - eps)
    x0 = jnp.asarray(np.sqrt(LAM) * np.random.default_rng(0).standard_normal((20000, 3)),
                     jnp.float32)
    loss, per_example, t = jax.jit(functools.partial(
        training.continuous_dsm_loss, _exact_score(sde), sde, eps=eps,
        likelihood_weighting=likelihood_weighting))(x0, jax.random.PRNGKey(1))
    se = float(np.std(per_example)) / np.sqrt(per_example.shape[0])
    assert abs(float(loss) - expected) < 5 * se, (float(loss), expected, se)
    assert float(t.min()) >= eps and float(t.max()) <= 1.0


def test_dsm_loss_prefers_the_exact_score():
    sde = sdes.VPSDE()
    x0 = jnp.asarray(np.sqrt(LAM) * np.random.default_rng(0).standard_normal((4000, 3)),
                     jnp.float32)
    exact = _exact_score(sde)
    loss = lambda fn: float(training.continuous_dsm_loss(fn, sde, x0, jax.random.PRNGKey(2))[0])
    assert loss(exact) < loss(lambda x, t: 1.1 * exact(x, t)) - 1e-3
    assert loss(exact) < loss(lambda x, t: 0.9 * exact(x, t)) - 1e-3


def test_edm_preconditioning_closed_forms():
    sd = 0.5
    sigma = jnp.array([0.002, 0.1, 0.5, 2.0, 80.0])
    c_skip, c_out, c_in, c_noise = training.edm_preconditioning(sigma, sd)
    s = np.asarray(sigma, np.float64)
    np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
    # EDM's design rules: unit-variance network input and target for data of std sd, and the
    # loss weight is 1 / c_out^2. At sigma = sd: c_skip = 1/2, c_out = sd / sqrt(2).
    np.testing.assert_allclose(np.asarray(c_in) ** 2 * (sd**2 + s**2), 1.0, rtol=1e-5)
    target_var = ((1 - np.asarray(c_skip)) ** 2 * sd**2 + np.asarray(c_skip) ** 2 * s**2) \
        / np.asarray(c_out) ** 2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-5)
    np.testing.assert_allclose(training.edm_loss_weight(sigma, sd) * c_out**2, 1.0, rtol=1e-5)
    c = training.edm_preconditioning(jnp.array(sd), sd)
    np.testing.assert_allclose([c[0], c[1]], [0.5, sd / np.sqrt(2)], rtol=1e-6)


def test_edm_denoiser_applies_the_preconditioning():
    net = lambda x_in, c_noise: jnp.sin(x_in) + c_noise[:, None]
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    sigma = jnp.array([0.01, 0.3, 1.0, 30.0])
    out = training.edm_denoiser(net, 0.5)(x, sigma)
    c_skip, c_out, c_in, c_noise = (np.asarray(c)[:, None] for c in
                                    training.edm_preconditioning(sigma, 0.5))
    expected = c_skip * x + c_out * (np.sin(c_in * np.asarray(x)) + c_noise)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_edm_loss_of_the_exact_denoiser_is_one_per_dimension():
    # Data N(0, sd^2 I): the exact denoiser's error variance is sd^2 sigma^2 / (sd^2 + sigma^2),
    # and lambda(sigma) times it is exactly 1 at every sigma. 20000 examples, 5 SE.
    sd = 0.5
    x0 = sd * jax.random.normal(jax.random.PRNGKey(0), (20000, 4))
    exact = lambda x, sigma: x * (sd**2 / (sd**2 + sigma**2))[:, None]
    loss, per_example, sigma = jax.jit(functools.partial(training.edm_loss, exact))(
        x0, jax.random.PRNGKey(1))
    se = float(np.std(per_example)) / np.sqrt(20000)
    assert abs(float(loss) - 1.0) < 5 * se, (float(loss), se)
    # A denoiser that ignores the data (x0_hat = 0) has weight * sd^2 = a larger loss.
    worse, _, _ = jax.jit(functools.partial(training.edm_loss, lambda x, s: jnp.zeros_like(x)))(
        x0, jax.random.PRNGKey(1))
    assert float(worse) > 1.5


def test_lognormal_sigma_moments():
    sigma = training.sample_lognormal_sigmas(jax.random.PRNGKey(0), 20000, -1.2, 1.2)
    log_s = np.log(np.asarray(sigma, np.float64))
    assert abs(log_s.mean() + 1.2) < 5 * 1.2 / np.sqrt(20000)
    assert abs(log_s.std() - 1.2) < 5 * 1.2 / np.sqrt(2 * 20000)


def test_bad_eps_raises_value_error():
    with pytest.raises(ValueError, match="eps"):
        training.continuous_dsm_loss(_exact_score(sdes.VPSDE()), sdes.VPSDE(), jnp.ones((2, 3)),
                                     jax.random.PRNGKey(0), eps=0.0)


NCSN_MU = np.array([0.3, -0.5, 1.0])          # Gaussian data N(NCSN_MU, diag(NCSN_S^2))
NCSN_S = np.array([0.5, 1.0, 0.2])


def _ncsn_gaussian_data(seed, batch):
    rng = np.random.default_rng(seed)
    return jnp.asarray(NCSN_MU + NCSN_S * rng.standard_normal((batch, 3)), jnp.float32)


def _std_normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- denoising score matching --------------------------------------------------------------------

def test_dsm_loss_exact_values():
    x0 = _std_normal(11, (64, 4, 4, 1))
    sigmas = sdes.geometric_sigmas(1.0, 0.01, 10)
    key = jax.random.PRNGKey(12)
    perfect = lambda x, sigma: -(x - x0) / sigma[:, None, None, None] ** 2
    dsm = training.dsm_loss
    assert float(dsm(perfect, x0, sigmas, key)) == pytest.approx(0.0, abs=1e-6)
    # One noise level: a score off by c everywhere costs exactly 1/2 sigma^2 D c^2.
    one_level = jnp.full((10,), 0.3)          # same length as sigmas: reuses the compiled draws
    c = 0.25
    off = lambda x, sigma: perfect(x, sigma) + c
    got = float(dsm(off, x0, one_level, key))
    assert got == pytest.approx(0.5 * 0.3**2 * 16 * c**2, rel=1e-4)


def test_dsm_loss_at_exact_gaussian_score():
    """x0 ~ N(NCSN_MU, NCSN_S^2): the optimal score -(x - NCSN_MU) / (NCSN_S^2 + sigma^2) has
    loss 1/2 sum_d S_d^2 / (S_d^2 + sigma^2), averaged over the uniformly drawn sigma."""
    batch = 50000
    x0 = _ncsn_gaussian_data(13, batch)
    sigmas = sdes.geometric_sigmas(2.0, 0.05, 6)
    mu, s2 = jnp.asarray(NCSN_MU, jnp.float32), jnp.asarray(NCSN_S**2, jnp.float32)
    score = lambda x, sigma: -(x - mu) / (s2 + sigma[:, None] ** 2)
    dsm = jax.jit(training.dsm_loss, static_argnums=0)     # jitted here, eager above
    loss = float(dsm(score, x0, sigmas, jax.random.PRNGKey(14)))
    sig2 = np.asarray(sigmas, np.float64)[:, None] ** 2
    q = NCSN_S[None] ** 2 / (NCSN_S[None] ** 2 + sig2)        # [L, D] residual fraction
    per_level_mean = 0.5 * q.sum(axis=1)                       # E[loss | sigma]
    per_level_var = 0.5 * (q**2).sum(axis=1)                   # (1/2)^2 * 2 sum_d q_d^2
    variance = per_level_var.mean() + per_level_mean.var()
    assert loss == pytest.approx(per_level_mean.mean(), abs=5 * np.sqrt(variance / batch))
    worse = float(dsm(lambda x, s: 1.2 * score(x, s), x0, sigmas, jax.random.PRNGKey(14)))
    assert worse > loss
