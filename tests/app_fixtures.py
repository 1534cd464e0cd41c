"""Models for the web-app tests: a tiny random Stable Diffusion directory in this package's
converted layout and a tiny converted CLIP (text + ViT towers, for DiffusionCLIP), written
without torch (numpy-initialised NNX components), and a tiny class-conditional pixel model
(configs/tiny.py, 8x8 digits) served without training."""
import json

import numpy as np
import training_fixtures  # noqa: F401  (the tests' shared persistent compilation cache)
from flax import nnx
from sd_fixtures import numpy_init, write_vocab

from configs import tiny
from diffusion_jax import loading, objectives, pipelines, schedules
from diffusion_jax.app import engine
from diffusion_jax.convert import clip, common, pipeline, text_encoder, unet_cond, vae

# One level with cross-attention, one without; one layer per block: a fast CPU compile.
UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64],
            layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
            attention_head_dim=[2, 4], norm_num_groups=32, use_linear_projection=True)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           layers_per_block=1, norm_num_groups=32, scaling_factor=0.3)
TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
            eos_token_id=2)
SCHEDULER = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1, num_train_timesteps=1000)
SIZE = 32  # default image size in pixels (UNet sample_size 16 x VAE factor 2)
CLIP = dict(text_config=TEXT, projection_dim=16,
            vision_config=dict(image_size=SIZE, patch_size=8, hidden_size=32,
                               intermediate_size=37, num_hidden_layers=1, num_attention_heads=4))


def gradient(size):
    """A smooth uint8 ``[size, size, 3]`` test image, ``(128 + k x, 128 + k y, 0)`` with
    ``k = 128 / size``: strongly coloured everywhere (easy to find in a screenshot) and far
    from the inpainting brush's magenta."""
    y, x = np.mgrid[0:size, 0:size] * (128 // size)
    return np.stack([128 + x, 128 + y, np.zeros_like(x)], -1).astype(np.uint8)


def write_tiny_sd(root, seed=0):
    """Writes the tiny pipeline to ``root`` (a ``pathlib.Path``); returns ``root``."""
    parts = (("unet", unet_cond, UNET, {"sample_size": UNET["sample_size"]}),
             ("vae", vae, VAE, {"sample_size": SIZE}),
             ("text_encoder", text_encoder, TEXT, {}))
    for i, (name, module, config, extra) in enumerate(parts):
        kwargs = module.config_to_kwargs(config)
        model = numpy_init(lambda m=module, k=kwargs: m.build(k), seed + i)
        common.save_component(root / name, model,
                              {"format": module.FORMAT, "kwargs": kwargs, **extra})
    write_vocab(root / "tokenizer", {"model_max_length": 16})
    (root / "scheduler").mkdir()
    (root / "scheduler" / pipeline.SCHEDULER_FILE).write_text(json.dumps(SCHEDULER))
    (root / pipeline.INDEX_FILE).write_text(json.dumps(
        {"format": pipeline.FORMAT, "pipeline_class": "StableDiffusionPipeline"}))
    return root


def write_tiny_clip(root, seed=10):
    """Writes the tiny converted CLIP (``load_clip``'s layout) to ``root``; returns ``root``."""
    kwargs = clip.config_to_kwargs(CLIP)
    model = numpy_init(lambda: clip.build(kwargs), seed)
    common.save_component(root, model, {"format": clip.FORMAT, "kwargs": kwargs})
    write_vocab(root / "tokenizer", {"model_max_length": 16})
    return root


def tiny_text_engine(root):
    """An :class:`~diffusion_jax.app.engine.Engine` of the tiny pipeline (``root / "tiny_sd"``)
    with the tiny CLIP (``root / "clip"``) as its CLIP stage, so every text tab is offered
    (a Stable Diffusion directory alone has no CLIP image tower: no DiffusionCLIP)."""
    sd_dir = write_tiny_sd(root / "tiny_sd")
    return engine.Engine(engine.TEXT, str(sd_dir), pipe=pipelines.load(str(sd_dir)),
                         clip_workdir=str(write_tiny_clip(root / "clip")))


def tiny_pixel_engine(source):
    """An :class:`~diffusion_jax.app.engine.Engine` of a randomly initialised 10-class
    ``configs/tiny.py`` UNet; ``source`` is the path recorded in its PNGs."""
    config = tiny.get_config()
    config.model.class_conditional = True
    graphdef, params = nnx.split(objectives.build_model(config, rngs=nnx.Rngs(0)))
    loaded = loading.Loaded(graphdef, params, config,
                            schedules.schedule_from_config(config.diffusion))
    return engine.Engine(engine.PIXEL, str(source), loaded=loaded)
