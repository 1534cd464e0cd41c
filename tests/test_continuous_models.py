"""Continuous-time models (diffusion.kind vp / subvp / ve / edm): the sampler-facing discrete view
against the Gaussian oracle, training through the train step, and the config's errors."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from training_fixtures import micro_config

import gaussian_oracle as oracle
from diffusion_jax import data, generate, samplers, schedules, sharding, train
from diffusion_jax.sde import parameterization, sdes, training

MEAN = np.array([0.3, -0.5, 1.0, 0.0])
VAR = np.array([0.25, 1.0, 0.04, 0.5])       # data N(MEAN, diag(VAR)), D = 4


def _diffusion_cfg(kind, **overrides):
    cfg = ml_collections.ConfigDict(dict(
        kind=kind, sde_beta_min=0.1, sde_beta_max=20.0, sde_sigma_min=0.01, sde_sigma_max=50.0,
        sde_eps=1e-5, likelihood_weighting=False, edm_sigma_data=0.5, edm_p_mean=-1.2,
        edm_p_std=1.2, pred_type="eps"))
    cfg.update(overrides)
    return cfg


def _exact_net(kind, cfg):
    """The network each kind's loss is minimised by, for N(MEAN, diag(VAR)) data, closed form."""
    if kind == "edm":
        def net(x_in, time):                  # F = (D* - c_skip x) / c_out, x = x_in / c_in
            sigma = jnp.exp(4.0 * time / parameterization.EDM_NOISE_SCALE)
            c_skip, c_out, c_in, _ = training.edm_preconditioning(sigma, cfg.edm_sigma_data)
            x = x_in / c_in[:, None]
            d_star = oracle.gaussian_x0(x / jnp.sqrt(1 + sigma[:, None] ** 2),
                                        1.0 / (1.0 + sigma**2), MEAN, VAR)
            return (d_star - c_skip[:, None] * x) / c_out[:, None]
        return net
    sde = parameterization.sde_of(cfg)

    def net(x, time):                         # eps* = -s(t) score*(x, t)
        m, s = sdes.marginal_coefficients(sde, time / parameterization.VP_TIME_SCALE)
        score = -(x - m[:, None] * MEAN) / (m[:, None] ** 2 * VAR + s[:, None] ** 2)
        return -s[:, None] * score
    return net


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve", "edm"])
def test_discrete_view_of_the_exact_network_is_the_exact_x0(kind):
    """discrete_view(net*) at discrete step t must be E[x0 | x_t] under the VP schedule."""
    cfg = _diffusion_cfg(kind)
    beta_end = 0.0154 if kind == "ve" else 0.02   # VE: keep sigma_T (49.1) inside sigma_max
    sched = schedules.make_schedule(schedules.linear_beta_schedule(1000, 1e-4, beta_end))
    t = jnp.array([0, 3, 40, 250, 600, 999] * 2, jnp.int32)
    x_t = jax.random.normal(jax.random.PRNGKey(0), (t.shape[0], 4)) * 1.5
    got = jax.jit(parameterization.discrete_view(_exact_net(kind, cfg), cfg, sched))(x_t, t)
    want = oracle.gaussian_x0(x_t, sched.alphas_cumprod[t], MEAN, VAR)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)


def test_discrete_view_leaves_discrete_models_alone():
    net = lambda x, t: 2.0 * x
    assert parameterization.discrete_view(net, _diffusion_cfg("discrete"), None) is net


def test_training_loss_buckets_follow_the_noise_level():
    """SDE kinds: t_int = floor(T t); the loss of the exact net is below that of a wrong one."""
    cfg = _diffusion_cfg("vp")
    x0 = jnp.asarray(MEAN + np.sqrt(VAR) * np.random.default_rng(1).standard_normal((512, 4)),
                     jnp.float32)
    key = jax.random.PRNGKey(3)
    loss, per_example, t = parameterization.training_loss(_exact_net("vp", cfg), cfg, x0, key, 100)
    _, _, t_cont = training.continuous_dsm_loss(lambda x, s: x, sdes.VPSDE(), x0, key, eps=1e-5)
    np.testing.assert_array_equal(np.asarray(t), np.floor(100 * np.asarray(t_cont)))
    assert per_example.shape == (512,) and t.dtype == jnp.int32
    wrong = lambda x, time: 1.3 * _exact_net("vp", cfg)(x, time)
    assert float(parameterization.training_loss(wrong, cfg, x0, key, 100)[0]) > float(loss)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="diffusion.kind"):
        parameterization.kind_of(_diffusion_cfg("bogus"))
    config = micro_config()
    config.diffusion.kind = "vp"                          # time_input still "discrete"
    tx = train.make_optimizer(config)
    with pytest.raises(ValueError, match="model.time_input"):
        train.make_train_step(None, schedules.schedule_from_config(config.diffusion), tx, config)
    config.diffusion.kind, config.model.time_input = "discrete", "continuous"
    with pytest.raises(ValueError, match="model.time_input"):
        train.make_train_step(None, schedules.schedule_from_config(config.diffusion), tx, config)


@pytest.mark.parametrize("kind", ["vp", pytest.param("edm", marks=pytest.mark.slow)])
def test_continuous_model_trains_and_samples(kind):
    """A tiny continuous model: 30 train steps lower the loss; then DPM-Solver++(1) on the
    uniform grid equals DDIM (the same first-order update) through generate.make_sample_fn."""
    config = micro_config()
    config.diffusion.kind, config.model.time_input = kind, "continuous"
    config.model.dropout = 0.0
    built = train.build(config)
    mesh, graphdef, sched = built.mesh, built.graphdef, built.schedule
    state, step_fn = built.init_state(config), built.step_fn
    images, labels = data.load_eval_images(config.data, 16)
    batch = sharding.shard_batch({"image": images, "label": labels}, mesh)
    losses = []
    for _ in range(30):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses

    options = samplers.options_from_config(config, num_steps=4)
    assert options.pred_type == "x0"
    dpm = dataclasses.replace(options, order=1, sigma_spacing="uniform")
    out = {}
    for name, opts in (("ddim", options), ("dpm_solver_pp", dpm)):
        fn = generate.make_sample_fn(graphdef, sched, config, mesh, num_samples=8, sampler=name,
                                     options=dataclasses.replace(opts, clip_x0=None))
        out[name] = fn(state.params, jax.random.key(0))
    np.testing.assert_allclose(out["ddim"], out["dpm_solver_pp"], rtol=1e-3, atol=1e-3)
