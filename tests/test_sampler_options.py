"""The registry's continuous-time solvers: options from the config and flags, traced settings,
honest evaluation counts and capabilities, dynamic thresholding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_fixtures import micro_config

from diffusion_jax import samplers, schedules
from diffusion_jax.cli import sample as cli

SCHED = schedules.make_schedule(schedules.linear_beta_schedule(100, 1e-3, 0.2))
SDE_SOLVERS = ("edm_heun", "dpm_solver_pp", "pc", "probability_flow")


def _x(batch=3):
    return jax.random.normal(jax.random.PRNGKey(0), (batch, 2, 2, 1))


def test_sde_solvers_are_registered_with_their_capabilities():
    for name in SDE_SOLVERS:
        entry = samplers.SAMPLERS[name]
        assert entry.supports_t_start and entry.supports_step_hook, name
    samplers.check_sampler("probability_flow", t_start=True, step_hook=True)


def test_options_from_config_reads_the_solver_fields_and_flags_override():
    config = micro_config()
    config.sample.churn, config.sample.order, config.sample.sde = 3.0, 3, "ve"
    config.sample.dynamic_threshold, config.sample.method = 0.99, "tsit5"
    options = samplers.options_from_config(config, snr=0.2)
    assert (options.churn, options.order, options.sde, options.snr) == (3.0, 3, "ve", 0.2)
    assert (options.dynamic_threshold, options.method) == (0.99, "tsit5")
    old = micro_config()                      # a config saved before these fields existed
    with old.unlocked():
        del old.sample["churn"]
    assert samplers.options_from_config(old).churn == samplers.SamplerOptions().churn


@pytest.mark.parametrize("field,value", [
    ("order", 4), ("sde", "vpp"), ("predictor", "heun"), ("corrector", "x"), ("method", "rk5"),
    ("sigma_spacing", "cubic"), ("sigma_max", 0.0), ("dynamic_threshold", 1.5), ("churn", -1.0),
    ("snr", 0.0), ("n_corrector_steps", 0), ("sde_eps", 1.0)])
def test_bad_solver_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        samplers.make_options(**{field: value})


def test_float_settings_are_traced_and_do_not_recompile():
    denoise = lambda x, t: 0.3 * x
    run = jax.jit(lambda o, k: samplers.run("edm_heun", denoise, SCHED, _x(), k, o))
    base = samplers.make_options(num_steps=4)
    a = run(base, jax.random.PRNGKey(1))
    b = run(dataclasses.replace(base, churn=40.0, s_noise=1.2), jax.random.PRNGKey(1))
    assert run._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))   # churn injects noise: it is used


@pytest.mark.parametrize("name,extra", [
    ("ddim", {}), ("edm_heun", {}), ("dpm_solver_pp", dict(order=3)),
    ("pc", dict(num_steps=21, n_corrector_steps=2)),
    ("pc", dict(predictor="euler_maruyama", corrector="none")),
    ("probability_flow", dict(method="heun")), ("langevin", dict(langevin_steps_each=2))])
def test_num_evaluations_counts_the_denoiser_calls(name, extra):
    calls = []

    def denoise(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return 0.3 * x

    options = samplers.make_options(**{"num_steps": 5, **extra})
    out = jax.jit(lambda k: samplers.run(name, denoise, SCHED, _x(), k, options))(
        jax.random.PRNGKey(2))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == samplers.num_evaluations(name, options, SCHED.num_timesteps)


def test_pc_below_the_vp_discretisation_limit_is_an_error_not_nan():
    """SCHED's VP SDE has beta_max = T beta_{T-1} = 20: beta_i = beta(t_i) / N >= 1 for N <= 20."""
    denoise = lambda x, t: 0.3 * x
    with pytest.raises(ValueError, match="num_steps > beta_max"):
        samplers.run("pc", denoise, SCHED, _x(), jax.random.PRNGKey(0),
                     samplers.make_options(num_steps=20))
    out = samplers.run("pc", denoise, SCHED, _x(), jax.random.PRNGKey(0),
                       samplers.make_options(num_steps=20, predictor="euler_maruyama",
                                             corrector="none"))
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm_solver_pp", "edm_heun"])
def test_dynamic_threshold_keeps_the_clean_estimate_in_range(name):
    """An x0-predictor overshooting to 4 x: the last x0 (the sample) stays in [-1, 1] with
    thresholding and not without."""
    denoise = lambda x, t: 4.0 * x
    x_t = 3.0 * _x(4)
    options = samplers.make_options(num_steps=3, pred_type="x0")
    run = lambda o: np.asarray(samplers.run(name, denoise, SCHED, x_t, jax.random.PRNGKey(3), o))
    assert np.abs(run(options)).max() > 1.5
    assert np.abs(run(dataclasses.replace(options, dynamic_threshold=0.9))).max() <= 1.0 + 1e-5


def test_sampler_option_flag_parsing():
    parsed = samplers.parse_options(["churn=40", "order=3", "sde=ve", "dynamic_threshold=0.995",
                                        "sigma_spacing=none", "method=tsit5", "sigma_max=80"])
    assert parsed == dict(churn=40.0, order=3, sde="ve", dynamic_threshold=0.995,
                          sigma_spacing=None, method="tsit5", sigma_max=80.0)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        samplers.parse_options(["churn"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        samplers.parse_options(["chrun=3"])
    with pytest.raises(ValueError, match="order expects a value of type int"):
        samplers.parse_options(["order=two"])
    assert jnp.isinf(samplers.make_options(**samplers.parse_options(["s_tmax=inf"])).s_tmax)


def _sample_flags(*argv):
    from absl import flags
    fv = flags.FlagValues()
    cli.define_flags(fv)
    fv(["run_sample.py", *argv])
    return fv


def test_sampler_option_flags_merge_with_steps_and_eta_and_never_set_the_prediction_type():
    """``eta=`` / ``num_steps=`` once raised TypeError; ``pred_type=v`` silently changed what
    a trained model's output was read as; ``clip_x0=none`` kept the config's clipping."""
    config = micro_config()
    options = cli.sampler_options(_sample_flags("--sampler_option=eta=0.5",
                                                "--sampler_option=num_steps=5"), config)
    assert (options.eta, options.num_steps) == (0.5, 5)
    options = cli.sampler_options(_sample_flags("--steps=4", "--eta=0.25"), config)
    assert (options.eta, options.num_steps) == (0.25, 4)
    assert config.sample.clip_x0
    assert cli.sampler_options(_sample_flags("--sampler_option=clip_x0=none"),
                               config).clip_x0 is None
    assert cli.sampler_options(_sample_flags("--sampler_option=clip_x0=-2,2"),
                               config).clip_x0 == (-2.0, 2.0)
    for argv, match in ((["--sampler_option=pred_type=v"], "the checkpoint decides"),
                        (["--sampler_option=timesteps=1"], "use --steps"),
                        (["--steps=4", "--sampler_option=num_steps=5"], "set the same thing"),
                        (["--eta=0.1", "--sampler_option=eta=0.5"], "set the same thing"),
                        (["--sampler_option=clip_x0=wide"], "clip_x0 expects")):
        with pytest.raises(ValueError, match=match):
            cli.sampler_options(_sample_flags(*argv), config)
