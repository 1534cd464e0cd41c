"""Rectified-flow mathematics (diffusion_jax/sde/flow.py) against closed forms and diffusers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.sde import flow

M, S = 0.7, 0.4  # the Gaussian data N(M, S^2) of the closed-form velocity


def gaussian_velocity(x, t, m=M, s=S):
    """``v*(x, t) = E[eps - x0 | x_t = x]`` for data ``N(m, s^2)`` (per coordinate):
    ``x_t ~ N((1 - t) m, V)``, ``V = (1 - t)^2 s^2 + t^2``, ``E[x0|x] = m + (1 - t) s^2 / V
    (x - (1 - t) m)``, ``E[eps|x] = t / V (x - (1 - t) m)``."""
    t = t.reshape(t.shape + (1,) * (x.ndim - 1))
    var = (1 - t) ** 2 * s**2 + t**2
    centred = x - (1 - t) * m
    return t / var * centred - (m + (1 - t) * s**2 / var * centred)


@pytest.mark.parametrize("jit", [False, True])
def test_conversions_round_trip(jit):
    key = jax.random.PRNGKey(0)
    x0, noise = jax.random.normal(key, (2, 3, 4, 4, 2))
    t = jnp.array([0.1, 0.5, 0.9])
    wrap = jax.jit if jit else (lambda f: f)
    x_t = wrap(flow.interpolate)(x0, noise, t)
    v = flow.velocity_target(x0, noise)
    np.testing.assert_allclose(wrap(flow.x0_from_velocity)(x_t, v, t), x0, atol=1e-5)
    np.testing.assert_allclose(wrap(flow.eps_from_velocity)(x_t, v, t), noise, atol=1e-5)
    np.testing.assert_allclose(wrap(flow.velocity_from_x0)(x_t, x0, t), v, atol=1e-4)
    np.testing.assert_allclose(wrap(flow.velocity_from_eps)(x_t, noise, t), v, atol=1e-4)
    score = flow.score_from_velocity(x_t, v, t)
    np.testing.assert_allclose(score, -noise / t[:, None, None, None], atol=1e-4)
    np.testing.assert_allclose(wrap(flow.velocity_from_score)(x_t, score, t), v, atol=1e-4)
    # The EDM view: y = x0 + sigma n with sigma = t / (1 - t), and back.
    sigma = t / (1 - t)
    y = x0 + sigma[:, None, None, None] * noise
    denoiser = flow.denoiser_from_velocity(lambda x, tt: flow.velocity_from_x0(x, x0, tt))
    np.testing.assert_allclose(wrap(denoiser)(y, sigma), x0, atol=1e-4)
    velocity = flow.velocity_from_denoiser(denoiser)
    np.testing.assert_allclose(wrap(velocity)(x_t, t), v, atol=1e-4)


def test_vp_to_flow_is_the_same_point_of_the_path():
    x0, noise = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
    alpha_bar = jnp.array([0.9, 0.3, 1e-4])
    x_vp = jnp.sqrt(alpha_bar)[:, None] * x0 + jnp.sqrt(1 - alpha_bar)[:, None] * noise
    x_t, t = flow.vp_to_flow(x_vp, alpha_bar)
    np.testing.assert_allclose(x_t, flow.interpolate(x0, noise, t), atol=1e-5)


def test_score_of_the_gaussian_velocity_is_the_exact_score():
    x = jnp.linspace(-2, 2, 7)[:, None]
    t = jnp.full((7,), 0.3)
    var = (0.7**2) * S**2 + 0.3**2
    exact = -(x - 0.7 * M) / var
    np.testing.assert_allclose(flow.score_from_velocity(x, gaussian_velocity(x, t), t), exact,
                               rtol=1e-5)


def _perturbed_loss(theta, x0, key, velocity=gaussian_velocity):
    model = lambda x, t: velocity(x, t) + theta[0] + theta[1] * x
    return flow.flow_matching_loss(model, x0, key)[0]


def test_the_exact_velocity_minimises_the_loss():
    key_data, key_loss = jax.random.split(jax.random.PRNGKey(2))
    x0 = M + S * jax.random.normal(key_data, (1 << 18, 1))
    loss_grad = jax.jit(jax.value_and_grad(_perturbed_loss))
    loss0, grad0 = loss_grad(jnp.zeros(2), x0, key_loss)
    assert np.all(np.abs(grad0) < 0.03), grad0
    for theta in ([0.2, 0.0], [-0.2, 0.0], [0.0, 0.2], [0.0, -0.2]):
        loss, grad = loss_grad(jnp.array(theta), x0, key_loss)
        assert loss > loss0 + 0.01, (theta, loss, loss0)
        assert np.max(np.abs(grad)) > 0.1
    # A wrong field (the velocity of other data) is not a stationary point.
    wrong = lambda x, t: gaussian_velocity(x, t, m=M + 0.3)
    grad_wrong = jax.grad(_perturbed_loss)(jnp.zeros(2), x0, key_loss, wrong)
    assert np.max(np.abs(grad_wrong)) > 0.1, grad_wrong


def test_time_sampling_distributions():
    key = jax.random.PRNGKey(3)
    n = 1 << 16
    t, q = flow.sample_times(key, n, "uniform")
    np.testing.assert_array_equal(t, q)
    assert abs(float(jnp.mean(t)) - 0.5) < 0.01
    t, q = flow.sample_times(key, n, "logit_normal", logit_mean=0.5, logit_std=0.8)
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
    np.testing.assert_allclose(q, jax.scipy.stats.norm.cdf((logit - 0.5) / 0.8), atol=1e-4)
    # mode with s = 0 is uniform; with s = 1.29 (SD3) it is f(u), u = 1 - quantile.
    t, q = flow.sample_times(key, n, "mode", mode_scale=0.0)
    np.testing.assert_allclose(t, q, atol=1e-6)
    t, q = flow.sample_times(key, n, "mode", mode_scale=1.29)
    u = 1 - np.asarray(q)
    np.testing.assert_allclose(t, 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u), atol=1e-5)
    t, q = flow.sample_times(key, n, "cosmap")
    np.testing.assert_allclose(t, 1 - 1 / (np.tan(np.pi * np.asarray(q) / 2) + 1), rtol=1e-4)
    # Every sampling's quantile increases with t (the per-quartile metrics' order).
    for sampling in flow.TIME_SAMPLINGS:
        t, q = flow.sample_times(key, 256, sampling, shift=3.0)
        order = np.argsort(np.asarray(t))
        assert np.all(np.diff(np.asarray(q)[order]) >= 0), sampling


def test_shifts():
    np.testing.assert_allclose(flow.shift_time(0.5, 3.0), 0.75)
    np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 1.0]), 3.0), [0.0, 1.0])
    assert flow.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert flow.dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert flow.dynamic_shift_mu(2176) == pytest.approx(0.825)
    t = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(flow.exponential_time_shift(t, 1.1),
                               math.exp(1.1) / (math.exp(1.1) + (1 / t - 1)), rtol=1e-12)


def test_loss_weights_equal_diffusers():
    training_utils = pytest.importorskip("diffusers.training_utils")
    torch = pytest.importorskip("torch")
    t = np.array([0.05, 0.3, 0.5, 0.8, 0.99], np.float32)
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ref = training_utils.compute_loss_weighting_for_sd3(scheme, torch.tensor(t)).numpy()
        np.testing.assert_allclose(flow.loss_weight(jnp.asarray(t), scheme), ref, rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(time_sampling="lognormal"), "Unknown diffusion.flow_time_sampling 'lognormal'"),
    (dict(time_sampling="mode", mode_scale=3.0), "diffusion.flow_mode_scale must lie in"),
    (dict(time_sampling="logit_normal", logit_std=0.0), "diffusion.flow_logit_std must be > 0"),
    (dict(time_sampling="uniform", shift=-1.0), "diffusion.flow_shift must be > 0"),
])
def test_bad_time_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flow.check_time_sampling(**kwargs)
    with pytest.raises(ValueError, match="Unknown weighting 'snr'"):
        flow.loss_weight(jnp.ones(2), "snr")
