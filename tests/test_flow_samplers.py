"""The flow samplers (flow_euler, flow_heun, flow_dpm_solver) and flow models in the registry.

Checked against diffusers 0.42's ``FlowMatchEulerDiscreteScheduler`` /
``FlowMatchHeunDiscreteScheduler`` (grids and whole chains), and against the exact velocity of
the 2-D mixture of ``test_samplers.py``: every flow sampler, and the other samplers through
the flow model's discrete x0 view, reproduce the mixture; the probability-flow ODE likelihood
of the flow model equals the mixture's exact log-density.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

import gaussian_oracle as oracle
from diffusion_jax import denoisers, likelihood_eval, samplers
from diffusion_jax.samplers import _flow, flow_dpm_solver
from diffusion_jax.schedules import linear_beta_schedule, make_schedule
from diffusion_jax.sde import flow, likelihood, parameterization, sdes
from test_samplers import GMM_MEANS, GMM_VAR, GMM_WEIGHTS, _assert_gmm_moments

NUM_CHAINS = 2000
SCHED = make_schedule(linear_beta_schedule(1000))

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def gmm_velocity(x, t):
    """Exact ``E[eps - x0 | x_t = x]`` of the mixture: component ``k`` gives ``x_t ~
    N((1 - t) mu_k, V I)``, ``V = (1 - t)^2 var + t^2``, ``E[x0 | x, k] = mu_k + (1 - t) var / V
    (x - (1 - t) mu_k)``, ``E[eps | x, k] = t / V (x - (1 - t) mu_k)``; finite at ``t = 1``."""
    t = jnp.reshape(t, (-1, 1, 1))
    var = (1 - t) ** 2 * GMM_VAR + t**2                                    # [B, 1, 1]
    d = x[:, None, :] - (1 - t) * GMM_MEANS[None]                          # [B, K, 2]
    logits = jnp.log(GMM_WEIGHTS)[None] - jnp.sum(d**2, -1) / (2 * var[:, :, 0])
    resp = jax.nn.softmax(logits, axis=1)[..., None]                       # [B, K, 1]
    v_k = t / var * d - (GMM_MEANS[None] + (1 - t) * GMM_VAR / var * d)
    return jnp.sum(resp * v_k, axis=1)


def flow_config():
    return ml_collections.ConfigDict(dict(kind="flow", pred_type="eps"))


def flow_denoiser():
    """The exact mixture flow model as ``build_denoiser`` makes it (network time 1000 t)."""
    net = lambda x, time: gmm_velocity(x, time / flow.TIME_SCALE)
    return denoisers.parameterize(net, diffusion=flow_config(), schedule=SCHED)


def _prior(num=NUM_CHAINS, dim=2):
    return jax.random.normal(jax.random.PRNGKey(1), (num, dim))


def test_the_mixture_velocity_is_the_score_through_the_conversion():
    x = _prior(64)
    for t in (0.05, 0.4, 0.9):
        tt = jnp.full((64,), t)
        sigma = t / (1 - t)
        score = oracle.gmm_score(x / (1 - t), jnp.full((64,), sigma), GMM_WEIGHTS, GMM_MEANS,
                                 GMM_VAR) / (1 - t)
        np.testing.assert_allclose(gmm_velocity(x, tt), flow.velocity_from_score(x, score, tt),
                                   rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- diffusers

def _euler_scheduler(**config):
    return diffusers.FlowMatchEulerDiscreteScheduler(**config)


def _settings(**fields):
    return samplers.make_options(**fields)


@pytest.mark.parametrize("steps,config,shape", [
    (10, {}, (1, 8, 8, 4)),
    (28, dict(shift=3.0), (1, 8, 8, 4)),
    (7, dict(shift=0.5), (1, 8, 8, 4)),
    (20, dict(use_dynamic_shifting=True), (1, 64, 64, 16)),
    (20, dict(use_dynamic_shifting=True), (1, 128, 128, 16)),
    (4, dict(use_dynamic_shifting=True, base_shift=0.3, max_shift=2.0, base_image_seq_len=64,
             max_image_seq_len=2048), (1, 48, 32, 16)),
])
def test_euler_grid_equals_diffusers(steps, config, shape):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    scheduler = _euler_scheduler(**config)
    mu = None
    if config.get("use_dynamic_shifting"):
        s = scheduler.config
        mu = calculate_shift((shape[1] // 2) * (shape[2] // 2), s.base_image_seq_len,
                             s.max_image_seq_len, s.base_shift, s.max_shift)
    scheduler.set_timesteps(steps, mu=mu)
    sigmas = _flow.flow_grid(_settings(num_steps=steps, **config), shape)
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_flow.FLOW_TRAIN_TIMESTEPS * sigmas[:-1],
                               scheduler.timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("steps,shift", [(10, 1.0), (25, 3.0)])
def test_heun_grid_equals_diffusers(steps, shift):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = np.asarray(_flow.flow_grid(_settings(num_steps=steps, shift=shift), (1, 4)))
    # diffusers interleaves the corrector's evaluations: [t0, t1, t1, ..., t_{N-1}, t_{N-1}].
    np.testing.assert_allclose(sigmas[:1].tolist() + np.repeat(sigmas[1:-1], 2).tolist(),
                               scheduler.timesteps.numpy() / 1000, rtol=1e-6)
    assert samplers.num_evaluations("flow_heun", _settings(num_steps=steps)) == \
        len(scheduler.timesteps)


def _velocity(xp, x, t):
    """A nonlinear velocity field written for numpy-like ``xp`` (torch or jax.numpy)."""
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return xp.sin(2.0 * x) * t - 0.7 * x * (1.0 - t) + 0.3 * t * t


def _diffusers_chain(scheduler, x):
    sample = torch.from_numpy(np.array(x))
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).reshape(1).expand(sample.shape[0])
        sample = scheduler.step(_velocity(torch, sample, t), timestep, sample).prev_sample
    return sample.numpy()


@pytest.mark.parametrize("name,make,config", [
    ("flow_euler", diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    ("flow_euler", diffusers.FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True)),
    ("flow_heun", diffusers.FlowMatchHeunDiscreteScheduler, dict(shift=2.0)),
])
def test_chain_equals_diffusers_step_loop(name, make, config):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    steps = 12
    scheduler = make(**config)
    mu = flow.dynamic_shift_mu(64) if config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    ref = _diffusers_chain(scheduler, x)
    denoise = denoisers.Denoiser(lambda x, t: x, "x0", "flow",
                                 velocity=functools.partial(_velocity, jnp))
    ours = samplers.run(name, denoise, SCHED, x, jax.random.PRNGKey(0),
                        _settings(num_steps=steps, **config))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# ------------------------------------------------------------------------------------ oracles

@pytest.mark.parametrize("name,steps", [("flow_euler", 200), ("flow_heun", 25),
                                        ("flow_dpm_solver", 25)])
def test_flow_samplers_reproduce_mixture(name, steps):
    run = jax.jit(lambda x: samplers.run(name, flow_denoiser(), SCHED, x, jax.random.PRNGKey(0),
                                         _settings(num_steps=steps)))
    _assert_gmm_moments(run(_prior()))


@pytest.mark.parametrize("name,fields", [
    ("ddim", dict(num_steps=100)),
    ("dpm_solver_pp", dict(num_steps=25)),
    ("edm_heun", dict(num_steps=25, sigma_max=80.0)),
    ("probability_flow", dict(num_steps=100)),
])
def test_other_samplers_run_a_flow_model_through_its_x0_view(name, fields):
    run = jax.jit(lambda x: samplers.run(name, flow_denoiser(), SCHED, x, jax.random.PRNGKey(0),
                                         _settings(**fields)))
    _assert_gmm_moments(run(_prior()))


def test_discrete_view_is_the_exact_posterior_mean():
    """The flow model on the VP steps is the mixture's exact E[x0 | x_t] (gmm_x0)."""
    denoise = flow_denoiser()
    x, t = _prior(64), jnp.arange(0, 1000, 1000 // 64, dtype=jnp.int32)[:64]
    ref = oracle.gmm_x0(x, SCHED.alphas_cumprod[t], GMM_WEIGHTS, GMM_MEANS, GMM_VAR)
    np.testing.assert_allclose(denoise(x, t), ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("shift,steps", [(3.0, 12), (1.0, 20)])
def test_flow_dpm_solver_equals_diffusers_multistep_on_its_grid(shift, steps):
    """DPM-Solver++(2M) in flow time is diffusers' ``DPMSolverMultistepScheduler`` with
    ``use_flow_sigmas`` (flow prediction, ``final_sigmas_type="zero"``) on that scheduler's
    grid (which starts at ``shift(1 - 1/T)``, not 1)."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
        solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    sample = torch.from_numpy(np.array(x))
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].reshape(1).expand(sample.shape[0])
        sample = scheduler.step(_velocity(torch, sample, t), timestep, sample).prev_sample
    ours = flow_dpm_solver.flow_dpm_solver_sample(functools.partial(_velocity, jnp),
                                                  jnp.asarray(scheduler.sigmas.numpy()), x)
    np.testing.assert_allclose(ours, sample.numpy(), atol=1e-5)


def _mixture_log_density(x, sde, t):
    """log q_t(x) of the mixture under ``sde``'s marginal at time ``t`` (float64)."""
    m, s = (float(v) for v in sdes.marginal_coefficients(sde, jnp.float32(t)))
    var = m**2 * GMM_VAR + s**2
    d = np.asarray(x, np.float64)[:, None, :] - m * GMM_MEANS[None]
    return logsumexp(np.log(GMM_WEIGHTS)[None] - np.sum(d**2, -1) / (2 * var)
                     - np.log(2 * np.pi * var), axis=1)


def test_ode_likelihood_of_the_flow_model_is_the_exact_log_density():
    """The exact velocity, as a score of the VP SDE through the EDM conversion, in the
    probability-flow ODE: ``log N(z; 0, I) + int div`` is ``log q_eps(x)`` once the prior's
    term is replaced by the true marginal at ``t = 1`` (the VP prior misses the mixture's
    shrunken means by ~1e-2 nats; the flow itself is exact)."""
    sde, eps = sdes.VPSDE(), 1e-5
    score = parameterization.score_of_velocity(gmm_velocity, sde)
    x = jnp.asarray(oracle.gmm_sample(np.random.default_rng(0), 8, GMM_WEIGHTS, GMM_MEANS,
                                      GMM_VAR)[0])
    run = jax.jit(functools.partial(likelihood.ode_log_likelihood, score, sde, trace="exact",
                                    method="tsit5", rtol=1e-6, atol=1e-6, eps=eps))
    log_p, z = run(x, jax.random.PRNGKey(0))
    log_p = (np.asarray(log_p, np.float64) - np.asarray(sdes.prior_logp(sde, z))
             + _mixture_log_density(z, sde, 1.0))
    np.testing.assert_allclose(log_p, _mixture_log_density(x, sde, eps), atol=1e-3)


def test_likelihood_eval_scores_a_flow_model_exactly():
    """run_eval's bits/dim reads a flow network through its exact conversion: the score of the
    schedule's VP SDE equals the mixture's exact score (off the discrete grid too)."""
    config = ml_collections.ConfigDict({"diffusion": flow_config()})
    net = lambda x, time: gmm_velocity(x, time / flow.TIME_SCALE)
    sde, score = likelihood_eval.model_score(net, config, SCHED)
    x, t = _prior(16), jnp.linspace(0.013, 0.97, 16)
    m, s = sdes.marginal_coefficients(sde, t)
    exact = oracle.gmm_score(x / m[:, None], s / m, GMM_WEIGHTS, GMM_MEANS, GMM_VAR) / m[:, None]
    np.testing.assert_allclose(score(x, t), exact, rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------- bad input

def test_flow_sampler_refuses_a_non_flow_model():
    eps_model = denoisers.Denoiser(lambda x, t: x, "eps")
    with pytest.raises(ValueError, match=r"sampler 'flow_heun' runs flow-matching models "
                                         r"\(diffusion.kind='flow'\); this is a discrete-time "
                                         r"model predicting eps"):
        samplers.run("flow_heun", eps_model, SCHED, _prior(4), None, _settings(num_steps=3))


def test_wrapping_a_flow_denoiser_drops_its_velocity():
    wrapped = flow_denoiser().wrap(lambda x, t: x)
    with pytest.raises(ValueError, match="runs flow-matching models"):
        samplers.run("flow_euler", wrapped, SCHED, _prior(4), None, _settings(num_steps=3))


@pytest.mark.parametrize("fields,match", [
    (dict(shift=0.0), "shift must be > 0"),
    (dict(max_image_seq_len=100), r"max_image_seq_len \(100\) must be > base_image_seq_len"),
    (dict(image_seq_len=0), "image_seq_len must be an integer >= 1"),
])
def test_bad_grid_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        _settings(**fields)


def test_dynamic_shifting_of_non_images_needs_the_token_count():
    with pytest.raises(ValueError, match="use_dynamic_shifting needs image_seq_len"):
        samplers.run("flow_euler", flow_denoiser(), SCHED, _prior(4), None,
                     _settings(num_steps=3, use_dynamic_shifting=True))
    x = samplers.run("flow_euler", flow_denoiser(), SCHED, _prior(4), None,
                     _settings(num_steps=3, use_dynamic_shifting=True, image_seq_len=1024))
    assert np.all(np.isfinite(x))


def test_flow_samplers_cannot_start_part_way():
    with pytest.raises(ValueError, match="sampler 'flow_euler' cannot start part-way"):
        samplers.run("flow_euler", flow_denoiser(), SCHED, _prior(4), None,
                     _settings(num_steps=3), t_start=500)
