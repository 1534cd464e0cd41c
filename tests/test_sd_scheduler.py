"""The diffusers scheduler-config mapping against diffusers' own DDIM / DDPM schedulers."""
import numpy as np
import pytest

from diffusion_jax import schedules
from diffusion_jax.convert import scheduler as sc

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

SD15 = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", num_train_timesteps=1000, set_alpha_to_one=False,
            skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False)
SD21 = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", clip_sample=False, num_train_timesteps=1000,
            prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
            trained_betas=None)
CONFIGS = {
    "sd15": SD15, "sd21": SD21,
    "linear_trailing": dict(beta_schedule="linear", timestep_spacing="trailing",
                            clip_sample=True, num_train_timesteps=1000),
    "cosine_linspace_zero_snr": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500,
                                     timestep_spacing="linspace", rescale_betas_zero_snr=True,
                                     prediction_type="sample"),
    "trained_betas": dict(trained_betas=list(np.linspace(1e-3, 0.05, 50)),
                          num_train_timesteps=50, steps_offset=2),
}
STEPS = (1, 7, 25, 50)


def _diffusers(cls, config):
    kept = {k: v for k, v in config.items()
            if k not in ("_class_name", "skip_prk_steps") and not (
                cls is diffusers.DDPMScheduler and k == "set_alpha_to_one")}
    return cls(**kept)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_betas_timesteps_and_ddim_steps_match_diffusers(name):
    config = CONFIGS[name]
    settings = sc.scheduler_settings(config)
    ref = _diffusers(diffusers.DDIMScheduler, config)
    # atol: 1 - abar_t / abar_{t-1} of the zero-SNR rescale cancels to a few 1e-7 in float32.
    np.testing.assert_allclose(settings.betas, ref.betas.numpy(), rtol=2e-6, atol=6e-7)
    np.testing.assert_allclose(settings.alphas_cumprod, ref.alphas_cumprod.numpy(),
                               rtol=1e-5, atol=1e-8)
    assert settings.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)
    assert settings.pred_type == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[
        config.get("prediction_type", "epsilon")]
    for n in STEPS:
        if n > settings.num_train_timesteps:
            continue
        if (n - 1) * (settings.num_train_timesteps // n) + settings.steps_offset >= \
                settings.num_train_timesteps and settings.timestep_spacing == "leading":
            with pytest.raises(ValueError, match="steps_offset"):  # diffusers would index past T
                sc.inference_timesteps(settings, n)
            continue
        ref.set_timesteps(n)
        ts = sc.inference_timesteps(settings, n)
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())
        # One DDIM step (eta = 0) from each timestep against diffusers' step checks where each
        # step lands (t - T // n, or the final alpha-bar), with diffusers' own alpha-bar table.
        prev = sc.ddim_prev_timesteps(settings, n)
        a_t, a_prev = sc.ddim_alphas(settings, n)
        table = ref.alphas_cumprod.double().numpy()
        final = float(ref.final_alpha_cumprod)
        np.testing.assert_allclose(a_t, table[ts], rtol=1e-5)
        np.testing.assert_allclose(a_prev, np.where(prev >= 0, table[prev], final), rtol=1e-5)
        x = torch.tensor([0.3, -1.7, 2.2])
        out = torch.tensor([0.5, 0.1, -0.8])
        for t, p in zip(ts, prev):
            got = ref.step(out, int(t), x).prev_sample.double().numpy()
            want = _ddim_step(x.double().numpy(), out.double().numpy(), table[t],
                              table[p] if p >= 0 else final, settings)
            # diffusers steps in float32; a wrong landing step moves the result by > 1e-2.
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _ddim_step(x, out, a_t, a_prev, settings):
    """Deterministic DDIM update written from the closed form (diffusers' raw-output variant)."""
    a_t, a_prev = float(a_t), float(a_prev)
    if settings.pred_type == "eps":
        x0, eps = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t), out
    elif settings.pred_type == "v":
        x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
        eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
    else:
        x0 = out
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    if settings.clip_sample:
        x0 = np.clip(x0, -settings.clip_sample_range, settings.clip_sample_range)
    return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps


@pytest.mark.parametrize("schedule", ["sigmoid", "linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_scheduler_betas_including_sigmoid(schedule):
    config = dict(beta_schedule=schedule, beta_start=2e-4, beta_end=0.03, num_train_timesteps=300,
                  variance_type="fixed_large", timestep_spacing="trailing")
    settings = sc.scheduler_settings(config)
    ref = _diffusers(diffusers.DDPMScheduler, config)
    np.testing.assert_allclose(settings.betas, ref.betas.numpy(), rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(settings.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
    assert settings.ddpm_variance == "beta"
    for n in (3, 10, 300):
        ref.set_timesteps(n)
        np.testing.assert_array_equal(sc.inference_timesteps(settings, n), ref.timesteps.numpy())


def test_diffusers_sigmoid_differs_from_project_sigmoid():
    settings = sc.scheduler_settings(dict(beta_schedule="sigmoid", num_train_timesteps=1000))
    assert settings.schedule is None  # no project name: the betas themselves must be used
    ours = np.asarray(schedules.get_beta_schedule("sigmoid", 1000, beta_start=1e-4, beta_end=0.02))
    assert np.abs(ours - settings.betas).max() > 1e-3


def test_project_overrides_for_named_schedules():
    over = sc.project_overrides(sc.scheduler_settings(SD21))
    assert over == {"diffusion.num_timesteps": 1000, "diffusion.pred_type": "v",
                    "diffusion.beta_start": 0.00085, "diffusion.beta_end": 0.012,
                    "sample.clip_x0": False, "diffusion.schedule": "scaled_linear"}
    # The named project schedule reproduces the same betas.
    np.testing.assert_allclose(
        schedules.get_beta_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012),
        sc.scheduler_settings(SD21).betas, rtol=1e-5)


def test_zero_snr_rescale_ends_at_zero_and_keeps_first():
    base = sc.diffusers_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = sc.rescale_zero_terminal_snr(base)
    ac, ac_base = np.cumprod(1.0 - rescaled), np.cumprod(1.0 - base)
    assert ac[-1] == pytest.approx(0.0, abs=1e-9)
    assert ac[0] == pytest.approx(ac_base[0], rel=1e-6)


@pytest.mark.parametrize("config, field", [
    (dict(beta_schedule="laplace"), "beta_schedule"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(thresholding=True), "thresholding"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(my_new_option=1), "my_new_option"),
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (dict(_class_name="FooScheduler"), "_class_name='FooScheduler' is not a supported"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"), "flow-matching scheduler"),
    # betas that are no diffusion: each used to convert silently (or raise an IndexError).
    (dict(beta_schedule="scaled_linear", beta_end=-0.1), "beta_end=-0.1: beta_start and beta_end"),
    (dict(beta_end=1.5), "beta_end=1.5: beta_start and beta_end must lie in"),
    (dict(num_train_timesteps=0), "num_train_timesteps=0 must be >= 1"),
    (dict(num_train_timesteps="many"), "num_train_timesteps='many' is not a number"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas must be num_train_timesteps=1000 values"),
    (dict(num_train_timesteps=2, trained_betas=[0.1, 1.2]), r"got 2 in \[0.1, 1.2\]"),
])
def test_unsupported_fields_are_named(config, field):
    with pytest.raises(ValueError, match=field):
        sc.scheduler_settings(config)


@pytest.mark.parametrize("name", [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "HeunDiscreteScheduler"])
def test_configs_of_the_schedulers_sd_pipelines_ship_with_are_read(name):
    ref = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="v_prediction")
    settings = sc.scheduler_settings(dict(ref.config))
    np.testing.assert_allclose(settings.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
    assert settings.pred_type == "v"


def test_supported_scheduler_classes_exist_in_diffusers():
    assert [name for name in sc.SCHEDULER_CLASSES if not hasattr(diffusers, name)] == []


def test_num_steps_out_of_range():
    settings = sc.scheduler_settings(dict(num_train_timesteps=10))
    with pytest.raises(ValueError, match="num_steps"):
        sc.inference_timesteps(settings, 11)
