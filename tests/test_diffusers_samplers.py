"""The diffusers-style samplers (euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc) against
diffusers' schedulers: the grids equal ``set_timesteps``' arrays, and whole chains with one
analytic model equal diffusers' ``step`` loops (ancestral / SDE noise injected identically)."""
import contextlib
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers, schedules
from diffusion_jax.convert import scheduler as sc
from diffusion_jax.samplers import _sigma_steps
from diffusion_jax.samplers.dpmpp_2m import MultistepOptions

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CLASSES = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
           "dpmpp_2m": "DPMSolverMultistepScheduler",
           "dpmpp_2m_sde": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
GRID_CASES = [
    ("euler", dict(timestep_spacing="leading", steps_offset=1), 7),
    ("euler", dict(timestep_spacing="linspace"), 6),
    ("euler", dict(timestep_spacing="trailing"), 9),
    ("euler", dict(timestep_spacing="leading", use_karras_sigmas=True), 8),
    ("euler", dict(timestep_spacing="linspace", use_karras_sigmas=True,
                   final_sigmas_type="sigma_min"), 5),
    ("euler_ancestral", dict(timestep_spacing="leading", steps_offset=1), 7),
    ("euler_ancestral", dict(timestep_spacing="trailing"), 6),
    ("dpmpp_2m", dict(timestep_spacing="linspace"), 7),
    ("dpmpp_2m", dict(timestep_spacing="leading", steps_offset=1), 20),
    ("dpmpp_2m", dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), 6),
    ("dpmpp_2m", dict(timestep_spacing="leading", use_karras_sigmas=True), 10),
    ("dpmpp_2m", dict(use_karras_sigmas=True, solver_order=1), 5),
    ("dpmpp_2m_sde", dict(timestep_spacing="leading", steps_offset=1,
                          algorithm_type="sde-dpmsolver++"), 6),
    ("unipc", dict(timestep_spacing="leading", steps_offset=1), 7),
    ("unipc", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 6),
]


def _reference(name, fields, pred="epsilon"):
    config = {**SD, **fields, "prediction_type": pred}
    return getattr(diffusers, CLASSES[name])(**config), {"_class_name": CLASSES[name], **config}


def _ours(config, num_steps):
    """Our (sampler, options, schedule) from the config, as a checkpoint maps it."""
    name, fields = sc.checkpoint_sampler(config)
    settings = sc.scheduler_settings(config)
    options = samplers.make_options(pred_type=settings.pred_type, num_steps=num_steps, **fields)
    return name, options, schedules.make_schedule(settings.betas)


@pytest.mark.parametrize("name, fields, steps", GRID_CASES)
def test_grid_equals_diffusers_set_timesteps(name, fields, steps):
    ref, config = _reference(name, fields)
    ref.set_timesteps(steps)
    got_name, options, sched = _ours(config, steps)
    assert got_name == name
    family = "euler" if name.startswith("euler") else "multistep"
    ts, sigmas = _sigma_steps.step_grid(sched.alphas_cumprod, options, family)
    # Fractional (Karras) timesteps: a float32 ulp of alpha_bar moves them by ~1e-5 relative.
    np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=0)


def _model(x, t):
    """An analytic model, the same function of (x, t) in torch and jax (elementwise)."""
    mod = torch if isinstance(x, torch.Tensor) else jnp
    t = mod.asarray(t, dtype=x.dtype) if mod is jnp else t.to(x.dtype)
    scale = 0.6 * (1.0 + 0.2 * mod.cos(t / 150.0))
    if mod is jnp:
        scale = scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return scale * x + 0.1 * mod.tanh(x)


@contextlib.contextmanager
def _injected_noise(scheduler, noises):
    """While open, the scheduler's module draws ``noises`` (numpy, in order) instead of
    ``randn_tensor``'s: ours are ``normal(fold_in(key, i))``, so both chains see the same."""
    module = sys.modules[type(scheduler).__module__]
    if not hasattr(module, "randn_tensor"):  # a deterministic scheduler
        yield
        return
    noise_iter = iter(noises)
    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kwargs: torch.from_numpy(next(noise_iter).copy())
    try:
        yield
    finally:
        module.randn_tensor = original


def _diffusers_chain(ref, x_init, steps, noises):
    ref.set_timesteps(steps)
    with _injected_noise(ref, noises):
        x = torch.from_numpy(x_init) * ref.init_noise_sigma
        for t in ref.timesteps:
            out = _model(ref.scale_model_input(x, t), t)
            x = ref.step(out, t, x).prev_sample
    return x.numpy()


CHAIN_CASES = [
    ("euler", dict(timestep_spacing="leading", steps_offset=1), "epsilon", 6),
    ("euler", dict(timestep_spacing="linspace", use_karras_sigmas=True), "v_prediction", 5),
    ("euler", dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), "epsilon", 4),
    ("euler_ancestral", dict(timestep_spacing="leading", steps_offset=1), "epsilon", 6),
    ("euler_ancestral", dict(timestep_spacing="linspace"), "v_prediction", 5),
    ("dpmpp_2m", dict(timestep_spacing="leading", steps_offset=1), "epsilon", 8),
    ("dpmpp_2m", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                      lower_order_final=False), "v_prediction", 6),
    ("dpmpp_2m", dict(timestep_spacing="trailing", solver_order=1), "epsilon", 5),
    ("dpmpp_2m_sde", dict(timestep_spacing="leading", steps_offset=1,
                          algorithm_type="sde-dpmsolver++"), "epsilon", 6),
    ("dpmpp_2m_sde", dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
     "v_prediction", 5),
    ("unipc", dict(timestep_spacing="leading", steps_offset=1), "epsilon", 8),
    ("unipc", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                   lower_order_final=False), "v_prediction", 6),
    ("unipc", dict(timestep_spacing="trailing", solver_order=1), "epsilon", 5),
    ("unipc", dict(timestep_spacing="linspace"), "epsilon", 20),
]


@pytest.mark.parametrize("name, fields, pred, steps", CHAIN_CASES)
def test_chain_equals_diffusers_step_loop(name, fields, pred, steps):
    ref, config = _reference(name, fields, pred)
    got_name, options, sched = _ours(config, steps)
    assert got_name == name
    x_init = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    key = jax.random.key(3)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_init.shape))
              for i in range(steps)]
    run = jax.jit(functools.partial(samplers.run, name, _model, sched))
    got = np.asarray(run(jnp.asarray(x_init), key, options))
    expected = _diffusers_chain(ref, x_init, steps, noises)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------- a checkpoint's own scheduler

SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "interpolation_type": "linear", "num_train_timesteps": 1000,
              "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
              "trained_betas": None, "use_karras_sigmas": False}


@pytest.mark.parametrize("config, name, fields", [
    (SDXL_EULER, "euler", dict(timestep_spacing="leading", steps_offset=1,
                               use_karras_sigmas=False, final_sigmas_type="zero")),
    (dict(_class_name="EulerAncestralDiscreteScheduler"), "euler_ancestral",
     dict(timestep_spacing="linspace", steps_offset=0)),
    (dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True, solver_order=1,
          algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde",
     dict(use_karras_sigmas=True, solver_order=1, lower_order_final=True)),
    (dict(_class_name="UniPCMultistepScheduler", timestep_spacing="trailing"), "unipc",
     dict(timestep_spacing="trailing", solver_order=2, lower_order_final=True)),
    (dict(_class_name="PNDMScheduler", skip_prk_steps=True), "ddim", {}),
    (dict(_class_name="DDPMScheduler"), "ddim", {}),
    (dict(), "ddim", {}),
])
def test_checkpoint_sampler_maps_class_and_fields(config, name, fields):
    got_name, got = sc.checkpoint_sampler(config)
    assert got_name == name
    assert {k: got[k] for k in fields} == fields
    assert got.get("clip_x0", None) is None


@pytest.mark.parametrize("config, message", [
    (dict(_class_name="LMSDiscreteScheduler"), "_class_name='LMSDiscreteScheduler' has no "
     "equivalent sampler here; supported: ['DDIMScheduler'"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver"),
     "algorithm_type='dpmsolver' is not supported; supported: ['dpmsolver++', "
     "'sde-dpmsolver++']"),
    (dict(_class_name="DPMSolverMultistepScheduler", solver_order=3), "solver_order=3"),
    (dict(_class_name="DPMSolverMultistepScheduler", solver_type="heun"), "solver_type='heun'"),
    (dict(_class_name="EulerDiscreteScheduler", use_exponential_sigmas=True),
     "use_exponential_sigmas=True is not supported; supported: [False]"),
    (dict(_class_name="EulerDiscreteScheduler", interpolation_type="log_linear"),
     "interpolation_type='log_linear'"),
    (dict(_class_name="EulerAncestralDiscreteScheduler", rescale_betas_zero_snr=True),
     "rescale_betas_zero_snr=True"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True,
          beta_schedule="squaredcos_cap_v2"), "squaredcos_cap_v2"),
    (dict(_class_name="UniPCMultistepScheduler", solver_type="bh1"),
     "solver_type='bh1' is not supported; supported: ['bh2']"),
    (dict(_class_name="UniPCMultistepScheduler", disable_corrector=[0]), "disable_corrector"),
])
def test_unmappable_scheduler_is_a_named_error(config, message):
    with pytest.raises(ValueError) as err:
        sc.checkpoint_sampler(config, "SD/scheduler_config.json")
    assert str(err.value).startswith("SD/scheduler_config.json: ") and message in str(err.value)


# ------------------------------------------- end to end: the tiny SD pipeline, ours vs diffusers

PIPE_STEPS = 4
PIPE_SIZE = 32  # pixels; latents 16x16 (VAE factor 2)
# SDXL's own scheduler runs in every suite; the others (~15 s each on an idle core) are slow.
PIPE_CASES = [
    ("euler", SDXL_EULER),
    pytest.param("euler_ancestral",
                 {**SDXL_EULER, "_class_name": "EulerAncestralDiscreteScheduler"},
                 marks=pytest.mark.slow),
    pytest.param("dpmpp_2m", {**SDXL_EULER, "_class_name": "DPMSolverMultistepScheduler",
                              "use_karras_sigmas": True}, marks=pytest.mark.slow),
    pytest.param("dpmpp_2m_sde", {**SDXL_EULER, "_class_name": "DPMSolverMultistepScheduler",
                                  "algorithm_type": "sde-dpmsolver++"}, marks=pytest.mark.slow),
    pytest.param("unipc", {**SDXL_EULER, "_class_name": "UniPCMultistepScheduler"},
                 marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(converted directory, diffusers pipeline) of the tests' tiny random SD pipeline."""
    from sd_fixtures import save_tiny_pipeline

    from diffusion_jax.convert import pipeline as convert_pipeline
    root = tmp_path_factory.mktemp("sd")
    src, pipe = save_tiny_pipeline(root, dict(SD, clip_sample=False, set_alpha_to_one=False,
                                              steps_offset=1))
    convert_pipeline.convert_pipeline(src, root / "converted")
    return root / "converted", pipe


def _with_scheduler(tiny_sd, tmp_path, config):
    """A copy of the converted checkpoint whose scheduler_config.json is ``config``."""
    import json
    import shutil
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_sd[0], path)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parity
@pytest.mark.parametrize("name, config", PIPE_CASES)
def test_checkpoint_scheduler_pipeline_matches_diffusers(tiny_sd, tmp_path, name, config):
    from diffusion_jax import pipelines
    ours = pipelines.load(_with_scheduler(tiny_sd, tmp_path, config))
    assert ours.sampler == name
    reference = tiny_sd[1]
    reference.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    prompts = ["a photo of a cat", "hello"]
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    chain_key = jax.random.fold_in(jax.random.key(0), 1)  # text_to_image's chain key
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(chain_key, i), (2, 16, 16, 4)))
              .transpose(0, 3, 1, 2) for i in range(PIPE_STEPS)]
    with _injected_noise(reference.scheduler, noises), torch.no_grad():
        expected = reference(prompt=prompts, latents=torch.from_numpy(latents),
                             height=PIPE_SIZE, width=PIPE_SIZE, output_type="np",
                             num_inference_steps=PIPE_STEPS, guidance_scale=7.5).images
    got = pipelines.text_to_image(ours, prompts, jax.random.key(0), num_steps=PIPE_STEPS,
                                  latents=latents.transpose(0, 2, 3, 1), output="float",
                                  guidance_scale=7.5)
    got = np.clip((got + 1.0) / 2.0, 0.0, 1.0)
    assert expected.std() > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_cli_refuses_a_checkpoint_scheduler_it_cannot_map(tiny_sd, tmp_path):
    """No --sampler and an unmappable scheduler: exit 1, one line naming file, field, values."""
    import os
    import subprocess
    import sys

    from training_fixtures import REPO, subprocess_env
    config = {**SDXL_EULER, "_class_name": "DPMSolverMultistepScheduler",
              "algorithm_type": "dpmsolver"}
    path = _with_scheduler(tiny_sd, tmp_path, config)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_sample.py"),
                           f"--checkpoint={path}", f"--out={tmp_path / 'out'}", "--prompt=x"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert os.path.join(str(path), "scheduler", "scheduler_config.json") in lines[0]
    assert "algorithm_type='dpmsolver'" in lines[0] and "'sde-dpmsolver++'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_explicit_sampler_overrides_an_unmappable_checkpoint_scheduler(tiny_sd, tmp_path):
    from diffusion_jax import pipelines
    config = {**SDXL_EULER, "_class_name": "LMSDiscreteScheduler"}
    pipe = pipelines.load(_with_scheduler(tiny_sd, tmp_path, config))
    assert pipe.sampler is None
    with pytest.raises(ValueError, match="LMSDiscreteScheduler' has no equivalent sampler"):
        pipelines.default_sampler(pipe)
    assert pipelines.default_sampler(pipe, "ddim") == "ddim"
    options = pipelines.sampler_options(pipe, sampler="euler", num_steps=3)
    assert (options.timestep_spacing, options.num_steps) == ("linspace", 3)


def test_traced_schedule_and_offset_past_the_end_are_named_errors():
    sched = schedules.make_schedule(schedules.linear_beta_schedule(100))
    x = jnp.ones((2, 3))
    run = lambda s, options: samplers.run("euler", lambda x, t: x, s, x, jax.random.key(0),
                                          options)
    with pytest.raises(ValueError, match="need a concrete schedule"):
        jax.jit(run, static_argnums=1)(sched, samplers.make_options(num_steps=3))
    options = samplers.make_options(num_steps=4, timestep_spacing="leading", steps_offset=80)
    with pytest.raises(ValueError, match="steps_offset=80 gives timestep 155, past the "
                                         "schedule's last step 99"):
        run(sched, options)
