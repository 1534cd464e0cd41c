"""Text-to-image pipeline: whole-pipeline parity with diffusers, guidance without recompiling,
bf16, sharding, latent img2img / inpainting / inversion, and the run_sample.py CLI.

A tiny random diffusers StableDiffusionPipeline is written with save_pretrained, converted,
and run by both implementations from the same initial latents.
"""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sd_fixtures import save_tiny_pipeline
from training_fixtures import REPO, subprocess_env

from diffusion_jax import latent_generate, pipelines, samplers, sharding
from diffusion_jax.applications import tasks
from diffusion_jax.convert import pipeline as convert_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

# SD-1.x scheduler settings: epsilon, leading spacing with offset 1, no alpha-one.
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# SD-2.x-style v-prediction with trailing spacing and alpha-one (StableDiffusionPipeline
# turns clip_sample off itself; clipping is checked against DDIMScheduler.step below).
V_TRAILING = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction",
                  timestep_spacing="trailing")
PROMPTS = ["a photo of a cat", "hello"]
STEPS = 4
SIZE = 32  # pixels; latents 16x16 (VAE factor 2)
PARITY_TOL = 1e-3  # on [0, 1], the bound


def _converted(tmp_path_factory, scheduler_kwargs):
    root = tmp_path_factory.mktemp("sd")
    src, pipe = save_tiny_pipeline(root, scheduler_kwargs)
    convert_pipeline.convert_pipeline(src, root / "converted")
    return root / "converted", pipe


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(converted directory, diffusers pipeline) with the SD-1.x scheduler."""
    return _converted(tmp_path_factory, SD15)


@pytest.fixture(scope="module")
def ours(sd15):
    return pipelines.load(sd15[0])


def _latents(batch=2, seed=0):
    """``[B, 4, 16, 16]`` float32 NCHW starting latents shared by both implementations."""
    return np.random.default_rng(seed).standard_normal((batch, 4, 16, 16)).astype(np.float32)


def _diffusers_images(pipe, latents, prompts=PROMPTS, **kwargs):
    with torch.no_grad():
        return pipe(prompt=prompts, latents=torch.from_numpy(latents), height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                    **kwargs).images


def _ours_01(pipe, latents, prompts=PROMPTS, **kwargs):
    """Our images for the same latents, mapped to [0, 1] like diffusers' ``output_type="np"``."""
    images = pipelines.text_to_image(pipe, prompts, jax.random.key(0), num_steps=STEPS,
                                     latents=latents.transpose(0, 2, 3, 1), output="float",
                                     **kwargs)
    return np.clip((images + 1.0) / 2.0, 0.0, 1.0)


def test_ddim_cfg_matches_diffusers_sd15_scheduler(sd15, ours):
    latents = _latents()
    expected = _diffusers_images(sd15[1], latents, negative_prompt=["", "a cat"])
    got = _ours_01(ours, latents, negative_prompts=["", "a cat"], guidance_scale=7.5)
    assert expected.std() > 0.05  # a non-trivial image
    np.testing.assert_allclose(got, expected, atol=PARITY_TOL, rtol=0)


@pytest.mark.slow
def test_ddim_cfg_matches_diffusers_v_prediction_trailing(tmp_path_factory):
    path, pipe = _converted(tmp_path_factory, V_TRAILING)
    latents = _latents(seed=1)
    ours_v = pipelines.load(path)
    assert ours_v.options.pred_type == "v" and ours_v.ddim_timesteps(STEPS)[-1][1] == -1
    np.testing.assert_allclose(_ours_01(ours_v, latents, guidance_scale=7.5),
                               _diffusers_images(pipe, latents), atol=PARITY_TOL, rtol=0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_clipped_ddim_keeps_raw_eps_like_diffusers_scheduler(pred):
    from diffusers import DDIMScheduler

    from diffusion_jax import samplers, schedules
    from diffusion_jax.convert import scheduler as convert_scheduler

    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=False,
                  steps_offset=1, prediction_type=pred)
    reference = DDIMScheduler(**config)
    reference.set_timesteps(5)
    settings = convert_scheduler.scheduler_settings(dict(reference.config))
    # An analytic "model" whose x0 estimates leave [-0.5, 0.5], so clipping matters.
    model = lambda x, t: 1.5 * x + 0.001 * t.reshape((-1,) + (1,) * (x.ndim - 1))
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    sample = torch.from_numpy(x)
    for t in reference.timesteps:
        out = model(sample.numpy(), np.full((2,), int(t), np.float32))
        sample = reference.step(torch.from_numpy(out), t, sample).prev_sample
    options = samplers.make_options(
        pred_type=convert_scheduler.PRED_TYPES[pred], clip_x0=(-0.5, 0.5),
        clip_keeps_eps=True, timesteps=pipelines.diffusers_ddim_timesteps(settings, 5))
    got = samplers.run("ddim", lambda z, t: model(z, t.astype(jnp.float32)),
                       schedules.make_schedule(settings.betas), jnp.asarray(x),
                       jax.random.key(0), options)
    np.testing.assert_allclose(np.asarray(got), sample.numpy(), atol=1e-4, rtol=1e-4)
    rederived = samplers.run("ddim", lambda z, t: model(z, t.astype(jnp.float32)),
                             schedules.make_schedule(settings.betas), jnp.asarray(x),
                             jax.random.key(0), dataclasses.replace(options,
                                                                    clip_keeps_eps=False))
    assert np.abs(np.asarray(rederived) - sample.numpy()).max() > 1e-2  # the option matters


def test_guidance_scale_is_traced_not_recompiled(ours):
    latents = _latents()
    run = lambda scale: _ours_01(ours, latents, guidance_scale=scale)
    first = run(7.5)
    compiled = latent_generate.program._cache_size()
    second, third = run(3.0), run(7.5)
    assert latent_generate.program._cache_size() == compiled  # no new program for a new scale
    np.testing.assert_array_equal(first, third)
    assert np.abs(first - second).max() > 1e-2  # the scale does change the images


def test_guidance_scale_at_most_one_is_the_conditional_model_as_in_diffusers(sd15, ours):
    """diffusers runs ``s <= 1`` without guidance (SD-Turbo samples at ``s = 0``); ``s = 0``
    must not become the unconditional model nor ``0 < s < 1`` extrapolate from the prompt."""
    latents = _latents()
    conditional = _ours_01(ours, latents, guidance_scale=None)
    for scale in (0.0, 0.5, 1.0):
        np.testing.assert_array_equal(_ours_01(ours, latents, guidance_scale=scale), conditional)
    with torch.no_grad():
        expected = sd15[1](prompt=PROMPTS, latents=torch.from_numpy(latents), height=SIZE,
                           width=SIZE, num_inference_steps=STEPS, guidance_scale=0.0,
                           output_type="np").images
    np.testing.assert_allclose(conditional, expected, atol=PARITY_TOL, rtol=0)
    assert np.abs(_ours_01(ours, latents, guidance_scale=1.5) - conditional).max() > 1e-3
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        _ours_01(ours, latents, guidance_scale=float("nan"))


def test_pc_runs_in_the_pipeline_and_equals_the_registry_call(ours):
    """pc derives Python values from the schedule (its step check): the pipeline's jitted
    program once raised ConcretizationTypeError for it on every text-to-image model."""
    latents = _latents(batch=1).transpose(0, 2, 3, 1)
    key = jax.random.key(3)
    got = pipelines.text_to_image(ours, PROMPTS[:1], key, guidance_scale=None, sampler="pc",
                                  num_steps=20, latents=latents, output="latents")
    text = ours.text_encoder(jnp.asarray(ours.tokenizer(PROMPTS[:1]))).last_hidden_state
    options = pipelines.sampler_options(ours, sampler="pc", num_steps=20)
    want = samplers.run("pc", lambda z, t: ours.unet(z, t, {"text": text}), ours.schedule,
                        jnp.asarray(latents), jax.random.fold_in(key, 1), options)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)  # jit vs eager rounding
    with pytest.raises(ValueError, match="pc .* needs num_steps > beta_max"):
        pipelines.text_to_image(ours, PROMPTS[:1], key, sampler="pc", num_steps=3)


def test_zero_terminal_snr_scheduler_samples_like_diffusers(tmp_path_factory):
    """rescale_betas_zero_snr gives beta_{T-1} = 1 (alpha_bar = 0): once refused by
    make_schedule after a successful conversion; DDIM with v-prediction starts at x0 = -v."""
    path, pipe = _converted(tmp_path_factory, dict(V_TRAILING, rescale_betas_zero_snr=True))
    zero = pipelines.load(path)
    assert float(zero.schedule.alphas_cumprod[-1]) == 0.0
    latents = _latents(seed=2)
    np.testing.assert_allclose(_ours_01(zero, latents, guidance_scale=7.5),
                               _diffusers_images(pipe, latents), atol=PARITY_TOL, rtol=0)
    with pytest.raises(ValueError, match="zero-terminal-SNR .* sigma_max"):
        pipelines.text_to_image(zero, PROMPTS, jax.random.key(0), sampler="dpm_solver_pp",
                                num_steps=STEPS)
    eps_model = zero._replace(options=dataclasses.replace(zero.options, pred_type="eps"))
    with pytest.raises(ValueError, match="zero terminal SNR .* eps prediction cannot"):
        pipelines.text_to_image(eps_model, PROMPTS, jax.random.key(0), num_steps=STEPS)


def test_sampler_option_overrides_reach_the_sampler_and_never_the_prediction_type(ours):
    latents = _latents(batch=1).transpose(0, 2, 3, 1)
    run = lambda **kw: pipelines.text_to_image(ours, PROMPTS[:1], jax.random.key(0),
                                               sampler="dpm_solver_pp", num_steps=STEPS,
                                               latents=latents, output="latents", **kw)
    assert np.abs(run(option_overrides={"order": 1}) - run()).max() > 1e-3  # 1st vs 2nd order
    for overrides, match in (({"pred_type": "v"}, "come from the checkpoint"),
                             ({"chrun": 1.0}, "Unknown sampler option")):
        with pytest.raises(ValueError, match=match):
            run(option_overrides=overrides)


def test_text_to_image_in_batches_equals_one_call_and_compiles_one_batch_size(ours):
    prompts = ["a photo of a cat", "hello", "a dog"]
    latents = _latents(batch=3, seed=4).transpose(0, 2, 3, 1)
    whole = pipelines.text_to_image(ours, prompts, jax.random.key(0), num_steps=STEPS,
                                    latents=latents, output="float")
    before = latent_generate.program._cache_size()
    chunked = pipelines.text_to_image_in_batches(ours, prompts, jax.random.key(0), latents,
                                                 batch=2, num_steps=STEPS, output="float")
    assert latent_generate.program._cache_size() - before <= 1  # chunks of 2 and a padded 1 -> 2
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    with pytest.raises(ValueError, match="one latent per prompt"):
        pipelines.text_to_image_in_batches(ours, prompts, jax.random.key(0), latents[:2], batch=2)


def test_diffusers_ddim_timesteps_follow_the_scheduler(sd15, ours):
    sched = sd15[1].scheduler
    sched.set_timesteps(STEPS)
    pairs = ours.ddim_timesteps(STEPS)
    np.testing.assert_array_equal([t for t, _ in pairs], sched.timesteps.numpy())
    ratio = sched.config.num_train_timesteps // STEPS
    # The last step lands on alpha_bar_0 (set_alpha_to_one=False): t_prev = 0, not -1.
    assert [p for _, p in pairs] == [t - ratio for t, _ in pairs[:-1]] + [0]


@pytest.mark.slow
def test_bf16_sampling_is_close_to_float32(sd15, ours):
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op). The random
    # networks' rounding errors pass through three networks and are amplified by the
    # guidance scale 7.5 (CFG multiplies the cond - uncond difference) over 4 steps: measured
    # max 0.079, mean 0.0097 on [0, 1], against a mean deviation of the image of 0.22. So:
    # mean < 0.02 (2x margin) and max < 0.15; the chain itself (latents, schedule, CFG
    # combination) stays float32.
    latents = _latents()
    half = pipelines.load(sd15[0], dtype=jnp.bfloat16)
    full_images = _ours_01(ours, latents, guidance_scale=7.5)
    half_images = _ours_01(half, latents, guidance_scale=7.5)
    err = np.abs(half_images - full_images)
    assert err.max() < 0.15 and err.mean() < 0.02
    assert err.max() > 1e-3  # the bf16 path did run in bf16


@pytest.mark.slow
def test_sharded_over_8_devices_equals_one_device(ours):
    devices = jax.devices()
    assert len(devices) == 8
    mesh = sharding.make_mesh(sharding_config(), devices)
    latents = _latents(batch=3)  # padded to 8 inside
    prompts = PROMPTS + ["a cat"]
    one = _ours_01(ours, latents, prompts, guidance_scale=7.5)
    eight = _ours_01(ours, latents, prompts, guidance_scale=7.5, mesh=mesh)
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


def sharding_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def _photo(batch=2, seed=3):
    """``[B, 32, 32, 3]`` smooth images in [-1, 1]."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rng = np.random.default_rng(seed)
    images = [np.stack([np.sin(2 * np.pi * (a * x + b * y)) for a, b in rng.uniform(0, 2, (3, 2))],
                       axis=-1) for _ in range(batch)]
    return 0.8 * np.asarray(images, np.float32)


def test_latent_hole_keeps_a_latent_only_when_all_its_pixels_are_known():
    hole = np.zeros((1, 8, 8, 1), np.float32)
    hole[0, 3, 4] = 1.0                              # one pixel in latent cell (1, 2) at f=2
    known = np.asarray(tasks.latent_known_mask(jnp.asarray(hole), 2))
    expected = np.ones((1, 4, 4, 1), np.float32)
    expected[0, 1, 2] = 0.0
    np.testing.assert_array_equal(known, expected)


@pytest.mark.slow
def test_inpaint_keeps_known_latents_and_pixels(ours):
    images = _photo()
    hole = np.zeros((SIZE, SIZE, 1), np.float32)
    hole[:, SIZE // 2:] = 1.0
    key = jax.random.key(1)
    pasted = pipelines.inpaint(ours, images, hole, PROMPTS, key, num_steps=STEPS,
                               output="float")
    known = hole[..., 0] == 0
    assert pasted.min() >= -1.0 and pasted.max() <= 1.0  # "float" is [-1, 1] (was [-3.1, 2.6])
    np.testing.assert_array_equal(pasted[:, known], images[:, known])
    assert np.abs(pasted[:, ~known] - images[:, ~known]).mean() > 0.05  # the hole was redrawn
    # The final latents equal encode(x) on the known latents (the right half's 8 columns
    # are the hole at f = 2), and differ in the hole.
    latents = pipelines.inpaint(ours, images, hole, PROMPTS, key, num_steps=STEPS,
                                output="latents")
    encoded = np.asarray(pipelines.LatentCodec(ours.vae).encode(jnp.asarray(images)))
    np.testing.assert_allclose(latents[:, :, :8], encoded[:, :, :8], atol=1e-5, rtol=0)
    assert np.abs(latents[:, :, 8:] - encoded[:, :, 8:]).mean() > 0.1


@pytest.mark.slow
def test_img2img_strength_sets_how_much_of_the_image_is_kept(ours):
    images = _photo()
    encoded = np.asarray(pipelines.LatentCodec(ours.vae).encode(jnp.asarray(images)))
    run = lambda strength: pipelines.img2img(ours, images, PROMPTS, jax.random.key(2),
                                             strength=strength, num_steps=STEPS,
                                             output="latents")
    faint = np.abs(run(0.002) - encoded).mean()   # one step from t = 1
    full = np.abs(run(1.0) - encoded).mean()      # the image forgotten
    assert faint < 0.2 * full


class _LinearEps(nnx.Module):
    """A text-conditional stand-in UNet, ``eps = 0.5 z + 0.1 mean(text)``: smooth enough that
    DDIM inversion's fixed-point refinement converges (a random UNet's is too rough)."""
    in_channels = 4

    def __call__(self, z, t, cond):
        del t
        return 0.5 * z + 0.1 * cond["text"].mean(axis=(1, 2))[:, None, None, None]


def test_ddim_inversion_round_trip_through_the_latent_codec(ours):
    # Any UNet plugs in: the pipeline is plain components. Inversion with fixed-point
    # refinement inverts deterministic DDIM exactly, so decoding the inverted latents with
    # the same steps gives back encode(x).
    pipe = ours._replace(unet=_LinearEps(), ddim_timesteps=None)
    images = _photo()
    encoded = np.asarray(pipelines.LatentCodec(ours.vae).encode(jnp.asarray(images)))
    z_t = pipelines.invert(pipe, images, PROMPTS, num_steps=STEPS, fixed_point_iters=40)
    assert np.abs(z_t - encoded).mean() > 0.5 * np.abs(encoded).mean()  # moved by inversion
    back = pipelines.text_to_image(pipe, PROMPTS, jax.random.key(0), guidance_scale=None,
                                   num_steps=STEPS, latents=z_t, output="latents")
    np.testing.assert_allclose(back, encoded, atol=1e-4, rtol=0)


def _run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "run_sample.py"), *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_text_to_image_matches_the_library_and_rejects_bad_flags(sd15, ours, tmp_path):
    out = tmp_path / "out"
    proc = _run_sample(f"--checkpoint={sd15[0]}", f"--out={out}", "--prompt=a photo of a cat",
                       "--steps=4", "--num_samples=2", "--seed=5", "--guidance_scale=7.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = np.load(out / "samples.npz")["images"]
    expected = pipelines.text_to_image(ours, ["a photo of a cat"] * 2, jax.random.key(5),
                                       num_steps=4, guidance_scale=7.5)
    assert saved.dtype == np.uint8 and saved.shape == (2, SIZE, SIZE, 3)
    assert np.abs(saved.astype(int) - expected.astype(int)).max() <= 1  # rounding only
    assert Image.open(out / "samples.png").size[0] > SIZE
    for flags, message in ((["--height=30"], "multiple of"),
                           (["--strength=0.5"], "--strength"),
                           (["--task=img2img"], "--input"),
                           (["--task=diffusionclip"], "needs --source_text"),
                           ([f"--out={out}/samples.png/x"], "cannot be created")):
        proc = _run_sample(f"--checkpoint={sd15[0]}", f"--out={out}", "--prompt=x", *flags)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]


def test_sd_flag_checks_name_the_flag(ours):
    """In-process probes of run_sample.py's checks for an SD checkpoint (the CLI test above
    runs the real script for a few)."""
    from absl import flags
    from diffusion_jax.cli import sample as cli

    def check(*argv):
        fv = flags.FlagValues()
        cli.define_flags(fv)
        fv(["run_sample.py", "--prompt=x", *argv])
        cli.check_sd_flags(fv, ours)
        return cli.sampler_overrides(fv)

    assert check("--steps=3", "--sampler=dpm_solver_pp",
                 "--sampler_option=order=1") == {"num_steps": 3, "order": 1}
    check("--height=32", "--width=64")  # non-square sampling is fine
    for argv, match in ((["--height=0"], "--height=0 must be a positive multiple of 4"),
                        (["--width=30"], "--width=30 must be"),
                        (["--guidance_scale=nan"], "--guidance_scale must be finite"),
                        (["--guidance_scale=-1"], "--guidance_scale must be finite and >= 0"),
                        (["--sampler_option=pred_type=v"], "the checkpoint decides"),
                        (["--sampler_option=order=1"], "'order' is not used by sampler 'ddim'"),
                        (["--num_samples=0"], "--num_samples must be >= 1"),
                        (["--class_label=1"], "--class_label does not apply"),
                        (["--task=img2img", "--input=x.png", "--strength=0"], "--strength"),
                        (["--task=img2img", "--input=x.png", "--strength=1.5"], "--strength"),
                        (["--task=inpaint", "--sampler=langevin", "--input=x.png"],
                         "has no per-step hook")):
        with pytest.raises(ValueError, match=match):
            check(*argv)
