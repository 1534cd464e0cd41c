"""Tests for diffusion_jax.samplers.

The main checks sample many chains with the *exact* denoiser / score of analytic data (a 3-D
Gaussian with full covariance and a 2-D three-component mixture, see ``gaussian_oracle``) and
compare the samples' moments with the data's, with tolerances of 5 standard errors (SE) of the
estimator at the sample size used. Where a sampler has a known deterministic discretisation bias
(few-step DDIM) the samples are compared with the exact law of that discrete chain instead, which
``gaussian_oracle.gaussian_ddim_law`` computes in float64 independently of the library.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_oracle as oracle
from diffusion_jax import denoisers, samplers
from diffusion_jax.diffusion import from_x0_and_eps, q_posterior, q_sample
from diffusion_jax.schedules import linear_beta_schedule, make_schedule
from diffusion_jax.sde.sdes import geometric_sigmas

NUM_CHAINS = 2000
SCHED = make_schedule(linear_beta_schedule(1000))
ALPHAS_CUMPROD = np.asarray(SCHED.alphas_cumprod, np.float64)

# 3-D Gaussian data, full non-isotropic covariance (eigenvalues 0.11, 0.48, 1.16).
MU = np.array([1.0, -0.5, 0.3])
COV = np.array([[1.0, 0.3, -0.2], [0.3, 0.5, 0.1], [-0.2, 0.1, 0.25]])

# 2-D mixture: components >= 3 units apart with std 0.32, so labelling a sample by its most
# probable component errs with probability < 1e-5 (negligible next to the weights' SE).
GMM_WEIGHTS = np.array([0.2, 0.5, 0.3])
GMM_MEANS = np.array([[-2.0, 0.0], [1.0, 1.5], [1.5, -1.5]])
GMM_VAR = 0.1

# Annealed Langevin settings: 10 geometric levels 10 -> 0.01, 100 steps each, step_lr = 1e-4
# (alpha_i / (2 sigma_i^2) = 0.5 at every level). For the Gaussian data the exact law of this
# chain (float64 linear recursion) differs from the data by at most 0.74 SE in any covariance
# entry at 2000 chains. The mixture needs 20 levels to settle its weights.
ALD_STEPS_EACH = 100
ALD_STEP_LR = 1e-4


def _gaussian_denoiser(pred_type="eps", sched=SCHED):
    """Exact denoiser of ``N(MU, COV)`` data under ``sched``, returning ``pred_type``."""

    def denoise(x, t):
        alpha_bar = sched.alphas_cumprod[t][:, None]                       # [B, 1]
        x0 = oracle.gaussian_x0(x, alpha_bar, MU, COV)
        eps = oracle.gaussian_eps(x, alpha_bar, MU, COV)
        return from_x0_and_eps(x0, eps, alpha_bar, pred_type)

    return denoise


def _gmm_denoiser(x, t):
    return oracle.gmm_eps(x, SCHED.alphas_cumprod[t], GMM_WEIGHTS, GMM_MEANS, GMM_VAR)


def _noise(dim, num=NUM_CHAINS, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (num, dim))


def _assert_gaussian_moments(x, mean, cov, extra_cov_tol=0.0):
    """Sample mean / covariance of ``x [N, D]`` within 5 SE of ``(mean, cov)``.

    SE of the mean: ``sqrt(cov_ii / N)``; SE of a Gaussian sample covariance entry:
    ``sqrt((cov_ij^2 + cov_ii cov_jj) / N)``. ``extra_cov_tol`` adds a known deterministic bias.
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    var = np.diag(cov)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / n))
    cov_se = np.sqrt((cov**2 + np.outer(var, var)) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * cov_se + extra_cov_tol)


def _assert_gmm_moments(x):
    """Mixture weights, mean and covariance of ``x [N, 2]`` within 5 SE of the mixture's.

    Weights: a sample's label is its most probable component; SE ``sqrt(w (1 - w) / N)``.
    Mean / covariance: closed form; their SEs are estimated from 200k reference draws (the
    mixture is not Gaussian, so the Gaussian covariance-SE formula does not apply).
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    resp = oracle.gmm_responsibilities(jnp.asarray(x, jnp.float32), GMM_WEIGHTS, GMM_MEANS, GMM_VAR)
    weights = np.bincount(np.asarray(resp).argmax(1), minlength=3) / n
    np.testing.assert_array_less(
        np.abs(weights - GMM_WEIGHTS), 5 * np.sqrt(GMM_WEIGHTS * (1 - GMM_WEIGHTS) / n))
    mean = GMM_WEIGHTS @ GMM_MEANS
    centred_means = GMM_MEANS - mean
    cov = GMM_VAR * np.eye(2) + np.einsum("k,ki,kj->ij", GMM_WEIGHTS, centred_means, centred_means)
    ref, _ = oracle.gmm_sample(np.random.default_rng(0), 200_000, GMM_WEIGHTS, GMM_MEANS, GMM_VAR)
    ref = ref.astype(np.float64) - mean
    cov_se = np.sqrt(np.var(ref[:, :, None] * ref[:, None, :], axis=0) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(np.diag(cov) / n))
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * cov_se)


# --------------------------------------------------------------------------------------------
# The oracle itself (other test modules use it too).
# --------------------------------------------------------------------------------------------


def test_oracle_scores_are_gradients_of_log_densities():
    # Independent reference: jax.grad of the log-density written with jax.scipy, float32 round-off.
    x = 2.0 * _noise(2, num=16)
    sigma, alpha_bar = 0.7, 0.3

    def log_mixture(xi, loc_scale, var_add):
        comps = [jnp.log(w) + jax.scipy.stats.multivariate_normal.logpdf(
            xi, loc_scale * m, loc_scale**2 * GMM_VAR * jnp.eye(2) + var_add * jnp.eye(2))
            for w, m in zip(GMM_WEIGHTS, GMM_MEANS)]
        return jax.scipy.special.logsumexp(jnp.stack(comps))

    ve = jax.jit(jax.vmap(jax.grad(lambda xi: log_mixture(xi, 1.0, sigma**2))))(x)
    score = jax.jit(lambda x: oracle.gmm_score(x, sigma, GMM_WEIGHTS, GMM_MEANS, GMM_VAR))(x)
    np.testing.assert_allclose(score, ve, rtol=1e-4, atol=1e-5)
    vp = jax.jit(jax.vmap(jax.grad(
        lambda xi: log_mixture(xi, np.sqrt(alpha_bar), 1 - alpha_bar))))(x)
    eps = jax.jit(lambda x: oracle.gmm_eps(x, alpha_bar, GMM_WEIGHTS, GMM_MEANS, GMM_VAR))(x)
    np.testing.assert_allclose(eps, -np.sqrt(1 - alpha_bar) * vp, rtol=1e-4, atol=1e-5)
    x0 = jax.jit(lambda x: oracle.gmm_x0(x, alpha_bar, GMM_WEIGHTS, GMM_MEANS, GMM_VAR))(x)
    np.testing.assert_allclose(np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * eps, x,
                               rtol=1e-5, atol=1e-5)
    x3 = _noise(3, num=16)
    c = alpha_bar * COV + (1 - alpha_bar) * np.eye(3)
    expected = np.sqrt(1 - alpha_bar) * np.linalg.solve(
        c, (np.asarray(x3) - np.sqrt(alpha_bar) * MU).T).T
    eps3 = jax.jit(lambda x: oracle.gaussian_eps(x, alpha_bar, MU, COV))(x3)
    np.testing.assert_allclose(eps3, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Exactness on analytic data.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance,pred_type", [("posterior", "eps"), ("beta", "v")])
def test_ddpm_reproduces_gaussian_data(variance, pred_type):
    # 1000 ancestral steps, 5 SE. The chains' own bias at 2000 chains: < 0.5 SE for "posterior"
    # (exact float64 law, gaussian_ddim_law with eta=1 over all steps), < 0.2 SE for "beta"
    # (measured with 100k chains).
    sample = jax.jit(functools.partial(samplers.ddpm_sample, _gaussian_denoiser(pred_type),
                                       variance=variance, pred_type=pred_type))
    x = sample(SCHED, _noise(3), jax.random.PRNGKey(0))
    _assert_gaussian_moments(x, MU, COV)


@pytest.mark.parametrize("num_steps,eta,spacing", [
    (50, 0.0, "uniform"), (50, 0.0, "quadratic"), (100, 1.0, "uniform")])
def test_ddim_matches_exact_law_of_its_chain(num_steps, eta, spacing):
    # Compared with the exact Gaussian law of the same discrete chain (float64), 5 SE.
    sample = jax.jit(functools.partial(samplers.ddim_sample, _gaussian_denoiser("x0"),
                                       num_steps=num_steps, eta=eta, spacing=spacing,
                                       pred_type="x0"))
    x = sample(SCHED, _noise(3), jax.random.PRNGKey(0))
    timesteps = np.asarray(samplers.ddim_timesteps(1000, num_steps, spacing))
    law_mean, law_cov = oracle.gaussian_ddim_law(MU, COV, ALPHAS_CUMPROD, timesteps, eta)
    _assert_gaussian_moments(x, law_mean, law_cov)


def test_ddim_50_steps_reproduces_gaussian_data():
    # vs the data: 5 SE plus the exact discretisation bias of the 50-step deterministic chain
    # (DDIM is under-dispersed: up to 15% lower variance along the smallest eigenvector here).
    num_steps = 50
    sample = jax.jit(functools.partial(samplers.ddim_sample, _gaussian_denoiser("eps"),
                                       num_steps=num_steps))
    x = sample(SCHED, _noise(3), jax.random.PRNGKey(0))
    timesteps = np.asarray(samplers.ddim_timesteps(1000, num_steps))
    _, law_cov = oracle.gaussian_ddim_law(MU, COV, ALPHAS_CUMPROD, timesteps, 0.0)
    _assert_gaussian_moments(x, MU, COV, extra_cov_tol=np.abs(law_cov - COV))
    # The bias itself vanishes with the step count: at 1000 steps it is < 0.2 SE.
    _, law_cov_1000 = oracle.gaussian_ddim_law(
        MU, COV, ALPHAS_CUMPROD, np.asarray(samplers.ddim_timesteps(1000, 1000)), 0.0)
    assert np.abs(law_cov_1000 - COV).max() < 0.1 * np.abs(law_cov - COV).max()


def test_ddim_eta_one_with_all_steps_is_ddpm_posterior():
    # DDIM's sigma at eta=1 between consecutive steps is the posterior std, and its mean equals
    # the posterior mean, so the same key must give the same chain (float32 round-off only).
    # A 100-step schedule keeps it fast; the identity holds for any schedule.
    sched = make_schedule(linear_beta_schedule(100, 1e-3, 0.2))
    denoise = _gaussian_denoiser("eps", sched)
    x_T, key = _noise(3, num=64), jax.random.PRNGKey(3)
    ddim = jax.jit(functools.partial(samplers.ddim_sample, denoise, num_steps=100, eta=1.0))
    ddpm = jax.jit(functools.partial(samplers.ddpm_sample, denoise, variance="posterior"))
    np.testing.assert_allclose(ddim(sched, x_T, key), ddpm(sched, x_T, key), atol=1e-4)


def test_annealed_langevin_reproduces_gaussian_data():
    score = lambda x, sigma: oracle.gaussian_score(x, sigma, MU, COV)
    sigmas = geometric_sigmas(10.0, 0.01, 10)
    sample = jax.jit(functools.partial(samplers.annealed_langevin_sample, score,
                                       n_steps_each=ALD_STEPS_EACH, step_lr=ALD_STEP_LR))
    x = sample(sigmas, 10.0 * _noise(3), jax.random.PRNGKey(0))
    _assert_gaussian_moments(x, MU, COV)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim50", "langevin"])
def test_samplers_reproduce_mixture(sampler):
    key = jax.random.PRNGKey(0)
    if sampler == "ddpm":
        x = jax.jit(functools.partial(samplers.ddpm_sample, _gmm_denoiser))(SCHED, _noise(2), key)
    elif sampler == "ddim50":
        x = jax.jit(functools.partial(samplers.ddim_sample, _gmm_denoiser, num_steps=50))(
            SCHED, _noise(2), key)
    else:
        score = lambda x, sigma: oracle.gmm_score(x, sigma, GMM_WEIGHTS, GMM_MEANS, GMM_VAR)
        sample = jax.jit(functools.partial(samplers.annealed_langevin_sample, score,
                                           n_steps_each=ALD_STEPS_EACH, step_lr=ALD_STEP_LR))
        x = sample(geometric_sigmas(10.0, 0.01, 20), 10.0 * _noise(2), key)
    _assert_gmm_moments(x)


def test_langevin_sample_has_ula_stationary_law():
    # ULA on N(mu, diag(s2)) with step d is stationary at N(mu, s2 / (1 - d / (4 s2))), which is
    # 33% wider than s2 in the first coordinate: the test tells sqrt(d) from sqrt(2 d) noise or a
    # missing 1/2. 300 steps contract the start by (1 - d / (2 s2))^300 < 1e-17. 4000 chains, 5 SE.
    mean, s2, step = np.array([0.5, -1.0]), np.array([0.5, 2.0]), 0.5
    score = lambda x: -(x - mean) / s2
    x = jax.jit(functools.partial(samplers.langevin_sample, score, step_size=step, num_steps=300))(
        _noise(2, num=4000), jax.random.PRNGKey(0))
    stationary_var = s2 / (1 - step / (4 * s2))
    _assert_gaussian_moments(x, mean, np.diag(stationary_var))


# --------------------------------------------------------------------------------------------
# Deterministic DDIM and the probability-flow ODE.
# --------------------------------------------------------------------------------------------


def test_ddim_eta_zero_is_deterministic():
    sample = jax.jit(functools.partial(samplers.ddim_sample, _gaussian_denoiser(), num_steps=20))
    x_T = _noise(3, num=16)
    first = sample(SCHED, x_T, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(first, sample(SCHED, x_T, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(first, sample(SCHED, x_T, jax.random.PRNGKey(7)))


def test_ddim_converges_to_probability_flow_endpoint():
    # For Gaussian data the ODE maps x_T to
    # mu + COV^1/2 (a_T COV + (1 - a_T) I)^-1/2 (x_T - sqrt(a_T) mu).
    # DDIM is first order: each step contracts by cos(angle step), so the error ~ 1/S. Checks:
    # 1000 steps within 1e-2 of the endpoint, and 10x more steps cut the error by > 5x.
    x_T = _noise(3, num=256)
    target = oracle.gaussian_ode_endpoint(x_T, ALPHAS_CUMPROD[-1], MU, COV)
    errors = {}
    for num_steps in (100, 1000):
        sample = functools.partial(samplers.ddim_sample, _gaussian_denoiser(), num_steps=num_steps)
        errors[num_steps] = float(jnp.max(jnp.abs(jax.jit(sample)(SCHED, x_T, jax.random.PRNGKey(0))
                                                  - target)))
    assert errors[1000] < 1e-2, errors
    assert errors[1000] < errors[100] / 5, errors


# --------------------------------------------------------------------------------------------
# One program per sampler; eager and jitted agree.
# --------------------------------------------------------------------------------------------

SMALL_SCHED = make_schedule(linear_beta_schedule(10, 1e-3, 0.2))


def _counting_sampler(name, counter):
    """A sampler bound to a denoiser / score that counts how often its body is traced or run."""

    def denoise(x, t):
        counter[0] += 1
        return 0.5 * x + 0.01 * t[:, None].astype(x.dtype)

    def score(x, sigma):
        counter[0] += 1
        return -x / (1.0 + sigma[:, None] ** 2)

    if name == "ddpm":
        return lambda x, key: samplers.ddpm_sample(denoise, SMALL_SCHED, x, key, variance="beta",
                                                   clip_x0=(-2.0, 2.0))
    if name == "ddim":
        return lambda x, key: samplers.ddim_sample(denoise, SMALL_SCHED, x, key, num_steps=5,
                                                   eta=0.5, pred_type="v")
    if name == "annealed_langevin":
        return lambda x, key: samplers.annealed_langevin_sample(
            score, jnp.array([1.0, 0.5, 0.1]), x, key, n_steps_each=3, step_lr=1e-2)
    return lambda x, key: samplers.langevin_sample(lambda x: score(x, jnp.ones(x.shape[0])), x, key,
                                                   step_size=0.1, num_steps=5)


# Calls of the callable in one eager run; under jit it is traced once per program (the
# annealed sampler calls the score once more, outside its scan, for the final denoising step).
EAGER_CALLS = {"ddpm": 10, "ddim": 5, "annealed_langevin": 10, "langevin": 5}
TRACES = {"ddpm": 1, "ddim": 1, "annealed_langevin": 2, "langevin": 1}


@pytest.mark.parametrize("name", sorted(EAGER_CALLS))
def test_sampler_traces_denoiser_once_and_matches_eager(name):
    x, key = _noise(4, num=8), jax.random.PRNGKey(5)
    jit_count = [0]
    jitted = jax.jit(_counting_sampler(name, jit_count))
    out_jit = jitted(x, key)
    jitted(x, jax.random.PRNGKey(6))
    assert jit_count[0] == TRACES[name]
    eager_count = [0]
    with jax.disable_jit():
        out_eager = _counting_sampler(name, eager_count)(x, key)
    assert eager_count[0] == EAGER_CALLS[name]
    np.testing.assert_allclose(out_eager, out_jit, atol=1e-5, rtol=1e-5)


def test_long_chain_traces_once():
    count = [0]

    def denoise(x, t):
        count[0] += 1
        return oracle.gaussian_eps(x, SCHED.alphas_cumprod[t], MU, COV)

    jax.jit(functools.partial(samplers.ddpm_sample, denoise))(SCHED, _noise(3, num=4),
                                                              jax.random.PRNGKey(0))
    assert count[0] == 1


# --------------------------------------------------------------------------------------------
# Single steps against their equations.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance,clip_x0", [("posterior", None), ("beta", (-1.0, 1.0))])
def test_ddpm_step_is_posterior_mean_plus_noise(variance, clip_x0):
    x_t = 3.0 * _noise(5, num=32)
    key = jax.random.PRNGKey(2)
    x0_of = lambda x, t: 2.0 * x                                            # out of [-1, 1]
    for t in (500, 0):
        x_prev, x0_pred = jax.jit(functools.partial(
            samplers.ddpm_step, x0_of, pred_type="x0", variance=variance, clip_x0=clip_x0))(
                SCHED, x_t, t, key)
        expected_x0 = 2.0 * x_t if clip_x0 is None else jnp.clip(2.0 * x_t, *clip_x0)
        np.testing.assert_allclose(x0_pred, expected_x0, rtol=1e-6)
        mean, _, _ = q_posterior(SCHED, expected_x0, x_t, jnp.full((32,), t))
        var = (SCHED.posterior_variance if variance == "posterior" else SCHED.betas)[t]
        noise = jnp.sqrt(var) * jax.random.normal(key, x_t.shape) if t > 0 else 0.0
        np.testing.assert_allclose(x_prev, mean + noise, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_prev, x0_pred, rtol=1e-6)                 # t = 0: noiseless


# (300, 700, 0.0) is a DDIM-inversion step (t_prev > t), allowed with eta = 0.
@pytest.mark.parametrize("t,t_prev,eta", [(700, 400, 0.0), (700, 400, 0.7), (300, -1, 1.0),
                                          (300, 700, 0.0)])
def test_ddim_step_matches_equation(t, t_prev, eta):
    x_t = _noise(4, num=16)
    key = jax.random.PRNGKey(4)
    eps_of = lambda x, t_b: 0.3 * x + 0.1
    x_prev, x0_pred, eps_pred = jax.jit(functools.partial(samplers.ddim_step, eps_of, eta=eta))(
        SCHED, x_t, t, t_prev, key)
    a = ALPHAS_CUMPROD[t]
    a_prev = ALPHAS_CUMPROD[t_prev] if t_prev >= 0 else 1.0
    x, eps = np.asarray(x_t, np.float64), 0.3 * np.asarray(x_t, np.float64) + 0.1
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = eta * np.sqrt(max((1 - a_prev) / (1 - a) * (1 - a / a_prev), 0.0))
    z = np.asarray(jax.random.normal(key, x_t.shape)) if eta > 0 else 0.0
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    np.testing.assert_allclose(eps_pred, eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x0_pred, x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_prev, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# clip_x0, t_start and step_hook.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_keeps_predictions_in_bounds(sampler):
    lo, hi = -0.5, 0.8
    # The hook replaces each step's output by that step's x0 prediction, so the trajectory is the
    # sequence of predictions; the wild x0 denoiser predicts far outside [lo, hi].
    hook = lambda x_prev, x0_pred, t_prev, key: x0_pred
    wild = lambda x, t: 5.0 * x
    kwargs = dict(pred_type="x0", clip_x0=(lo, hi), step_hook=hook, return_trajectory=True)
    if sampler == "ddpm":
        _, traj = samplers.ddpm_sample(wild, SMALL_SCHED, _noise(3, num=64), jax.random.PRNGKey(0),
                                       **kwargs)
    else:
        _, traj = samplers.ddim_sample(wild, SCHED, _noise(3, num=64), jax.random.PRNGKey(0),
                                       num_steps=10, eta=1.0, **kwargs)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    assert traj.min() >= lo32 and traj.max() <= hi32
    assert traj.min() == lo32 and traj.max() == hi32                        # clipping was active


def test_step_hook_sees_each_t_prev_and_its_edits_persist():
    # The hook writes t_prev into coordinate 0 and zeros coordinate 1.
    def hook(x_prev, x0_pred, t_prev, key):
        return x_prev.at[:, 0].set(t_prev.astype(x_prev.dtype)).at[:, 1].set(0.0)

    x_T = _noise(3, num=4)
    x, traj = samplers.ddpm_sample(_gaussian_denoiser(), SCHED, x_T, jax.random.PRNGKey(0),
                                   t_start=20, step_hook=hook, return_trajectory=True)
    assert traj.shape == (21, 4, 3)
    np.testing.assert_array_equal(traj[:, 0, 0], np.arange(19, -2, -1))
    assert float(jnp.abs(traj[:, :, 1]).max()) == 0.0
    timesteps = samplers.ddim_timesteps(1000, 7, "quadratic")
    x, traj = samplers.ddim_sample(_gaussian_denoiser(), SCHED, x_T, jax.random.PRNGKey(0),
                                   num_steps=7, spacing="quadratic", step_hook=hook,
                                   return_trajectory=True)
    np.testing.assert_array_equal(traj[:, 0, 0], np.append(timesteps[1:], -1))
    np.testing.assert_array_equal(x[:, 1], 0.0)


def test_t_start_resumes_from_the_exact_marginal():
    # SDEdit setting: data noised to t_start=300 is an exact sample of q(x_300), so denoising it
    # with DDPM or with DDIM (30 steps, eta=0) must
    # give back the data: 5 SE, plus for DDIM the exact discretisation bias of its chain.
    t_start = 300
    x0 = oracle.gmm_sample(np.random.default_rng(1), NUM_CHAINS, [1.0], MU[None], COV[None])[0]
    x_t = q_sample(SCHED, jnp.asarray(x0), jnp.full((NUM_CHAINS,), t_start), _noise(3))
    x = jax.jit(functools.partial(samplers.ddpm_sample, _gaussian_denoiser(), t_start=t_start))(
        SCHED, x_t, jax.random.PRNGKey(0))
    _assert_gaussian_moments(x, MU, COV)
    x = jax.jit(functools.partial(samplers.ddim_sample, _gaussian_denoiser(), num_steps=30,
                                  t_start=t_start))(SCHED, x_t, jax.random.PRNGKey(0))
    a = ALPHAS_CUMPROD[t_start]
    _, law_cov = oracle.gaussian_ddim_law(
        MU, COV, ALPHAS_CUMPROD, samplers.ddim_timesteps(1000, 30, t_start=t_start), 0.0,
        start=(np.sqrt(a) * MU, a * COV + (1 - a) * np.eye(3)))
    _assert_gaussian_moments(x, MU, COV, extra_cov_tol=np.abs(law_cov - COV))


def test_t_start_zero_takes_one_step_to_x0_prediction():
    const = jnp.full((4, 3), 0.25)
    x0_const = lambda x, t: const
    out = samplers.ddpm_sample(x0_const, SCHED, _noise(3, num=4), jax.random.PRNGKey(0),
                               pred_type="x0", t_start=0)
    np.testing.assert_allclose(out, const, rtol=1e-6)
    out = samplers.ddim_sample(x0_const, SCHED, _noise(3, num=4), jax.random.PRNGKey(0),
                               pred_type="x0", num_steps=1, t_start=0)
    np.testing.assert_allclose(out, const, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Timestep subsequences.
# --------------------------------------------------------------------------------------------


def test_ddim_timesteps_examples():
    np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 4), [999, 666, 333, 0])
    np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 1), [999])
    np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 1000), np.arange(999, -1, -1))
    np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 3, t_start=100), [100, 50, 0])
    np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 3, "quadratic", t_start=100),
                                  [100, 25, 0])
    # Quadratic spacing is the DDIM repository's (linspace(0, sqrt(0.8 T), S))^2 where that is
    # duplicate-free (here above its 5 smallest entries).
    repo = (np.linspace(0, np.sqrt(0.8 * 1000), 50) ** 2).astype(int)
    ours = samplers.ddim_timesteps(1000, 50, "quadratic")[::-1]
    np.testing.assert_array_equal(ours[5:], repo[5:])


@pytest.mark.parametrize("num_steps", [1, 2, 37, 500, 999, 1000])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("t_start", [None, 999, 640])
def test_ddim_timesteps_are_distinct_descending_and_in_range(num_steps, spacing, t_start):
    top = 999 if t_start is None else t_start
    if num_steps > top + 1:
        pytest.skip("more steps than timesteps")
    ts = np.asarray(samplers.ddim_timesteps(1000, num_steps, spacing, t_start))
    assert ts.shape == (num_steps,) and ts.dtype == np.int32
    assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= top
    if t_start is not None:
        assert ts[0] == t_start
    if num_steps > 1:
        assert ts[-1] == 0


# --------------------------------------------------------------------------------------------
# Argument errors.
# --------------------------------------------------------------------------------------------

_eps = lambda x, t: x


@pytest.mark.parametrize("call,match", [
    (lambda: samplers.ddim_timesteps(1000, 0), "num_steps"),
    (lambda: samplers.ddim_timesteps(1000, 1001), "num_steps"),
    (lambda: samplers.ddim_timesteps(1000, 200, t_start=100), "num_steps"),
    (lambda: samplers.ddim_timesteps(1000, 10, "cosine"), "spacing"),
    (lambda: samplers.ddim_timesteps(1000, 10, t_start=1000), "t_start"),
    (lambda: samplers.ddim_timesteps(1000, 10, t_start=-1), "t_start"),
    (lambda: samplers.ddpm_sample(_eps, SMALL_SCHED, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                  variance="fixedlarge"), "variance"),
    (lambda: samplers.ddpm_sample(_eps, SMALL_SCHED, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                  pred_type="noise"), "pred_type"),
    (lambda: samplers.ddpm_sample(_eps, SMALL_SCHED, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                  clip_x0=(1.0, -1.0)), "clip_x0"),
    (lambda: samplers.ddpm_sample(_eps, SMALL_SCHED, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                  t_start=10), "t_start"),
    (lambda: samplers.ddim_sample(_eps, SMALL_SCHED, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                  num_steps=11), "num_steps"),
    (lambda: samplers.ddim_sample(_eps, SMALL_SCHED, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                  num_steps=5, eta=1.5), "eta"),
    (lambda: samplers.ddim_step(_eps, SMALL_SCHED, jnp.zeros((2, 3)), 5, 4, jax.random.PRNGKey(0),
                                clip_x0=(0.0,)), "clip_x0"),
    (lambda: samplers.annealed_langevin_sample(_eps, jnp.ones((2, 2)), jnp.zeros((2, 3)),
                                               jax.random.PRNGKey(0)), "sigmas"),
    (lambda: samplers.annealed_langevin_sample(_eps, jnp.ones(3), jnp.zeros((2, 3)),
                                               jax.random.PRNGKey(0), n_steps_each=0),
     "n_steps_each"),
    (lambda: samplers.annealed_langevin_sample(_eps, jnp.ones(3), jnp.zeros((2, 3)),
                                               jax.random.PRNGKey(0), step_lr=0.0), "step_lr"),
    (lambda: samplers.langevin_sample(lambda x: x, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                      step_size=-1.0, num_steps=3), "step_size"),
    (lambda: samplers.langevin_sample(lambda x: x, jnp.zeros((2, 3)), jax.random.PRNGKey(0),
                                      step_size=0.1, num_steps=0), "num_steps"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# The registry: one dispatcher, options built once, input checks at trace time.
# --------------------------------------------------------------------------------------------


def _sample_config(**sample):
    """A minimal config with the fields ``options_from_config`` reads."""
    import ml_collections
    fields = dict(num_steps=7, eta=0.25, clip_x0=True, ddpm_variance="beta",
                  langevin_steps_each=3, langevin_step_lr=1e-3)
    fields.update(sample)
    return ml_collections.ConfigDict(dict(sample=fields, diffusion=dict(pred_type="v")))


def test_options_from_config_reads_the_config_once_and_flags_override():
    options = samplers.options_from_config(_sample_config())
    assert options == samplers.SamplerOptions(
        num_steps=7, eta=0.25, spacing="uniform", pred_type="v", clip_x0=(-1.0, 1.0),
        variance="beta", langevin_steps_each=3, langevin_step_lr=1e-3)
    # an unset flag (None) keeps the config's value; a set one wins
    options = samplers.options_from_config(_sample_config(clip_x0=False), num_steps=None, eta=1.0)
    assert (options.num_steps, options.eta, options.clip_x0) == (7, 1.0, None)
    for overrides, match in ((dict(num_steps=0), "num_steps"), (dict(eta=-0.1), "eta"),
                             (dict(spacing="cosine"), "spacing"), (dict(steps=3), "steps")):
        with pytest.raises(ValueError, match=match):
            samplers.options_from_config(_sample_config(), **overrides)


def test_registry_entries_are_the_samplers_with_the_options():
    """run(name, ...) is exactly the sampler called with the options' settings."""
    x, key = _noise(3, num=16), jax.random.PRNGKey(2)
    options = samplers.make_options(num_steps=4, eta=0.5, spacing="quadratic", pred_type="x0",
                                    clip_x0=True, variance="beta")
    denoise = _gaussian_denoiser("x0", SMALL_SCHED)
    run = jax.jit(lambda name, t_start: samplers.run(name, denoise, SMALL_SCHED, x, key, options,
                                                     t_start=t_start), static_argnums=(0, 1))
    want = samplers.ddpm_sample(denoise, SMALL_SCHED, x, key, pred_type="x0", variance="beta",
                                clip_x0=(-1.0, 1.0))
    np.testing.assert_allclose(run("ddpm", None), want, rtol=1e-6, atol=1e-6)
    want = samplers.ddim_sample(denoise, SMALL_SCHED, x, key, num_steps=4, eta=0.5,
                                spacing="quadratic", pred_type="x0", clip_x0=(-1.0, 1.0))
    np.testing.assert_allclose(run("ddim", None), want, rtol=1e-6, atol=1e-6)
    # from t_start = 2 DDIM can take at most 3 steps
    want = samplers.ddim_sample(denoise, SMALL_SCHED, x, key, num_steps=3, eta=0.5,
                                spacing="quadratic", pred_type="x0", clip_x0=(-1.0, 1.0),
                                t_start=2)
    np.testing.assert_allclose(run("ddim", 2), want, rtol=1e-6, atol=1e-6)


def test_registered_langevin_is_annealed_langevin_on_the_exact_ve_score():
    """A VP eps-denoiser seen as the score of y = x_t / sqrt(ab_t): with the exact Gaussian
    denoiser the chain must equal annealed Langevin on the closed-form score of
    N(MU, COV + sigma^2 I) at the levels sigma_l = sqrt((1 - ab_{t_l}) / ab_{t_l})."""
    x, key = _noise(3, num=64), jax.random.PRNGKey(4)
    options = samplers.make_options(num_steps=6, langevin_steps_each=4, langevin_step_lr=1e-3)
    got = jax.jit(lambda o: samplers.run("langevin", _gaussian_denoiser(), SCHED, x, key, o))(
        options)
    ts = np.asarray(samplers.ddim_timesteps(1000, 6))
    sigmas = np.sqrt((1.0 - ALPHAS_CUMPROD[ts]) / ALPHAS_CUMPROD[ts])
    score = lambda y, sigma: oracle.gaussian_score(y, sigma, MU, COV)
    want = jax.jit(lambda s: samplers.annealed_langevin_sample(
        score, s, s[0] * x, key, n_steps_each=4, step_lr=1e-3))(jnp.asarray(sigmas, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert float(jnp.std(got)) > 0.3                          # not collapsed


def test_eta_is_traced_one_program_for_every_eta():
    x, key = _noise(3, num=8), jax.random.PRNGKey(1)
    traces = [0]

    def denoise(x, t):
        traces[0] += 1
        return _gaussian_denoiser()(x, t)

    run = jax.jit(lambda o: samplers.run("ddim", denoise, SCHED, x, key, o))
    outs = [run(samplers.make_options(num_steps=10, eta=eta)) for eta in (0.0, 0.5, 1.0)]
    assert traces[0] == 1
    assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-2     # eta reached the program
    # traced eta = 0 adds exactly zero noise: the deterministic (Python eta) chain
    want = samplers.ddim_sample(_gaussian_denoiser(), SCHED, x, key, num_steps=10, eta=0.0)
    np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-5)


def test_register_adds_a_sampler_in_one_place():
    @samplers.register("test_identity", supports_t_start=False)
    def _identity(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
        return 2.0 * x_start

    try:
        x = jnp.ones((2, 3))
        np.testing.assert_array_equal(
            samplers.run("test_identity", _eps, SMALL_SCHED, x, None, samplers.make_options()),
            2.0 * x)
        with pytest.raises(ValueError, match="already registered"):
            samplers.register("test_identity")(_identity)
        with pytest.raises(ValueError, match="cannot start part-way"):
            samplers.run("test_identity", _eps, SMALL_SCHED, x, None, samplers.make_options(),
                         t_start=3)
    finally:
        del samplers.SAMPLERS["test_identity"]


@pytest.mark.parametrize("x, match", [
    (jnp.zeros((2, 3), jnp.int32), "floating-point"),
    (jnp.zeros(()), "floating-point"),
])
def test_integer_or_rank0_start_is_rejected(x, match):
    for name in ("ddpm", "ddim", "langevin"):
        with pytest.raises(ValueError, match=match):
            samplers.run(name, _eps, SMALL_SCHED, x, jax.random.PRNGKey(0),
                         samplers.make_options(num_steps=3))
    with pytest.raises(ValueError, match=match):
        samplers.ddim_sample(_eps, SMALL_SCHED, x, jax.random.PRNGKey(0), num_steps=3)


@pytest.mark.parametrize("bad", [lambda x, t: x[:1], lambda x, t: x[..., None],
                                 lambda x, t: jnp.zeros(x.shape[1:])])
@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_denoiser_of_the_wrong_shape_fails_at_trace_time(bad, name):
    """Wrong batch or rank would broadcast silently; it is an error under jit too, for every
    registered sampler (edm_heun, dpm_solver_pp, pc and probability_flow broadcast it once)."""
    if samplers.SAMPLERS[name].flow:            # a flow sampler integrates a model's velocity
        bad = denoisers.Denoiser(bad, velocity=bad)
    x = jnp.zeros((4, 3))
    run = jax.jit(lambda x: samplers.run(name, bad, SMALL_SCHED, x, jax.random.PRNGKey(0),
                                         samplers.make_options(num_steps=3)))
    with pytest.raises(ValueError, match=r"returned shape .* for x of shape \(4, 3\)"):
        run(x)


def test_check_finite_names_the_sampler_and_the_samples():
    samplers.check_finite(np.zeros((3, 2)), "ddim")
    bad = np.zeros((4, 2, 2), np.float32)
    bad[1, 0, 0], bad[3, 1, 1] = np.nan, np.inf
    with pytest.raises(FloatingPointError, match=r"'ddim' .* in 2 of 4 samples \(indices \[1, 3\]\)"):
        samplers.check_finite(bad, "ddim")


def test_explicit_ddim_timesteps_reproduce_the_spacing_and_t_start_filters_them():
    x, key = _noise(3, num=8), jax.random.PRNGKey(2)
    ts = [int(t) for t in samplers.ddim_timesteps(SCHED.num_timesteps, 5)]
    pairs = tuple(zip(ts, ts[1:] + [-1]))
    spaced = samplers.run("ddim", _gaussian_denoiser(), SCHED, x, key,
                          samplers.make_options(num_steps=5))
    explicit = samplers.run("ddim", _gaussian_denoiser(), SCHED, x, key,
                            samplers.make_options(timesteps=pairs))
    np.testing.assert_allclose(explicit, spaced, rtol=1e-6, atol=1e-6)
    assert samplers.make_options(timesteps=pairs).num_steps == 5
    # From t_start only the pairs with t <= t_start run: the chain's last two steps.
    tail = samplers.run("ddim", _gaussian_denoiser(), SCHED, x, key,
                        samplers.make_options(timesteps=pairs), t_start=pairs[-2][0])
    want = samplers.ddim_sample(_gaussian_denoiser(), SCHED, x, key, timesteps=pairs[-2:])
    np.testing.assert_allclose(tail, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(tail - spaced).max()) > 1e-2
    for bad in ((), ((3, 5),), ((3, -2),)):
        with pytest.raises(ValueError, match="timesteps"):
            samplers.make_options(timesteps=bad)
