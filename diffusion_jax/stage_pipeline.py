"""A text-to-image :class:`~diffusion_jax.pipelines.Pipeline` from the three stages trained here.

A ``latent_diffusion`` workdir (``configs/fashion_t2i.py``) names its frozen stages in its
stored config; `load_pipeline` assembles the same pipeline a converted Stable Diffusion
checkpoint gives, so :func:`diffusion_jax.pipelines.text_to_image` runs both::

    pipe = stage_pipeline.load_pipeline("runs/fashion_t2i")
    images = pipelines.text_to_image(pipe, ["an ankle boot"] * 4, key, guidance_scale=3.0)

Parts: the UNet (first EMA of the workdir), the autoencoder (first EMA of
``latent.autoencoder_workdir`` at the step the run was trained with, its ``scaling_factor``
set to the stored ``latent.scale_factor``), the CLIP text tower (first EMA of
``latent.clip_workdir`` at its pinned step) and the caption tokenizer in
``<clip workdir>/tokenizer``; the schedule, prediction type and DDIM spacing from the config.
A UNet trained with a continuous ``diffusion.kind`` (``vp``, ``subvp``, ``ve``, ``edm``,
``flow``) is wrapped as the discrete-time x0-predictor every sampler but the flow samplers and
every latent task takes (`ContinuousTimeUNet`).
A stage whose pinned step is gone or whose parameters changed since is refused
(`objectives.load_frozen_stage`).
"""
from __future__ import annotations

import os

import ml_collections
from flax import nnx

from diffusion_jax import clip_tokenizer, loading, objectives, pipelines, samplers, schedules
from diffusion_jax.sde import parameterization


def load_pipeline(workdir: str, step: int | None = None) -> pipelines.Pipeline:
    """The pipeline of a ``latent_diffusion`` workdir (see the module docstring).

    Raises:
        ValueError: the workdir is not a ``latent_diffusion`` run, or a frozen stage's
            parameters differ from those it was trained with.
        FileNotFoundError: a workdir, a pinned stage step or the tokenizer is missing.
    """
    return load_pipeline_and_config(workdir, step)[0]


def load_pipeline_and_config(workdir: str, step: int | None = None):
    """``(pipeline, config)`` of a ``latent_diffusion`` workdir: :func:`load_pipeline` and the
    run's stored config (e.g. for ``config.latent.clip_workdir``), read once. Raises as
    :func:`load_pipeline`."""
    loaded = loading.load(workdir=workdir, step=step, kinds=("latent_diffusion",))
    config = loaded.config
    vae = objectives.load_frozen_stage(config, "autoencoder").model
    vae.scaling_factor = float(config.latent.scale_factor)
    text_encoder = objectives.load_frozen_stage(config, "clip").model.text_model
    tok = clip_tokenizer.load_tokenizer(
        os.path.join(config.latent.clip_workdir, objectives.TOKENIZER_SUBDIR))
    options = samplers.options_from_config(config)  # pred_type x0 for a continuous kind
    unet = loaded.model
    if parameterization.kind_of(config.diffusion) != "discrete":
        unet = ContinuousTimeUNet(unet, config.diffusion)
    return pipelines.Pipeline(unet, vae, text_encoder, tok, loaded.schedule, options,
                              None, int(config.data.image_size)), config


class ContinuousTimeUNet(nnx.Module):
    """A UNet trained with a continuous ``diffusion.kind`` as a discrete-time x0-predictor:
    ``unet(z_t [B, h, w, C], t int [B], cond) = discrete_view(net(., ., cond))(z_t, t)`` under
    the schedule of ``diffusion`` (:func:`~diffusion_jax.sde.parameterization.discrete_view`).

    Args:
        net: the trained network ``net(z, time float [B], cond)``.
        diffusion: the run's ``config.diffusion`` (kept frozen, a static attribute).
    """

    def __init__(self, net: nnx.Module, diffusion: ml_collections.ConfigDict):
        self.net, self.in_channels = net, net.in_channels
        self.diffusion = ml_collections.FrozenConfigDict(diffusion)

    def __call__(self, x, t, cond):
        schedule = schedules.schedule_from_config(self.diffusion)
        return parameterization.discrete_view(lambda z, time: self.net(z, time, cond),
                                              self.diffusion, schedule)(x, t)
