"""Losses against closed forms: Gaussian data, point masses, scipy integrals and CDFs.

Monte Carlo checks use the exact variance of the per-example loss (the residual of an optimal
predictor for Gaussian data is Gaussian, so each per-example loss is a scaled chi-square) and
allow 5 standard errors.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax import diffusion, losses, schedules

MODES = ("eager", "jit")
PRED_TYPES = ("eps", "x0", "v", "score")
MU = np.array([0.3, -0.5, 1.0])          # Gaussian data N(MU, diag(S^2))
S = np.array([0.5, 1.0, 0.2])


def _sched(name="linear", num_timesteps=1000):
    return schedules.make_schedule(schedules.get_beta_schedule(name, num_timesteps))


def _ref_arrays(sched):
    """float64 alpha_bar, beta, posterior variance and coef1 from the float32 betas."""
    betas = np.asarray(sched.betas, np.float64)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    return dict(ab=ab, betas=betas, post_var=betas * (1 - ab_prev) / (1 - ab),
                coef1=betas * np.sqrt(ab_prev) / (1 - ab))


def _gaussian_optimal(pred_type, sched):
    """E[target | x_t] for x0 ~ N(MU, diag(S^2)), written per target from Gaussian conditioning."""
    mu, s2 = jnp.asarray(MU, jnp.float32), jnp.asarray(S**2, jnp.float32)

    def denoise(x_t, t):
        ab = sched.alphas_cumprod[t][:, None]
        a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        var_xt = ab * s2 + (1 - ab)                       # Var(x_t) per dim
        centred = x_t - a * mu
        eps = b * centred / var_xt                        # Cov(eps, x_t) = b
        x0 = mu + a * s2 * centred / var_xt               # Cov(x0, x_t) = a s^2
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0, "score": -eps / b}[pred_type]

    return denoise


def _gaussian_residual_var(pred_type, ab):
    """Var(target | x_t) per dim, [B, D], for the Gaussian data (ab: [B, 1] float64)."""
    a2, b2, s2 = ab, 1 - ab, S[None] ** 2
    var_xt = a2 * s2 + b2
    var_eps = 1 - b2 / var_xt
    return {
        "eps": var_eps,
        "x0": s2 * b2 / var_xt,
        "v": (a2 + b2 * s2) - a2 * b2 * (1 - s2) ** 2 / var_xt,
        "score": var_eps / b2,
    }[pred_type]


def _gaussian_data(seed, batch):
    rng = np.random.default_rng(seed)
    return jnp.asarray(MU + S * rng.standard_normal((batch, 3)), jnp.float32)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _maybe_jit(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


# --- timesteps and weights ---------------------------------------------------------------------

def test_sample_timesteps_uniform():
    t = losses.sample_timesteps(jax.random.PRNGKey(0), 20000, 10)
    assert t.shape == (20000,) and t.dtype == jnp.int32
    counts = np.bincount(np.asarray(t), minlength=10)
    assert counts.shape == (10,)                     # no value outside [0, 10)
    expected, sd = 2000.0, math.sqrt(20000 * 0.1 * 0.9)
    assert np.all(np.abs(counts - expected) < 5 * sd)


@pytest.mark.parametrize("mode", MODES)
def test_loss_weight_matches_min_snr_table(mode):
    """Hang et al. (2023): eps min(snr, g)/snr, x0 min(snr, g), v min(snr, g)/(snr + 1)."""
    ab = jnp.array([0.9999, 0.99, 0.9, 5 / 6, 0.5, 0.1, 1e-4])
    snr = np.asarray(ab, np.float64) / (1 - np.asarray(ab, np.float64))
    gamma = 5.0
    clipped = np.minimum(snr, gamma)
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for pred_type, want in expected.items():
        fn = _maybe_jit(functools.partial(losses.loss_weight, pred_type=pred_type,
                                          weighting="min_snr", min_snr_gamma=gamma), mode)
        np.testing.assert_allclose(np.asarray(fn(ab)), want, rtol=2e-4, err_msg=pred_type)
    # 'snr': w = snr on the x0 error, i.e. the plain eps-MSE for every parameterisation.
    np.testing.assert_allclose(np.asarray(losses.loss_weight(ab, "eps", "snr")), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(losses.loss_weight(ab, "x0", "snr")), snr, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(losses.loss_weight(ab, "v", "snr")), snr / (snr + 1),
                               rtol=2e-4)
    for pred_type in PRED_TYPES:
        np.testing.assert_array_equal(np.asarray(losses.loss_weight(ab, pred_type, "uniform")), 1)


def test_loss_weight_rejects_unknown_names():
    with pytest.raises(ValueError, match="uniform.*snr.*min_snr"):
        losses.loss_weight(0.5, "eps", "truncated")
    with pytest.raises(ValueError, match="eps.*x0.*v.*score"):
        losses.loss_weight(0.5, "epsilon", "snr")


def test_weightings_are_one_objective_in_every_parameterisation():
    """Same denoiser expressed in each parameterisation: 'snr' gives the eps-MSE and 'min_snr'
    gives min(snr, gamma) times the x0-MSE, example by example."""
    sched = _sched()
    x0 = _normal(1, (256, 4, 4, 2))
    key = jax.random.PRNGKey(2)

    def run(pred_type, weighting):
        def denoise(x_t, t):                      # one eps-model, re-expressed as pred_type
            ab = schedules.extract(sched.alphas_cumprod, t, x_t.ndim)
            eps_hat = 0.6 * x_t + 0.2 * jnp.sin(3 * x_t)
            x0_hat, eps_hat = diffusion.to_x0_and_eps(eps_hat, x_t, ab, "eps")
            return diffusion.from_x0_and_eps(x0_hat, eps_hat, ab, pred_type)
        return losses.denoising_loss(denoise, sched, x0, key, pred_type=pred_type,
                                     weighting=weighting, min_snr_gamma=5.0)

    _, eps_mse, t = run("eps", "uniform")
    _, x0_mse, _ = run("x0", "uniform")
    ab = np.cumprod(1 - np.asarray(sched.betas, np.float64))[np.asarray(t)]
    snr = ab / (1 - ab)
    for pred_type in PRED_TYPES:
        _, snr_weighted, t_again = run(pred_type, "snr")
        _, min_snr_weighted, _ = run(pred_type, "min_snr")
        np.testing.assert_array_equal(np.asarray(t_again), np.asarray(t))
        np.testing.assert_allclose(np.asarray(snr_weighted), np.asarray(eps_mse), rtol=2e-3,
                                   err_msg=pred_type)
        np.testing.assert_allclose(np.asarray(min_snr_weighted),
                                   np.minimum(snr, 5.0) * np.asarray(x0_mse), rtol=2e-3,
                                   err_msg=pred_type)


# --- denoising loss on Gaussian data ------------------------------------------------------------

@pytest.mark.parametrize("pred_type,mode", [(p, "eager") for p in PRED_TYPES] + [("v", "jit")])
def test_optimal_denoiser_reaches_closed_form_minimum(pred_type, mode):
    """Gaussian data: the loss of E[target | x_t] is mean_d Var(target_d | x_t) at each t."""
    sched = _sched("linear")
    batch = 20000
    x0 = _gaussian_data(3, batch)
    loss_fn = _maybe_jit(functools.partial(losses.denoising_loss,
                                           _gaussian_optimal(pred_type, sched),
                                           pred_type=pred_type), mode)
    loss, per_example, t = loss_fn(sched, x0, jax.random.PRNGKey(4))
    assert per_example.shape == (batch,) and t.shape == (batch,)
    assert float(loss) == pytest.approx(float(np.mean(np.asarray(per_example))), rel=1e-5)
    ab = _ref_arrays(sched)["ab"][np.asarray(t)][:, None]
    m = _gaussian_residual_var(pred_type, ab)                              # [B, D]
    expected = m.mean(axis=1)
    var = 2 * (m**2).sum(axis=1) / m.shape[1] ** 2                         # of mean_d chi2 terms
    z = np.sum(np.asarray(per_example, np.float64) - expected) / np.sqrt(var.sum())
    assert abs(z) < 5, z


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_eps_loss_closed_form_and_shifted_denoiser_is_worse(name):
    """Per t: E||eps - eps*||^2 / D = 1 - (1 - ab) / (ab s^2 + 1 - ab); eps* + c adds c^2."""
    sched = _sched(name)
    batch, c = 20000, 0.1
    x0 = _gaussian_data(5, batch)
    key = jax.random.PRNGKey(6)
    optimal = _gaussian_optimal("eps", sched)
    loss, per_example, t = losses.denoising_loss(optimal, sched, x0, key)
    shifted_loss, _, _ = losses.denoising_loss(lambda x, tt: optimal(x, tt) + c, sched, x0, key)
    ab = _ref_arrays(sched)["ab"][np.asarray(t)][:, None]
    m = 1 - (1 - ab) / (ab * S[None] ** 2 + 1 - ab)                        # brief's closed form
    se = np.sqrt((2 * (m**2).sum(axis=1) / 9).sum()) / batch
    assert float(loss) == pytest.approx(m.mean(), abs=5 * se)
    # shifted - optimal = c^2 + 2 c mean_d(residual): mean c^2, sd 2c sqrt(sum_d m_d) / D
    diff = float(shifted_loss - loss)
    se_diff = np.sqrt((4 * c**2 * m.sum(axis=1) / 9).sum()) / batch
    assert diff > 0
    assert diff == pytest.approx(c**2, abs=5 * se_diff)


# --- variational bound pieces --------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_normal_kl_matches_numerical_integral(seed):
    rng = np.random.default_rng(seed)
    m1, m2 = rng.normal(size=2)
    lv1, lv2 = rng.normal(scale=0.7, size=2)
    kl = float(losses.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2),
                                jnp.float32(lv2)))
    p = stats.norm(m1, np.exp(0.5 * lv1))
    q = stats.norm(m2, np.exp(0.5 * lv2))
    integrand = lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x))
    ref, _ = integrate.quad(integrand, m1 - 30 * p.std(), m1 + 30 * p.std(), limit=200)
    assert kl == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert float(losses.normal_kl(m1, lv1, m1, lv1)) == pytest.approx(0.0, abs=1e-7)


GRID = np.arange(256) / 127.5 - 1.0        # the 8-bit data grid in [-1, 1]


def _reference_bin_log_probs(mean, scale):
    """float64 log P(bin) for every grid point, with scipy (tail-aware: sf on the right)."""
    lo = np.where(GRID < -0.999, -np.inf, (GRID - 1 / 255 - mean) / scale)
    hi = np.where(GRID > 0.999, np.inf, (GRID + 1 / 255 - mean) / scale)
    right = (lo + hi) > 0
    prob = np.where(right, stats.norm.sf(lo) - stats.norm.sf(hi),
                    stats.norm.cdf(hi) - stats.norm.cdf(lo))
    with np.errstate(divide="ignore"):          # bins beyond float64's range: log 0 = -inf
        return np.log(prob), lo, hi


@pytest.mark.parametrize("mean,scale", [(0.0, 0.5), (0.3, 0.01), (-0.95, 0.003), (1.4, 0.2),
                                        (0.0, 5.0), (-0.2, 1e-4)])
@pytest.mark.parametrize("mode", MODES)
def test_discretized_gaussian_bins_sum_to_one_and_match_scipy(mean, scale, mode):
    x = jnp.asarray(GRID, jnp.float32)[None]                              # [1, 256]
    fn = _maybe_jit(losses.discretized_gaussian_log_likelihood, mode)
    log_p = np.asarray(fn(x, jnp.float32(mean), jnp.float32(np.log(scale))), np.float64)[0]
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-5)
    ref, lo, hi = _reference_bin_log_probs(mean, scale)
    finite = ref > -600                        # float32 log-probs are finite well past this
    assert np.all(np.isfinite(log_p[finite]))
    # float32 rounding of the standardised bin edges, ~2.4e-7 (|x| + |mean| + 1) / scale, moves
    # log P by up to |edge| times that (the slope of log Phi in the tail).
    finite_abs = lambda e: np.where(np.isfinite(e), np.abs(e), 0.0)
    edge = np.maximum(finite_abs(lo), finite_abs(hi))
    tol = 1e-5 + 1e-5 * np.abs(ref) + edge * 2.4e-7 * (np.abs(GRID) + abs(mean) + 1) / scale
    err = np.abs(log_p - ref)
    assert np.all(err[finite] <= tol[finite]), np.max(err[finite] / tol[finite])


def _point_mass_denoiser(x0, sched, pred_type):
    """Exact prediction for data that is a known point mass x0 (closes over x0)."""
    def denoise(x_t, t):
        ab = sched.alphas_cumprod[t][:, None]
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        return diffusion.from_x0_and_eps(x0, eps, ab, pred_type)
    return denoise


@pytest.mark.parametrize("name,num_timesteps,pred_type", [
    ("linear", 100, "x0"), ("cosine", 100, "eps"), ("linear", 1000, "v"),
])
def test_bits_per_dim_exact_for_point_mass(name, num_timesteps, pred_type):
    """Point-mass data with the exact denoiser: every KL term vanishes, leaving the prior KL and
    the decoder NLL, both closed form: -log(Phi(h / sd) - Phi(-h / sd)), h = 1/255, sd^2 = beta~_1
    (one-sided at the edges +-1)."""
    sched = _sched(name, num_timesteps)
    levels = np.array([0, 1, 64, 128, 254, 255])
    c = levels / 127.5 - 1.0                                               # on the grid
    x0 = jnp.asarray(np.repeat(c[:, None], 2, axis=1), jnp.float32)        # [6, 2]
    bpd = jax.jit(losses.bits_per_dim, static_argnums=(0, 4))(
        _point_mass_denoiser(x0, sched, pred_type), sched, x0, jax.random.PRNGKey(7), pred_type)

    ref = _ref_arrays(sched)
    ab_last = ref["ab"][-1]
    prior = 0.5 * (-1 - np.log(1 - ab_last) + (1 - ab_last) + ab_last * c**2)
    sd = np.sqrt(ref["post_var"][1])
    h = 1 / 255
    interior = -np.log(1 - 2 * stats.norm.cdf(-h / sd))
    edge = -np.log(stats.norm.cdf(h / sd))
    decoder = np.where(np.abs(c) > 0.999, edge, interior)
    np.testing.assert_allclose(np.asarray(bpd), (prior + decoder) / np.log(2), rtol=2e-4,
                               atol=2e-4)


@pytest.mark.parametrize("pred_type", ["x0", "eps", "v"])
def test_vlb_kl_terms_for_gaussian_data(pred_type):
    """t > 0 with the optimal Gaussian denoiser: the mean and the true posterior differ by
    coef1 (x0 - E[x0 | x_t]), so E[L_t] = coef1^2 Var(x0 | x_t) / (2 beta~_t) nats per dim."""
    sched = _sched("linear")
    per_t, steps = 4000, np.array([1, 10, 300, 999])
    t = jnp.asarray(np.repeat(steps, per_t), jnp.int32)
    x0 = _gaussian_data(8, t.shape[0])
    noise = _normal(9, x0.shape)
    terms = jax.jit(losses.vlb_terms, static_argnums=(0, 5))(
        _gaussian_optimal(pred_type, sched), sched, x0, t, noise, pred_type)
    terms = np.asarray(terms, np.float64).reshape(len(steps), per_t) * np.log(2)   # nats
    ref = _ref_arrays(sched)
    for row, step in zip(terms, steps):
        ab = ref["ab"][step]
        var_x0 = S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
        k = ref["coef1"][step] ** 2 * var_x0 / (2 * ref["post_var"][step])     # [D]
        expected, sd = k.mean(), np.sqrt(2 * (k**2).sum()) / 3
        assert row.mean() == pytest.approx(expected, abs=5 * sd / np.sqrt(per_t)), step


def test_bits_per_dim_is_prior_plus_every_term():
    sched = _sched("cosine", 20)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.integers(0, 256, size=(5, 3)) / 127.5 - 1.0, jnp.float32)
    denoise = lambda x_t, t: 0.8 * x_t                   # an imperfect eps-model
    key = jax.random.PRNGKey(10)
    bpd = jax.jit(losses.bits_per_dim, static_argnums=(0, 4))(denoise, sched, x0, key, "eps")
    term = jax.jit(lambda step: losses.vlb_terms(
        denoise, sched, x0, jnp.full((5,), step, jnp.int32),
        jax.random.normal(jax.random.fold_in(key, step), x0.shape), "eps"))
    total = sum(np.asarray(term(step), np.float64) for step in range(20))
    ab_last = _ref_arrays(sched)["ab"][-1]
    c = np.asarray(x0, np.float64)
    prior = 0.5 * (-1 - np.log(1 - ab_last) + (1 - ab_last) + ab_last * c**2).mean(axis=1)
    np.testing.assert_allclose(np.asarray(bpd), total + prior / np.log(2), rtol=1e-5)
