"""The samplers package's registry: each entry owns its options, defaults and evaluation count;
an option of another sampler is refused; a new sampler is one new file."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import pytest
from absl import flags
from training_fixtures import REPO, micro_config, subprocess_env

from configs import default
from diffusion_jax import denoisers, pipelines, samplers, schedules
from diffusion_jax.cli import sample as cli
from diffusion_jax.samplers import options as options_lib
from diffusion_jax.samplers import registry

SCHED = schedules.make_schedule(schedules.linear_beta_schedule(100, 1e-3, 0.2))
# config.sample keys that are not sampler settings, and the settings it overrides on purpose
# (models trained here sample with 100 steps, clipping and the beta variance).
NOT_OPTIONS = {"sampler", "num_samples", "guidance_scale"}
OVERRIDES = {"num_steps": 100, "clip_x0": True, "ddpm_variance": "beta"}


# ------------------------------------------------------------------ options of another sampler

@pytest.mark.parametrize("name,field,users", [
    ("ddim", "churn", ["edm_heun"]), ("edm_heun", "eta", ["ddim"]),
    ("dpm_solver_pp", "method", ["probability_flow"]), ("ddpm", "num_steps", None),
    ("pc", "sigma_max", ["edm_heun", "dpm_solver_pp", "probability_flow"]),
    ("langevin", "dynamic_threshold", ["ddpm", "ddim", "edm_heun", "dpm_solver_pp"])])
def test_an_option_of_another_sampler_is_refused_naming_it_and_its_samplers(name, field, users):
    with pytest.raises(ValueError) as err:
        samplers.check_options(name, {field: 1})
    message = str(err.value)
    assert f"{field!r}" in message and f"{name!r}" in message and "\n" not in message
    assert str(users or [n for n in samplers.SAMPLERS if n != "ddpm"]) in message


def test_each_sampler_accepts_exactly_the_fields_it_declares():
    for name, entry in samplers.SAMPLERS.items():
        samplers.check_options(name, entry.fields)
        assert {"pred_type", "clip_x0"} <= entry.fields
        declared = {f.name for f in dataclasses.fields(entry.options)} | {"pred_type", "clip_x0"}
        assert entry.fields == declared, name
    every = set().union(*(e.fields for e in samplers.SAMPLERS.values()))
    assert every == {f.name for f in dataclasses.fields(samplers.SamplerOptions)}


def _sample_flags(*argv):
    fv = flags.FlagValues()
    cli.define_flags(fv)
    fv(["run_sample.py", *argv])
    return fv


@pytest.mark.parametrize("argv,match", [
    (["--sampler=ddim", "--sampler_option=churn=40"], r"'churn' .*'ddim'.*\['edm_heun'\]"),
    (["--sampler=ddpm", "--steps=10"], r"'num_steps' .*'ddpm'"),
    (["--sampler=ddpm", "--eta=0.5"], r"'eta' .*'ddpm'.*\['ddim'\]"),
    (["--sampler=edm_heun", "--sampler_option=order=3"], r"'order' .*\['dpm_solver_pp'\]"),
    (["--task=sdedit", "--sampler=pc", "--sampler_option=rtol=0.1"], r"'rtol'")])
def test_cli_refuses_an_option_of_another_sampler_before_sampling(argv, match):
    with pytest.raises(ValueError, match=match):
        cli.check_flags(_sample_flags(*argv), micro_config())


def test_cli_accepts_the_chosen_samplers_options_and_the_inversion_steps():
    config = micro_config()
    for argv in (["--sampler=edm_heun", "--sampler_option=churn=40", "--steps=3"],
                 ["--sampler=ddim", "--eta=0.5", "--sampler_option=dynamic_threshold=0.9"],
                 ["--task=invert", "--steps=4"]):
        cli.check_flags(_sample_flags(*argv), config)
    config.sample.sampler = "ddpm"                 # config.sample holds every sampler's values
    config.sample.churn = 40.0
    cli.check_flags(_sample_flags(), config)


def test_pipeline_option_overrides_of_another_sampler_are_refused():
    """text_to_image / img2img / inpaint build their options with pipelines.sampler_options."""
    pipe = types.SimpleNamespace(options=samplers.make_options(num_steps=10),
                                 ddim_timesteps=None, sampler="ddim", sampler_fields=())
    with pytest.raises(ValueError, match=r"'churn' .*'ddim'"):
        pipelines.sampler_options(pipe, sampler="ddim", overrides={"churn": 40.0})
    options = pipelines.sampler_options(pipe, sampler="edm_heun", num_steps=5,
                                        overrides={"churn": 40.0})
    assert (options.churn, options.num_steps) == (40.0, 5)


def test_web_app_refuses_an_option_of_another_sampler_and_compare_shares_the_box():
    from diffusion_jax.app import handlers
    engine = types.SimpleNamespace(samplers_for=lambda task: list(samplers.SAMPLERS),
                                   evaluations=lambda request: 1)
    settings = handlers.Settings(sampler="ddim", options_text="churn=40")
    with pytest.raises(handlers.InputError, match=r"'churn' .*'ddim'.*\['edm_heun'\]"):
        handlers._request(engine, settings, "sample")
    request = handlers._request(engine, settings, "sample", compared=["ddim", "edm_heun"])
    assert request.sampler_options == ()
    heun = dataclasses.replace(settings, sampler="edm_heun")
    request = handlers._request(engine, heun, "sample", compared=["ddim", "edm_heun"])
    assert request.sampler_options == (("churn", 40.0),)
    with pytest.raises(handlers.InputError, match=r"'order'"):
        handlers._request(engine, dataclasses.replace(heun, options_text="order=3"), "sample",
                          compared=["ddim", "edm_heun"])
    assert "churn=0.0" in handlers.sampler_help("edm_heun")
    assert "num_steps" not in handlers.sampler_help("edm_heun")


@pytest.mark.slow
def test_run_sample_exits_1_with_one_line_for_an_option_of_another_sampler(tmp_path):
    workdir, out = str(tmp_path / "w"), str(tmp_path / "out")
    run = lambda script, *args: subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=subprocess_env(),
        capture_output=True, text=True, timeout=600)
    proc = run("run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
               "--config.train.num_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("run_sample.py", f"--workdir={workdir}", f"--out={out}", "--sampler=ddim",
               "--sampler_option=churn=40")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run_sample.py: error: ") and "'churn'" in last, proc.stderr
    assert "edm_heun" in last and "Traceback" not in proc.stderr and not os.path.exists(out)


# ----------------------------------------------------------------------------- evaluations

@pytest.mark.parametrize("name,fields,expected", [
    ("ddpm", {}, SCHED.num_timesteps), ("ddim", {}, 7), ("dpm_solver_pp", dict(order=3), 7),
    ("edm_heun", {}, 13), ("langevin", dict(langevin_steps_each=3), 22),
    ("pc", {}, 14), ("pc", dict(n_corrector_steps=3), 28), ("pc", dict(corrector="none"), 7),
    ("probability_flow", dict(method="euler"), 8), ("probability_flow", dict(method="heun"), 15),
    ("probability_flow", {}, 29), ("probability_flow", dict(method="tsit5"), None)])
def test_each_entry_counts_its_evaluations(name, fields, expected):
    options = samplers.make_options(num_steps=7, **fields)
    assert samplers.num_evaluations(name, options, SCHED.num_timesteps) == expected


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_each_entrys_count_is_the_number_of_denoiser_calls(name):
    calls = []

    def denoise(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return 0.3 * x

    if samplers.SAMPLERS[name].flow:            # a flow sampler integrates a model's velocity
        denoise = denoisers.Denoiser(denoise, velocity=denoise)
    options = samplers.make_options(num_steps=30 if name == "pc" else 4,
                                    predictor="euler_maruyama", corrector="langevin")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 1))
    out = jax.jit(lambda k: samplers.run(name, denoise, SCHED, x, k, options))(
        jax.random.PRNGKey(1))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == samplers.num_evaluations(name, options, SCHED.num_timesteps)


# ------------------------------------------------------------------- defaults in one place

def test_an_empty_config_sample_override_runs_with_the_dataclass_defaults():
    """config.sample holding only the entries' own defaults (what configs/default.py writes for
    every key it does not override) gives SamplerOptions() exactly."""
    config = micro_config()
    with config.unlocked():
        for key, (value, _) in samplers.config_defaults().items():
            config.sample[key] = value
    assert samplers.options_from_config(config) == samplers.make_options(
        pred_type=config.diffusion.pred_type)
    assert samplers.make_options() == samplers.SamplerOptions()
    with config.unlocked():                       # a config without any of the keys
        for key in samplers.config_defaults():
            del config.sample[key]
    assert samplers.options_from_config(config) == samplers.make_options(
        pred_type=config.diffusion.pred_type)


def test_the_default_config_repeats_the_defaults_and_overrides_only_three():
    sample = default.get_config().sample.to_dict()
    defaults = {key: value for key, (value, _) in samplers.config_defaults().items()}
    assert set(sample) == set(defaults) | NOT_OPTIONS
    differ = {k: sample[k] for k in defaults if sample[k] != defaults[k]}
    assert differ == OVERRIDES
    # Today's behaviour, kept: runs from a config use the beta variance, bare options the
    # posterior one.
    assert samplers.options_from_config(default.get_config()).variance == "beta"
    assert samplers.SamplerOptions().variance == "posterior"


def test_a_setting_is_declared_once_and_traced_settings_are_leaves(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Again:
        churn: float = options_lib.option(1.0, "a second declaration of churn.")

    entry = registry.SamplerEntry(lambda *a, **k: None, True, True, Again, None,
                                  frozenset({"churn"}))
    monkeypatch.setattr(registry, "SAMPLERS", {**registry.SAMPLERS, "again": entry})
    with pytest.raises(ValueError, match="'churn' is declared twice"):
        registry.compose()
    leaves = jax.tree.leaves(samplers.make_options())
    assert len(leaves) == len(samplers.TRACED_FIELDS) == 10
    assert all(isinstance(v, float) for v in leaves)


# ---------------------------------------------------------------- a sampler is one new file

EULER = '''
"""Euler steps of the probability-flow ODE in sigma (a test's new sampler)."""
import dataclasses

import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import check_non_negative
from diffusion_jax.samplers.continuous import SigmaGridOptions, denoiser_setup, vp_hook
from diffusion_jax.samplers.options import option, read
from diffusion_jax.samplers.registry import register


@dataclasses.dataclass(frozen=True)
class EulerOptions(SigmaGridOptions):
    euler_scale: float = option(1.0, "slope scale.", check=check_non_negative, traced=True)


@register("sigma_euler", options=EulerOptions, supports_step_hook=False)
def sigma_euler(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    settings = read(EulerOptions, options)
    denoiser, sigmas, x = denoiser_setup(denoise, schedule, x_start, options, settings,
                                         t_start, "karras")
    nexts = jnp.concatenate([sigmas[1:], jnp.zeros(1)])

    def body(x, s):
        sigma, sigma_next = s
        d = (x - denoiser(x, jnp.full(x.shape[:1], sigma))) / sigma
        return x + settings.euler_scale * (sigma_next - sigma) * d, None

    x, _ = chain.scan(body, x, (sigmas, nexts), levels=sigmas, level_name="sigma")
    return x
'''

PROBE = '''
import jax, numpy as np
from configs import default
from diffusion_jax import samplers, schedules
assert "sigma_euler" in samplers.SAMPLERS, list(samplers.SAMPLERS)
options = samplers.make_options(num_steps=4, euler_scale=0.5)
sched = schedules.make_schedule(schedules.linear_beta_schedule(100, 1e-3, 0.2))
x = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
out = samplers.run("sigma_euler", lambda x, t: 0.3 * x, sched, x, jax.random.PRNGKey(1), options)
assert np.all(np.isfinite(np.asarray(out)))
assert samplers.num_evaluations("sigma_euler", options, 100) == 4
try:
    samplers.check_options("ddim", ["euler_scale"])
except ValueError as err:
    assert "['sigma_euler']" in str(err), err
else:
    raise AssertionError("ddim accepted euler_scale")
config = default.get_config()
with config.unlocked():
    config.sample.euler_scale = 0.25
assert samplers.options_from_config(config).euler_scale == 0.25
print("ok")
'''


@pytest.mark.slow
def test_a_new_sampler_is_one_new_file(tmp_path):
    """A copy of the package with one file added: registered, its option composed into
    SamplerOptions, counted, refused for another sampler and read from the config."""
    shutil.copytree(os.path.join(REPO, "diffusion_jax"), tmp_path / "diffusion_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "diffusion_jax" / "samplers" / "sigma_euler.py").write_text(EULER)
    env = {**subprocess_env(), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
