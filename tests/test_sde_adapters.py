"""Tests for diffusion_jax.sde.adapters and diffusion_jax.samplers.continuous (discrete models
driving the continuous samplers)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_oracle as oracle
from diffusion_jax.diffusion import from_x0_and_eps, q_sample
from diffusion_jax.samplers import continuous, dpm_solver, edm, pc, probability_flow
from diffusion_jax.schedules import linear_beta_schedule, make_schedule
from diffusion_jax.sde import adapters, sdes
from test_samplers import _assert_gaussian_moments

SCHED = make_schedule(linear_beta_schedule(1000))
ABAR = np.asarray(SCHED.alphas_cumprod, np.float64)
MU = np.array([1.0, -0.5, 0.3])
COV = np.array([[1.0, 0.3, -0.2], [0.3, 0.5, 0.1], [-0.2, 0.1, 0.25]])


def _exact_model(pred_type):
    """Exact discrete-time model of N(MU, COV) data under SCHED, predicting ``pred_type``."""

    def denoise(x, t):
        alpha_bar = SCHED.alphas_cumprod[t][:, None]
        x0 = oracle.gaussian_x0(x, alpha_bar, MU, COV)
        eps = oracle.gaussian_eps(x, alpha_bar, MU, COV)
        return from_x0_and_eps(x0, eps, alpha_bar, pred_type)

    return denoise


@pytest.mark.parametrize("pred_type", ["eps", "x0", "v"])
def test_ddpm_denoiser_on_the_grid_is_the_models_x0_prediction(pred_type):
    # An arbitrary t-dependent model: D(x, sigma_k) must call it at step k on sqrt(abar_k) x and
    # convert with abar_k (numpy float64 reference).
    model = lambda x, t: 0.3 * x + 1e-3 * t[:, None].astype(jnp.float32) - 0.2
    ks = np.array([0, 17, 500, 998, 999])
    sigma = np.sqrt((1 - ABAR[ks]) / ABAR[ks])
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (5, 3)), np.float64)
    x = x * (1 + sigma[:, None])
    out = adapters.ddpm_denoiser(model, SCHED, pred_type)(jnp.asarray(x, jnp.float32),
                                                         jnp.asarray(sigma, jnp.float32))
    a = ABAR[ks][:, None]
    x_vp = np.sqrt(a) * x
    pred = 0.3 * x_vp + 1e-3 * ks[:, None] - 0.2
    expected = {"eps": (x_vp - np.sqrt(1 - a) * pred) / np.sqrt(a), "x0": pred,
                "v": np.sqrt(a) * x_vp - np.sqrt(1 - a) * pred}[pred_type]
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_nearest_timestep_is_nearest_in_log_sigma():
    log_grid = np.log(np.sqrt((1 - ABAR) / ABAR))
    sigma = np.exp(np.random.default_rng(0).uniform(log_grid[0] - 1, log_grid[-1] + 1, 500))
    ours = np.asarray(adapters.nearest_timestep(SCHED, jnp.asarray(sigma, jnp.float32)))
    brute = np.abs(log_grid[None] - np.log(sigma)[:, None]).argmin(1)
    # Ties within float32 round-off may go either way; otherwise identical.
    gap = np.abs(np.abs(log_grid[ours] - np.log(sigma)) - np.abs(log_grid[brute] - np.log(sigma)))
    assert np.all((ours == brute) | (gap < 1e-5))
    assert ours.min() == 0 and ours.max() == 999


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_score_from_denoiser_is_the_marginal_score(name):
    # Reference: score of N(m MU, m^2 COV + s^2 I) by a float64 linear solve.
    sde = sdes.make_sde(name)
    t = np.array([0.05, 0.3, 0.6, 0.9])
    m, s = (np.asarray(v, np.float64) for v in sdes.marginal_coefficients(sde, t))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 3)), np.float64) * (1 + s[:, None])
    denoiser = lambda x, sigma: x + (sigma**2)[:, None] * oracle.gaussian_score(x, sigma, MU, COV)
    ours = jax.jit(adapters.score_from_denoiser(sde, denoiser))(jnp.asarray(x, jnp.float32), t)
    expected = np.stack([-np.linalg.solve(m[i]**2 * COV + s[i]**2 * np.eye(3), x[i] - m[i] * MU)
                         for i in range(4)])
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_ddpm_score_at_grid_times_is_minus_eps_over_std():
    sde = sdes.VPSDE()
    model = lambda x, t: 0.3 * x + 1e-3 * t[:, None].astype(jnp.float32)
    ks = np.array([5, 250, 900])
    sigma = np.sqrt((1 - ABAR[ks]) / ABAR[ks])
    t = sdes.time_for_sigma(sde, jnp.asarray(sigma, jnp.float32))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 3))
    ours = jax.jit(adapters.ddpm_score(model, SCHED, sde, "eps"))(x, t)
    expected = -np.asarray(model(x, jnp.asarray(ks))) / np.sqrt(1 - ABAR[ks])[:, None]
    np.testing.assert_allclose(ours, expected, rtol=2e-3, atol=1e-4)


def test_dynamic_threshold_closed_form():
    x0 = jnp.array([[0.5, -0.2, 0.9, 0.1], [3.0, -4.0, 0.5, 1.0]])
    out = np.asarray(jax.jit(adapters.dynamic_threshold, static_argnums=1)(x0, 1.0))
    np.testing.assert_allclose(out[0], [0.5, -0.2, 0.9, 0.1], rtol=1e-6)  # s = max(q, 1) = 1
    np.testing.assert_allclose(out[1], [0.75, -1.0, 0.125, 0.25], rtol=1e-6)  # s = 4
    out = np.asarray(jax.jit(adapters.dynamic_threshold, static_argnums=1)(x0, 0.5))
    s = max(np.quantile([3.0, 4.0, 0.5, 1.0], 0.5), 1.0)                     # 2.0
    np.testing.assert_allclose(out[1], np.clip([3.0, -4.0, 0.5, 1.0], -s, s) / s, rtol=1e-6)
    big = 10.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    thr = jax.jit(adapters.thresholded(lambda x, sigma: x, 0.9))(big, jnp.ones(4))
    assert float(jnp.abs(thr).max()) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# The registry functions on the exact discrete model reproduce the data.
# --------------------------------------------------------------------------------------------

def _options(**kw):
    return types.SimpleNamespace(**{"pred_type": "eps", "clip_x0": None, **kw})


_slow = pytest.mark.slow
REGISTRY_CASES = [
    ("edm_heun", edm.edm_heun, _options(num_steps=40)),
    ("dpm_solver_pp", dpm_solver.dpm_solver_pp, _options(num_steps=20)),
    ("pc", pc.predictor_corrector, _options(num_steps=200)),
    ("ode_rk4", probability_flow.probability_flow, _options(num_steps=15)),
    pytest.param("edm_heun_churn_v", edm.edm_heun,
                 _options(num_steps=40, churn=10.0, s_tmin=0.05, s_tmax=5.0, pred_type="v"),
                 marks=_slow),
    pytest.param("dpm_solver_pp3_karras", dpm_solver.dpm_solver_pp,
                 _options(num_steps=20, order=3, sigma_spacing="karras"), marks=_slow),
    pytest.param("pc_ve_ancestral", pc.predictor_corrector,
                 _options(num_steps=200, sde="ve", predictor="ancestral"), marks=_slow),
    pytest.param("ode_tsit5_x0", probability_flow.probability_flow,
                 _options(num_steps=1, method="tsit5", pred_type="x0"), marks=_slow),
]


@pytest.mark.parametrize("case,fn,options", REGISTRY_CASES)
def test_registry_samplers_reproduce_gaussian_data(case, fn, options):
    # 2000 chains, 5 SE of the data's mean and covariance; the start is N(0, I) at t = T - 1.
    # Step counts leave the discretisation bias well inside the tolerance (EDM's Heun at 18
    # Karras steps is still 12% over-dispersed along the first axis here; at 40, 4%).
    sample = jax.jit(lambda x, key: fn(_exact_model(options.pred_type), SCHED, x, key, options))
    x = sample(jax.random.normal(jax.random.PRNGKey(1), (2000, 3)), jax.random.PRNGKey(0))
    _assert_gaussian_moments(x, MU, COV)


@pytest.mark.parametrize("fn", [dpm_solver.dpm_solver_pp, pc.predictor_corrector,
                                pytest.param(edm.edm_heun, marks=_slow),
                                pytest.param(probability_flow.probability_flow, marks=_slow)])
def test_registry_t_start_resumes_from_the_exact_marginal(fn):
    # SDEdit: data noised to t = 300 and resumed from there gives back the data (5 SE).
    t_start, n = 300, 2000
    x0 = oracle.gmm_sample(np.random.default_rng(1), n, [1.0], MU[None], COV[None])[0]
    x_t = q_sample(SCHED, jnp.asarray(x0), jnp.full((n,), t_start),
                   jax.random.normal(jax.random.PRNGKey(3), (n, 3)))
    options = _options(num_steps=100 if fn is pc.predictor_corrector else 10)
    x = jax.jit(lambda x, key: fn(_exact_model("eps"), SCHED, x, key, options,
                                  t_start=t_start))(x_t, jax.random.PRNGKey(0))
    _assert_gaussian_moments(x, MU, COV)


@pytest.mark.parametrize("fn", [dpm_solver.dpm_solver_pp, pc.predictor_corrector,
                                pytest.param(edm.edm_heun, marks=_slow),
                                pytest.param(probability_flow.probability_flow, marks=_slow)])
def test_registry_step_hook_gets_vp_scale_and_discrete_steps(fn):
    # The hook pins coordinate 0 to sqrt(abar_{t_prev}) * 0.7 (a noise-free "known pixel", in
    # VP scale) and records nothing else; after the last step (t_prev = -1) it must read 0.7,
    # and one step before the end the VP-scaled value must have come back unchanged.
    def hook(x_prev, x0_pred, t_prev, key):
        abar = jnp.where(t_prev >= 0, SCHED.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
        return x_prev.at[:, 0].set(jnp.sqrt(abar) * 0.7)

    # pc needs > beta_max = 20 steps (score_sde's VP discretisation); fewer raise.
    options = _options(num_steps=25 if fn is pc.predictor_corrector else 10)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    out = jax.jit(lambda x, key: fn(_exact_model("eps"), SCHED, x, key, options,
                                    step_hook=hook))(x, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out[:, 0], 0.7, rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(out)))


def test_sigma_grid_spacings():
    sigmas = np.asarray(adapters.discrete_sigmas(SCHED))
    np.testing.assert_allclose(continuous.sigma_grid(SCHED, 5, "uniform"),
                               sigmas[[999, 749, 500, 250, 0]], rtol=1e-6)
    karras = np.asarray(continuous.sigma_grid(SCHED, 8, "karras"))
    np.testing.assert_allclose(karras[[0, -1]], sigmas[[999, 0]], rtol=1e-5)
    log = np.asarray(continuous.sigma_grid(SCHED, 6, "log", t_start=400))
    np.testing.assert_allclose(np.diff(np.log(log)), np.log(sigmas[0] / sigmas[400]) / 5,
                               rtol=1e-4)
    vp = adapters.sde_for_schedule(SCHED, "vp")
    np.testing.assert_allclose([vp.beta_min, vp.beta_max], [0.1, 20.0], rtol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: adapters.ddpm_denoiser(None, SCHED, "noise"), "pred_type"),
    (lambda: adapters.ddpm_denoiser(None, SCHED, "eps", clip_x0=(1.0, -1.0)), "clip_x0"),
    (lambda: adapters.dynamic_threshold(jnp.ones((2, 3)), 1.5), "percentile"),
    (lambda: continuous.sigma_grid(SCHED, 5, "cosine"), "sigma_spacing"),
    (lambda: continuous.sigma_grid(SCHED, 0), "num_steps"),
    (lambda: continuous.sigma_grid(SCHED, 5, t_start=1000), "t_start"),
    (lambda: adapters.sde_for_schedule(SCHED, "ode"), "sde"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("fn", [edm.edm_heun, dpm_solver.dpm_solver_pp,
                                pc.predictor_corrector, probability_flow.probability_flow])
def test_registry_samplers_run_on_nhwc_images(fn):
    # Per-pixel i.i.d. N(0.2, 0.3^2) "images" [B, 8, 8, 2] and their exact eps-model: the output
    # keeps the shape and its pixel mean / variance (2048 values) are within 5 SE of the data's.
    mean, var = 0.2, 0.09

    def eps_model(x, t):
        a = SCHED.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * var + 1 - a)

    options = _options(num_steps=100 if fn is pc.predictor_corrector else 20)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 2))
    out = jax.jit(lambda x, key: fn(eps_model, SCHED, x, key, options))(x_T, jax.random.PRNGKey(0))
    assert out.shape == x_T.shape
    values = np.asarray(out, np.float64).ravel()
    n = values.size
    assert abs(values.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(values.var() - var) < 5 * var * np.sqrt(2.0 / n)
