"""A tiny random diffusers StableDiffusionPipeline through convert_pipeline / load_pipeline."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sd_fixtures import CLIP_SMALL, TOL, UNET_LINEAR, VAE_SMALL, nchw, perturb, run, write_vocab

from diffusion_jax.convert import pipeline, scheduler, unet_cond

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="v_prediction", timestep_spacing="trailing")
PROMPTS = ["a photo of a cat", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small random SD pipeline written by diffusers' save_pretrained; returns (dir, pipe)."""
    root = tmp_path_factory.mktemp("sd")
    write_vocab(root / "vocab", {"model_max_length": 16})
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=perturb(diffusers.AutoencoderKL(**VAE_SMALL), 1),
        text_encoder=perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **CLIP_SMALL, hidden_act="quick_gelu", eos_token_id=2)), 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "vocab"),
        unet=perturb(diffusers.UNet2DConditionModel(**UNET_LINEAR), 3),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "diffusers")
    return root / "diffusers", pipe


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    """The pipeline converted through the command-line entry point."""
    out = tmp_path_factory.mktemp("converted")
    pipeline.main(["--src", str(saved[0]), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def stored(converted):
    """The converted pipeline loaded back (float32)."""
    return pipeline.load_pipeline(converted)


def test_converted_pipeline_matches_every_diffusers_component(saved, stored):
    _, pipe = saved
    sd = stored
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    np.testing.assert_array_equal(sd.tokenizer(PROMPTS), ids.numpy())
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    ours_states = run(lambda m, i: m(i).last_hidden_state, sd.text_encoder,
                      jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(np.asarray(ours_states), states.numpy(), atol=TOL, rtol=0)

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 10])
    with torch.no_grad():
        pred = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), states).sample.numpy()
        image = pipe.vae.decode(torch.from_numpy(latents) / pipe.vae.config.scaling_factor).sample
    got = run(lambda m, x, t, c: m(x, t, {"text": c}), sd.unet, latents.transpose(0, 2, 3, 1),
              jnp.asarray(t), jnp.asarray(states.numpy()))
    np.testing.assert_allclose(nchw(got), pred, atol=TOL, rtol=0)
    decoded = run(lambda m, z: m.decode(z / m.scaling_factor), sd.vae,
                  latents.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nchw(decoded), image.numpy(), atol=TOL, rtol=0)

    assert sd.scheduler.pred_type == "v"
    for n in (4, 10):
        pipe.scheduler.set_timesteps(n)
        np.testing.assert_array_equal(scheduler.inference_timesteps(sd.scheduler, n),
                                      pipe.scheduler.timesteps.numpy())
    assert sd.info["unet"]["sample_size"] == 16
    assert sd.info["pipeline_class"] == "StableDiffusionPipeline"


def test_load_pipeline_reads_a_diffusers_directory_directly(saved, stored):
    direct = pipeline.load_pipeline(saved[0])
    for name in ("unet", "vae", "text_encoder"):
        a, b = (nnx.to_pure_dict(nnx.state(getattr(sd, name), nnx.Param))
                for sd in (direct, stored))
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert direct.scheduler.timestep_spacing == stored.scheduler.timestep_spacing == "trailing"


def test_dtype_overrides_set_compute_and_parameter_dtypes(converted):
    unet, record = unet_cond.load_converted(converted / "unet", dtype=jnp.bfloat16)
    assert unet.dtype == jnp.bfloat16 and record["format"] == unet_cond.FORMAT
    assert unet.conv_in.kernel[...].dtype == jnp.float32  # parameters stay float32
    half, _ = unet_cond.load_converted(converted / "unet", param_dtype=jnp.bfloat16)
    assert half.conv_in.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half.conv_in.kernel[...], np.float32),
                               np.asarray(unet.conv_in.kernel[...]), rtol=1e-2)


def test_index_errors_name_the_component(saved, tmp_path):
    src = saved[0]
    index = json.loads((src / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.load_pipeline(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for change, message in (({"unet": ["diffusers", "UNet2DModel"]}, "'unet'"),
                            ({"controlnet": ["diffusers", "ControlNetModel"]}, "controlnet")):
        (bad / "model_index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match=message):
            pipeline.load_pipeline(bad)
