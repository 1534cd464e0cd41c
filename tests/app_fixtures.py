"""Models for the web-app tests: a tiny random Stable Diffusion directory in this package's
converted layout, written without torch (numpy-initialised NNX components), and a tiny
class-conditional pixel model (configs/tiny.py, 8x8 digits) served without training."""
import json

import training_fixtures  # noqa: F401  (the tests' shared persistent compilation cache)
from flax import nnx
from sd_fixtures import numpy_init, write_vocab

from configs import tiny
from diffusion_jax import loading, objectives, schedules
from diffusion_jax.app import engine
from diffusion_jax.convert import common, pipeline, text_encoder, unet_cond, vae

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


def tiny_pixel_engine(source):
    """An :class:`~diffusion_jax.app.engine.Engine` of a randomly initialised 10-class
    ``configs/tiny.py`` UNet; ``source`` is the path recorded in its PNGs."""
    config = tiny.get_config()
    config.model.class_conditional = True
    graphdef, params = nnx.split(objectives.build_model(config, rngs=nnx.Rngs(0)))
    loaded = loading.Loaded(graphdef, params, config,
                            schedules.schedule_from_config(config.diffusion))
    return engine.Engine(engine.PIXEL, str(source), loaded=loaded)
