"""Tests for diffusion_jax.sde.sdes: marginals against forward simulation, closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax.sde import sdes

SDES = {"ve": sdes.VESDE(), "vp": sdes.VPSDE(), "subvp": sdes.SubVPSDE()}


def _simulate_forward(sde, x0, key, num_steps=1000, save_every=300):
    """Euler--Maruyama of the forward SDE on [0, 1] (independent of marginal_prob); returns the
    states at t = save_every / num_steps, 2 save_every / num_steps, ... and at t = 1."""
    dt = 1.0 / num_steps

    def body(x, i):
        f, g = sdes.drift_and_diffusion(sde, x, jnp.full((x.shape[0],), i * dt))
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
        x = x + f * dt + g[:, None] * np.sqrt(dt) * z
        return x, x

    x, traj = jax.lax.scan(body, x0, jnp.arange(num_steps))
    return traj[save_every - 1::save_every], x


@pytest.mark.parametrize("name", sorted(SDES))
def test_marginals_match_forward_simulation(name):
    # Data N(mu, c) per coordinate, 4000 chains x 2 coordinates, 1000 EM steps (the EM bias on
    # the variance is O(dt) ~ 1e-3 relative, < 0.1 SE), checked at t = 0.3, 0.6, 0.9 and 1.
    # Mean within 5 SE, variance within 5 SE of the Gaussian sample variance (var sqrt(2 / n)).
    sde = SDES[name]
    mu, c, n = np.array([1.5, -0.5]), np.array([0.5, 0.2]), 4000
    x0 = mu + np.sqrt(c) * np.random.default_rng(0).standard_normal((n, 2))
    saved, last = jax.jit(functools.partial(_simulate_forward, sde))(
        jnp.asarray(x0, jnp.float32), jax.random.PRNGKey(1))
    sigma_min2 = sde.sigma_min**2 if name == "ve" else 0.0        # VE's s(0) = sigma_min
    for t_end, x in zip([0.3, 0.6, 0.9, 1.0], list(saved) + [last]):
        m, s = (float(v) for v in sdes.marginal_coefficients(sde, t_end))
        mean = m * mu
        var = m**2 * c + s**2 - sigma_min2
        x = np.asarray(x, np.float64)
        np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / n))
        np.testing.assert_array_less(np.abs(x.var(0) - var), 5 * var * np.sqrt(2.0 / n))


@pytest.mark.parametrize("name", sorted(SDES))
def test_marginal_variance_solves_its_moment_ode(name):
    # For dx = -b(t)/2 x dt + g dW the marginal of x0 = 0 has var' = -b var + g^2 and the mean
    # coefficient m' = -b/2 m (b = 0 for VE): checked by autodiff at several t.
    sde = SDES[name]
    ts = jnp.array([0.05, 0.3, 0.7, 0.95])
    m_fn = lambda t: sdes.marginal_coefficients(sde, t)[0]
    var_fn = lambda t: sdes.marginal_coefficients(sde, t)[1] ** 2
    f, g = sdes.drift_and_diffusion(sde, jnp.ones((4, 1)), ts)
    b = -2.0 * f[:, 0]                                                      # f = -b/2 * 1
    np.testing.assert_allclose(jax.vmap(jax.grad(m_fn))(ts), -0.5 * b * m_fn(ts), rtol=1e-4)
    np.testing.assert_allclose(jax.vmap(jax.grad(var_fn))(ts), -b * var_fn(ts) + g**2, rtol=2e-3)


def test_defaults_and_closed_forms():
    vp, ve = sdes.VPSDE(), sdes.VESDE()
    assert (vp.beta_min, vp.beta_max, ve.sigma_min, ve.sigma_max) == (0.1, 20.0, 0.01, 50.0)
    t = np.array([0.0, 0.5, 1.0])
    m, s = sdes.marginal_coefficients(vp, t)
    log_m = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    np.testing.assert_allclose(m, np.exp(log_m), rtol=1e-6)
    np.testing.assert_allclose(s, np.sqrt(1 - np.exp(2 * log_m)), rtol=1e-5, atol=1e-7)
    _, s_sub = sdes.marginal_coefficients(sdes.SubVPSDE(), t)
    np.testing.assert_allclose(s_sub, 1 - np.exp(2 * log_m), rtol=1e-5, atol=1e-7)
    _, s_ve = sdes.marginal_coefficients(ve, t)
    np.testing.assert_allclose(s_ve, 0.01 * 5000.0**t, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SDES))
def test_time_for_sigma_inverts_sigma_ve(name):
    sde = SDES[name]
    t = jnp.array([1e-3, 0.1, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(sdes.time_for_sigma(sde, sdes.sigma_ve(sde, t)), t, rtol=2e-3,
                               atol=1e-6)


@pytest.mark.parametrize("name", sorted(SDES))
def test_prior_sample_and_logp(name):
    sde = SDES[name]
    std = 50.0 if name == "ve" else 1.0
    z = sdes.prior_sample(sde, jax.random.PRNGKey(0), (5000, 3))
    np.testing.assert_allclose(np.std(np.asarray(z)), std, rtol=0.03)
    ref = stats.multivariate_normal(np.zeros(3), std**2 * np.eye(3)).logpdf(np.asarray(z[:8]))
    np.testing.assert_allclose(sdes.prior_logp(sde, z[:8].reshape(8, 3, 1)), ref, rtol=1e-5)


def test_discretize_is_score_sdes_ddpm_and_smld_steps():
    n = 100
    x = jnp.ones((3, 2))
    t = jnp.array([0.0, 44 / 99, 1.0])                                     # grid indices 0, 44, 99
    vp = sdes.VPSDE(num_scales=n)
    f, g = sdes.discretize(vp, x, t)
    betas = np.linspace(0.1 / n, 20.0 / n, n)[[0, 44, 99]]
    np.testing.assert_allclose(g, np.sqrt(betas), rtol=1e-6)
    np.testing.assert_allclose(f[:, 0], np.sqrt(1 - betas) - 1, rtol=1e-5, atol=1e-7)
    ve = sdes.VESDE(num_scales=n)
    f, g = sdes.discretize(ve, x, t)
    sig = np.exp(np.linspace(np.log(0.01), np.log(50.0), n))
    expected = np.sqrt(sig[[0, 44, 99]] ** 2 - np.array([0.0, sig[43], sig[98]]) ** 2)
    np.testing.assert_allclose(g, expected, rtol=1e-5)
    assert float(jnp.abs(f).max()) == 0.0
    sub = sdes.SubVPSDE(num_scales=n)
    f, g = sdes.discretize(sub, x, t)
    f_c, g_c = sdes.drift_and_diffusion(sub, x, t)
    np.testing.assert_allclose(f, f_c / n, rtol=1e-6)
    np.testing.assert_allclose(g, g_c / np.sqrt(n), rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: sdes.make_sde("vpsde"), "sde"),
    (lambda: sdes.make_sde("vp", beta_min=30.0), "beta_min"),
    (lambda: sdes.make_sde("ve", sigma_min=0.0), "sigma_min"),
    (lambda: sdes.make_sde("subvp", num_scales=1), "num_scales"),
    (lambda: sdes.check_sde(object()), "sde"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


JIT_MODES = ("eager", "jit")


def _jit_or_not(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


# --- continuous time ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", JIT_MODES)
@pytest.mark.parametrize("beta_min,beta_max", [(0.1, 20.0), (0.5, 5.0)])
def test_vp_marginal_matches_integrated_sde(mode, beta_min, beta_max):
    ts = np.array([0.0, 1e-3, 0.1, 0.37, 0.8, 1.0])
    mean, std = _jit_or_not(lambda t: sdes.vp_marginal(t, beta_min, beta_max), mode)(ts)
    for t, m, s in zip(ts, np.asarray(mean), np.asarray(std)):
        # mean coefficient exp(-1/2 int_0^t beta(u) du), integrated numerically.
        integral, _ = integrate.quad(lambda u: beta_min + u * (beta_max - beta_min), 0.0, t)
        m_ref = np.exp(-0.5 * integral)
        assert m == pytest.approx(m_ref, rel=1e-5)
        assert s == pytest.approx(np.sqrt(1.0 - m_ref**2), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("mode", JIT_MODES)
def test_vp_marginal_gradient(mode):
    beta_min, beta_max = 0.1, 20.0
    mean_fn = lambda t: sdes.vp_marginal(t, beta_min, beta_max)[0]
    std_fn = lambda t: sdes.vp_marginal(t, beta_min, beta_max)[1]
    ts = jnp.array([0.05, 0.3, 0.9])
    d_mean = _jit_or_not(jax.vmap(jax.grad(mean_fn)), mode)(ts)
    d_std = _jit_or_not(jax.vmap(jax.grad(std_fn)), mode)(ts)
    t = np.asarray(ts, np.float64)
    beta_t = beta_min + t * (beta_max - beta_min)
    m = np.exp(-0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min)
    np.testing.assert_allclose(np.asarray(d_mean), -0.5 * beta_t * m, rtol=1e-5)
    # d/dt sqrt(1 - m^2) = -m m' / sqrt(1 - m^2) = 1/2 beta m^2 / sqrt(1 - m^2)
    np.testing.assert_allclose(np.asarray(d_std), 0.5 * beta_t * m**2 / np.sqrt(1 - m**2),
                               rtol=1e-4)


@pytest.mark.parametrize("mode", JIT_MODES)
def test_ve_sigma_and_gradient(mode):
    ts = jnp.array([0.0, 0.25, 0.5, 1.0])
    sigma = _jit_or_not(lambda t: sdes.ve_sigma(t, 0.01, 50.0), mode)(ts)
    expected = 0.01 * (5000.0 ** np.asarray(ts, np.float64))
    np.testing.assert_allclose(np.asarray(sigma), expected, rtol=1e-5)
    grad = _jit_or_not(jax.vmap(jax.grad(lambda t: sdes.ve_sigma(t, 0.01, 50.0))), mode)(ts)
    np.testing.assert_allclose(np.asarray(grad), expected * np.log(5000.0), rtol=1e-5)


@pytest.mark.parametrize("sigma_max,sigma_min,num_levels", [(1.0, 0.01, 10), (50.0, 0.01, 232)])
def test_geometric_sigmas(sigma_max, sigma_min, num_levels):
    sigmas = np.asarray(sdes.geometric_sigmas(sigma_max, sigma_min, num_levels))
    np.testing.assert_allclose(sigmas, np.geomspace(sigma_max, sigma_min, num_levels), rtol=1e-5)
    ratios = sigmas[1:] / sigmas[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
    assert np.all(ratios < 1.0)


def test_geometric_sigmas_validates():
    with pytest.raises(ValueError, match="sigma_min"):
        sdes.geometric_sigmas(0.01, 1.0, 10)
    with pytest.raises(ValueError, match="num_levels"):
        sdes.geometric_sigmas(1.0, 0.01, 1)
