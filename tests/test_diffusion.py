"""Forward process, posterior and parameterisation conversions against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from diffusion_jax import diffusion, schedules

MODES = ("eager", "jit")
PRED_TYPES = ("eps", "x0", "v", "score")


def _maybe_jit(fn, mode, static_argnums=()):
    return jax.jit(fn, static_argnums=static_argnums) if mode == "jit" else fn


@pytest.fixture(scope="module")
def sched():
    return schedules.make_schedule(schedules.linear_beta_schedule(1000))


def _batch(seed, shape=(6, 4, 4, 3)):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32),
            jnp.asarray(rng.standard_normal(shape), jnp.float32))


def _alpha_bar_np(sched_betas):
    return np.cumprod(1.0 - np.asarray(sched_betas, np.float64))


@pytest.mark.parametrize("mode", MODES)
def test_q_sample_and_q_mean_variance(sched, mode):
    x0, noise = _batch(0)
    t = jnp.array([0, 1, 10, 500, 998, 999], jnp.int32)
    ab = _alpha_bar_np(sched.betas)[np.asarray(t)][:, None, None, None]
    x_t = _maybe_jit(diffusion.q_sample, mode)(sched, x0, t, noise)
    np.testing.assert_allclose(np.asarray(x_t),
                               np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * np.asarray(noise),
                               rtol=1e-4, atol=1e-5)
    mean, var, log_var = _maybe_jit(diffusion.q_mean_variance, mode)(sched, x0, t)
    np.testing.assert_allclose(np.asarray(mean), np.sqrt(ab) * np.asarray(x0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), 1 - ab, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(log_var), np.log(1 - ab), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("mode", MODES)
def test_posterior_matches_bayes_rule(name, mode):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): a product of two Gaussians."""
    sched = schedules.make_schedule(schedules.get_beta_schedule(name, 1000))
    x0, x_t = _batch(1, (5, 7))
    t = jnp.array([1, 2, 100, 600, 999], jnp.int32)
    mean, var, log_var = _maybe_jit(diffusion.q_posterior, mode)(sched, x0, x_t, t)

    betas = np.asarray(sched.betas, np.float64)
    ab = np.cumprod(1.0 - betas)
    tn = np.asarray(t)
    beta, ab_prev = betas[tn][:, None], ab[tn - 1][:, None]
    # prior q(x_{t-1} | x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev)
    prior_prec, prior_mean = 1.0 / (1.0 - ab_prev), np.sqrt(ab_prev) * np.asarray(x0, np.float64)
    # likelihood q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta), as a Gaussian in x_{t-1}:
    # precision (1 - beta) / beta, mean x_t / sqrt(1 - beta).
    lik_prec, lik_mean = (1.0 - beta) / beta, np.asarray(x_t, np.float64) / np.sqrt(1.0 - beta)
    post_var = 1.0 / (prior_prec + lik_prec)
    post_mean = post_var * (prior_prec * prior_mean + lik_prec * lik_mean)

    np.testing.assert_allclose(np.asarray(mean), post_mean, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(var), post_var, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(log_var), np.log(post_var), rtol=1e-4, atol=1e-4)


def test_posterior_at_t0_is_x0_with_clipped_log_variance(sched):
    x0, x_t = _batch(2, (3, 5))
    t = jnp.zeros((3,), jnp.int32)
    mean, var, log_var = diffusion.q_posterior(sched, x0, x_t, t)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(x0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(var), 0.0)
    betas = np.asarray(sched.betas, np.float64)
    ab = np.cumprod(1 - betas)
    beta_tilde_1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    np.testing.assert_allclose(np.asarray(log_var), np.log(beta_tilde_1), rtol=1e-5)


@pytest.mark.parametrize("pred_type", PRED_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_through_every_parameterisation(pred_type, mode):
    x0, eps = _batch(3, (3, 8, 8, 1))
    ab = jnp.array([0.999, 0.5, 0.02]).reshape(3, 1, 1, 1)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    target = _maybe_jit(diffusion.from_x0_and_eps, mode, static_argnums=3)(x0, eps, ab, pred_type)
    x0_back, eps_back = _maybe_jit(diffusion.to_x0_and_eps, mode, static_argnums=3)(
        target, x_t, ab, pred_type)
    # Recovering x0 from eps divides by sqrt(alpha_bar), eps from x0 by sqrt(1 - alpha_bar):
    # float32 rounding of x_t (~1e-7 relative) is amplified by up to 1 / sqrt(min(ab, 1 - ab)).
    tol = 1e-5 / np.sqrt(np.minimum(np.asarray(ab), 1 - np.asarray(ab)))
    assert np.all(np.abs(np.asarray(x0_back - x0)) <= tol)
    assert np.all(np.abs(np.asarray(eps_back - eps)) <= tol)


@pytest.mark.parametrize("alpha_bar", [0.9, 0.3])
def test_named_helpers_are_mutually_inverse(alpha_bar):
    x0, eps = _batch(4, (3, 6))
    ab = jnp.asarray(alpha_bar)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    v = diffusion.v_from_x0_eps(x0, eps, ab)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    close(diffusion.x0_from_eps(x_t, eps, ab), x0)
    close(diffusion.eps_from_x0(x_t, x0, ab), eps)
    close(diffusion.x0_from_v(x_t, v, ab), x0)
    close(diffusion.eps_from_v(x_t, v, ab), eps)
    close(diffusion.eps_from_score(diffusion.score_from_eps(eps, ab), ab), eps)


def test_v_is_the_angular_velocity():
    """With alpha = cos(phi), sigma = sin(phi): v = d x_t / d phi (Salimans & Ho, 2022)."""
    x0, eps = _batch(5, (2, 5))
    phi = 0.7
    x_of_phi = lambda p: jnp.cos(p) * x0 + jnp.sin(p) * eps
    _, dx_dphi = jax.jvp(x_of_phi, (phi,), (1.0,))
    v = diffusion.v_from_x0_eps(x0, eps, jnp.cos(phi) ** 2)
    np.testing.assert_allclose(np.asarray(v), np.asarray(dx_dphi), atol=1e-6)


@pytest.mark.parametrize("alpha_bar", [0.99, 0.5, 0.05])
def test_score_from_eps_is_score_of_forward_marginal(alpha_bar):
    x0, eps = _batch(6, (3, 4))
    ab = jnp.asarray(alpha_bar)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    score = diffusion.score_from_eps(eps, ab)
    closed_form = -(x_t - jnp.sqrt(ab) * x0) / (1 - ab)
    log_q = lambda x: jnp.sum(norm.logpdf(x, jnp.sqrt(ab) * x0, jnp.sqrt(1 - ab)))
    autodiff = jax.grad(log_q)(x_t)
    np.testing.assert_allclose(np.asarray(score), np.asarray(closed_form), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(score), np.asarray(autodiff), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", ["epsilon", "sample", "v_prediction", ""])
def test_unknown_pred_type_raises(bad):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="eps.*x0.*v.*score"):
        diffusion.to_x0_and_eps(x, x, 0.5, bad)
    with pytest.raises(ValueError, match=f"'{bad}'"):
        diffusion.from_x0_and_eps(x, x, 0.5, bad)


def test_q_sample_checks_shapes_dtypes_and_known_timesteps(sched):
    x0, noise = _batch(0)
    t = jnp.arange(6, dtype=jnp.int32)
    with pytest.raises(ValueError, match="same shape"):
        diffusion.q_sample(sched, x0, t, noise[:, :2])
    with pytest.raises(ValueError, match="same shape"):  # checked at trace time, so under jit too
        jax.jit(diffusion.q_sample)(sched, x0[0, 0, 0, 0], t, noise)
    with pytest.raises(ValueError, match="floating point"):
        diffusion.q_sample(sched, x0.astype(jnp.int32), t, noise.astype(jnp.int32))
    with pytest.raises(ValueError, match="4 timesteps for a batch of 6"):
        jax.jit(diffusion.q_sample)(sched, x0, t[:4], noise)
    with pytest.raises(ValueError, match="integer timesteps"):
        jax.jit(diffusion.q_sample)(sched, x0, t.astype(jnp.float32), noise)
    for bad in (1000, -1):
        with pytest.raises(ValueError, match=r"lie in \[0, T=1000\)"):
            diffusion.q_sample(sched, x0, t.at[2].set(bad), noise)
    # Traced t is not value-checked: t = T reads the last step (JAX clamps; documented).
    q_sample = jax.jit(diffusion.q_sample)
    clamped = q_sample(sched, x0, t.at[2].set(1000), noise)
    last = q_sample(sched, x0, t.at[2].set(999), noise)
    np.testing.assert_array_equal(clamped, last)
