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
every latent task takes (`latent_generate.ContinuousTimeUNet`). The ``latent_diffusion``
objective's training-time sample grid assembles the same parts (`objectives.latent_stages`,
`latent_generate.sampling_unet`) and runs the same program.
A stage whose pinned step is gone or whose parameters changed since is refused
(`objectives.load_frozen_stage`).
"""
from __future__ import annotations

from diffusion_jax import latent_generate, loading, objectives, pipelines, samplers


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
    vae, text_encoder, tok = objectives.latent_stages(config)
    options = samplers.options_from_config(config)  # pred_type x0 for a continuous kind
    unet = latent_generate.sampling_unet(loaded.model, config.diffusion)
    return pipelines.Pipeline(unet, vae, text_encoder, tok, loaded.schedule, options,
                              None, int(config.data.image_size)), config
