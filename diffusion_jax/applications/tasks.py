"""The one table of tasks, pixel and latent, and one call per application on a pixel model.

:data:`TASK_TABLE` names every task of the command line (``run_sample.py --task``), the web
app and the library: which kinds of model serve it (:data:`PIXEL`, a pixel-space model,
unconditional or class-conditional; :data:`TEXT`, a text-conditioned latent pipeline), which of
them the command line and the app offer it for, what it needs of its sampler, and the
codec-level runner that both kinds share where there is one. A runner takes a codec: the latent
pipelines (:mod:`diffusion_jax.pipelines`) give the autoencoder's, a pixel model
:data:`IDENTITY` (encode = decode = identity, factor 1), so SDEdit on pixels and img2img on
latents are one function.

:func:`run_task` runs a task on a pixel model: SDEdit, inpainting, ILVR, super-resolution,
inversion, DiffusionCLIP; used by ``run_sample.py --task=...`` (through
:mod:`diffusion_jax.cli.sample`) and the figure script. Arrays only: file reading and flags are
the command-line layer's job (:mod:`diffusion_jax.cli`).
"""
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import denoisers, latent_generate, samplers
from diffusion_jax.applications import common, diffusionclip, ilvr, inpaint, inversion, sdedit
from diffusion_jax.applications import super_resolution as sr
from diffusion_jax.conditioning import area_downsample, class_condition

PIXEL, TEXT = "pixel", "text"  # the kinds of model a task runs on
MODEL_KINDS = (PIXEL, TEXT)
MASK_REGIONS = ("left", "right", "top", "bottom", "center")


class IdentityCodec(NamedTuple):
    """The codec of a pixel model: ``encode = decode = identity``, factor 1 (a latent
    pipeline's codec maps images ``[B, H, W, C]`` to latents ``[B, H/f, W/f, C_z]`` and back)."""

    factor: int = 1

    def encode(self, images: jax.Array) -> jax.Array:
        return images

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


IDENTITY = IdentityCodec()


def edit_runner(denoise, codec, schedule, sampler, options, arrays, key, *, strength, decode,
                edit_mask=None):
    """SDEdit on ``codec.encode(arrays["x"])`` from ``t0 = strength``
    (:func:`~diffusion_jax.applications.sdedit.sdedit`); decoded when ``decode``."""
    z = sdedit.sdedit(denoise, schedule, codec.encode(arrays["x"]), key, t0=strength,
                      edit_mask=edit_mask, sampler=sampler, options=options)
    return codec.decode(z) if decode else z


def inpaint_runner(denoise, codec, schedule, sampler, options, arrays, key, *, paste, decode):
    """Known-latent replacement: ``arrays["mask"] [B, H, W, 1]`` (1 = regenerate) becomes a
    latent hole (:func:`latent_known_mask`), the known ``codec.encode(arrays["x"])`` are written
    back after every step and once more at the end; ``paste`` copies the known pixels into the
    decoded image."""
    images, hole = arrays["x"], arrays["mask"]                           # [B, H, W, 1]
    z_known = codec.encode(images)
    known = latent_known_mask(hole, images.shape[1] // z_known.shape[1])  # [B, h, w, 1]
    z = inpaint.inpaint(denoise, schedule, z_known, known, key, sampler=sampler, options=options)
    # A last step may land on alpha_bar_0 < 1 (diffusers' set_alpha_to_one=False), where the
    # hook wrote slightly noised known latents: write the clean ones.
    z = known * z_known + (1.0 - known) * z
    if not decode:
        return z
    decoded = codec.decode(z)
    return hole * decoded + (1.0 - hole) * images if paste else decoded


def invert_runner(denoise, codec, schedule, sampler, options, arrays, key, *, fixed_point_iters,
                  decode):
    """Deterministic DDIM inversion of ``codec.encode(arrays["x"])``: the latents ``z_T``."""
    del sampler, key, decode  # deterministic DDIM; the result is latents
    return inversion.ddim_invert(denoise, schedule, codec.encode(arrays["x"]),
                                 num_steps=options.num_steps, spacing=options.spacing,
                                 fixed_point_iters=fixed_point_iters)


def latent_known_mask(hole: jax.Array, factor: int) -> jax.Array:
    """``[B, H, W, 1]`` pixel hole (1 = regenerate) -> ``[B, H/f, W/f, 1]`` known latents:
    1 where every pixel of the ``f x f`` block is known, 0 if any is in the hole."""
    return (area_downsample(hole, factor) == 0.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: the models that serve it and the front ends that offer it.

    Attributes:
        kinds: the kinds of model the library runs it on (:data:`MODEL_KINDS`).
        cli: the kinds ``run_sample.py --task`` offers it for.
        app: the kinds the web app has a tab of it for (``sample`` of a text model is the
            app's ``text_to_image`` tab; ``diffusionclip`` also needs a CLIP image tower).
        sampler: it runs a registered sampler (``--sampler`` / ``--eta`` / sampler options).
        needs: what it needs of that sampler (:func:`~diffusion_jax.samplers.check_sampler`).
        runner: the codec-level runner ``runner(denoise, codec, schedule, sampler, options,
            arrays, key, **static)`` that a latent pipeline's compiled program runs with the
            autoencoder's codec (and :func:`run_task` with :data:`IDENTITY`), or ``None``
            (the task runs its own code).
    """
    kinds: tuple[str, ...]
    cli: tuple[str, ...]
    app: tuple[str, ...] = ()
    sampler: bool = False
    needs: dict = dataclasses.field(default_factory=dict)
    runner: Callable | None = None


TASK_TABLE = {
    "sample": Task(kinds=(PIXEL, TEXT), cli=(PIXEL, TEXT), app=(PIXEL, TEXT), sampler=True,
                   runner=latent_generate.sample_runner),
    "sdedit": Task(kinds=(PIXEL,), cli=(PIXEL,), sampler=True, needs=dict(t_start=True),
                   runner=edit_runner),
    "inpaint": Task(kinds=(PIXEL, TEXT), cli=(PIXEL, TEXT), app=(TEXT,), sampler=True,
                    needs=dict(step_hook=True), runner=inpaint_runner),
    "ilvr": Task(kinds=(PIXEL,), cli=(PIXEL,), sampler=True, needs=dict(step_hook=True)),
    "sr": Task(kinds=(PIXEL,), cli=(PIXEL,), sampler=True),
    "invert": Task(kinds=(PIXEL, TEXT), cli=(PIXEL,), app=(TEXT,), runner=invert_runner),
    "diffusionclip": Task(kinds=(PIXEL, TEXT), cli=(PIXEL, TEXT), app=(TEXT,)),
    "img2img": Task(kinds=(TEXT,), cli=(TEXT,), app=(TEXT,), sampler=True,
                    needs=dict(t_start=True), runner=edit_runner),
}
"""Every task, pixel and latent alike: the one list the command line, the app and the
pipelines read (``sdedit`` is ``img2img``'s runner on a pixel model)."""
TASKS = tuple(name for name, task in TASK_TABLE.items() if PIXEL in task.kinds and
              name != "sample")
"""The tasks :func:`run_task` runs (pixel sampling is :mod:`diffusion_jax.generate`'s)."""


def tasks_for(kind, front_end="cli"):
    """The names of the tasks ``front_end`` (``cli`` or ``app``) offers for a ``kind`` model."""
    return tuple(name for name, task in TASK_TABLE.items() if kind in getattr(task, front_end))


@dataclasses.dataclass
class TaskOptions:
    """Settings of one task run.

    Attributes:
        sampler: a registered sampler name (``invert`` always uses DDIM inversion).
        sampler_options: :class:`~diffusion_jax.samplers.SamplerOptions` (``num_steps`` is also
            the number of inversion steps).
        class_label: class for conditional models (``None``: null label / unconditional).
        guidance_scale: classifier-free guidance scale ``s`` (Stable Diffusion's: ``<= 1`` or
            ``None``: none; :mod:`diffusion_jax.denoisers`).
        mask: ``[H, W, 1]`` float, 1 where the image is regenerated (the hole for ``inpaint``,
            the edited region for ``sdedit``), or ``None``.
        mask_region: the regenerated region when ``mask`` is ``None`` (a half or ``center``;
            ``inpaint`` defaults to ``right``, ``sdedit`` to editing everything).
        t0: SDEdit noise fraction / DiffusionCLIP inversion depth, in (0, 1].
        ilvr_factor: ILVR downsampling factor ``N``.
        ilvr_t_min: last refined ILVR step (``-1``: all).
        sr_factor: super-resolution factor; the input is reduced to ``image_size / sr_factor``.
        sr_method: upsampling method of the SR conditioning (as in training).
        sr_aug_t: noise-augmentation step for the low-res input (``-1``: none).
        jump_length, jump_n_sample: RePaint resampling for ``inpaint`` (``1``: none).
        source_label: class the input is inverted under (``invert``; ``None``: ``class_label``).
        clip: ``(CLIPModel, tokenizer)`` for ``diffusionclip`` (tokenizer: texts -> ids [N, L]).
        source_text, target_text: the edit ``source -> target`` (``diffusionclip``).
        finetune_steps, clip_lr, id_weight, clip_decode_steps: DiffusionCLIP's Adam steps,
            learning rate, identity weight and differentiated DDIM steps (``num_steps`` of
            ``sampler_options`` is the number of inversion steps).
    """
    sampler: str = "ddim"
    sampler_options: samplers.SamplerOptions = dataclasses.field(
        default_factory=samplers.make_options)
    class_label: int | None = None
    guidance_scale: float | None = None
    mask: np.ndarray | None = None
    mask_region: str | None = None
    t0: float = 0.5
    ilvr_factor: int = 4
    ilvr_t_min: int = -1
    sr_factor: int = 2
    sr_method: str = "bicubic"
    sr_aug_t: int = -1
    jump_length: int = 10
    jump_n_sample: int = 1
    source_label: int | None = None
    clip: tuple | None = None
    source_text: str = ""
    target_text: str = ""
    finetune_steps: int = 10
    clip_lr: float = 1e-4
    id_weight: float = 0.3
    clip_decode_steps: int = 6


def run_task(task, model, sched, images, options, key, *, diffusion=None):
    """Apply one application to ``images`` with ``model``.

    Args:
        task: one of :data:`TASKS`.
        model: callable ``model(x, t, cond=None) -> prediction`` with a ``num_classes``
            attribute (0 for unconditional models), e.g. the UNet.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        images: ``[B, H, W, C]`` inputs in [-1, 1] at the model's resolution.
        options: :class:`TaskOptions`.
        key: PRNG key.
        diffusion: the model's ``config.diffusion`` (``pred_type``; ``kind``: discrete,
            continuous-time or EDM models alike), or ``None`` (a discrete eps model).

    Returns:
        dict of float32 numpy arrays ``[B, H, W, C]``: ``input``, ``output`` and, for tasks that
        use one, ``mask`` (inpaint, sdedit with a region) or ``low_res`` (sr, nearest-upsampled);
        ``diffusionclip`` adds ``reconstruction`` (decoded with the original parameters) and
        per-image ``[B]`` scores (see `_diffusionclip`).

    Raises:
        ValueError: for an unknown task, a sampler the task cannot use, or bad options.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}.")
    if TASK_TABLE[task].sampler:
        samplers.check_sampler(options.sampler, **TASK_TABLE[task].needs)
    images = jnp.asarray(images, jnp.float32)
    cond = class_condition(options.class_label, images.shape[0])

    def build(module, condition, scale=None):
        return denoisers.build_denoiser(module, condition, guidance_scale=scale,
                                        diffusion=diffusion, schedule=sched)

    denoise = build(model, cond, options.guidance_scale)
    run_kw = dict(sampler=options.sampler, options=options.sampler_options)
    results = {"input": images}
    if task == "sdedit":
        edit_mask = _mask(options, images.shape)
        out = edit_runner(denoise, IDENTITY, sched, options.sampler, options.sampler_options,
                          {"x": images}, key, strength=options.t0, decode=True,
                          edit_mask=edit_mask)
        if edit_mask is not None:
            results["mask"] = jnp.broadcast_to(2.0 * edit_mask - 1.0, images.shape)
    elif task == "inpaint":
        hole = _mask(options, images.shape, default_region="right")
        out = inpaint.inpaint(denoise, sched, images, 1.0 - hole, key,
                              jump_length=options.jump_length,
                              jump_n_sample=options.jump_n_sample, **run_kw)
        results["mask"] = jnp.broadcast_to(2.0 * hole - 1.0, images.shape)
        results["input"] = jnp.where(hole > 0.5, -1.0, images)
    elif task == "ilvr":
        out = ilvr.ilvr_sample(denoise, sched, images, key, factor=options.ilvr_factor,
                               t_min=options.ilvr_t_min, **run_kw)
    elif task == "diffusionclip":
        out, extra = _diffusionclip(model, sched, images, options,
                                    lambda module: build(module, cond))
        results.update(extra)
    elif task == "sr":
        low = common.area_downsample(images, options.sr_factor)
        out = sr.sr_sample(model, sched, low, key, image_size=images.shape[1],
                           method=options.sr_method, aug_t=options.sr_aug_t, cond=cond,
                           guidance_scale=options.guidance_scale, diffusion=diffusion, **run_kw)
        results["low_res"] = common.nearest_upsample(low, options.sr_factor)
    else:
        source = options.class_label if options.source_label is None else options.source_label
        source_denoise = build(model, class_condition(source, images.shape[0]))
        opts = options.sampler_options
        out = inversion.ddim_edit(source_denoise, denoise, sched, images,
                                  num_steps=opts.num_steps, clip_x0=opts.clip_x0)
    results["output"] = out
    return {name: np.asarray(value, np.float32) for name, value in results.items()}


def _diffusionclip(model, sched, images, options, make_denoiser):
    """DiffusionCLIP edit plus the per-image scores of `diffusionclip.edit_scores`;
    ``make_denoiser(module) -> Denoiser`` carries the condition and parameterisation."""
    if options.clip is None or not options.source_text or not options.target_text:
        raise ValueError("diffusionclip needs a CLIP model (--clip_workdir), --source_text and "
                         "--target_text.")
    if denoisers.guidance_weight(options.guidance_scale) is not None:
        raise ValueError("diffusionclip does not use classifier-free guidance (guidance_scale "
                         f"{options.guidance_scale} > 1).")
    clip_model, tokenizer = options.clip
    text = clip_model.encode_text(jnp.asarray(tokenizer([options.source_text,
                                                         options.target_text])))
    direction = diffusionclip.text_direction(text[0], text[1])
    res = diffusionclip.diffusionclip_edit(
        model, sched, images, clip_model.encode_image, direction,
        make_denoiser=make_denoiser, t0=options.t0,
        num_inversion_steps=options.sampler_options.num_steps,
        num_decode_steps=options.clip_decode_steps, finetune_steps=options.finetune_steps,
        learning_rate=options.clip_lr, id_weight=options.id_weight)
    return res["output"], dict(
        reconstruction=res["reconstruction"],
        **diffusionclip.edit_scores(clip_model, tokenizer, images, res["output"],
                                    options.source_text, options.target_text))


def region_mask(shape, region):
    """``[H, W, 1]`` float mask that is 1 on ``region`` (a half or the centre square) of an
    NHWC ``shape``.

    Raises:
        ValueError: for an unknown region.
    """
    height, width = shape[1], shape[2]
    mask = np.zeros((height, width, 1), np.float32)
    if region == "left":
        mask[:, :width // 2] = 1
    elif region == "right":
        mask[:, width // 2:] = 1
    elif region == "top":
        mask[:height // 2] = 1
    elif region == "bottom":
        mask[height // 2:] = 1
    elif region == "center":
        mask[height // 4:height - height // 4, width // 4:width - width // 4] = 1
    else:
        raise ValueError(f"Unknown mask_region {region!r}; expected one of {list(MASK_REGIONS)}.")
    return jnp.asarray(mask)


def _mask(options, shape, default_region=None):
    """``[H, W, 1]``, 1 where the image is regenerated: ``options.mask`` or
    ``options.mask_region`` (else ``default_region``); ``None`` if neither is set."""
    if options.mask is not None:
        mask = jnp.asarray(options.mask, jnp.float32)
        if mask.shape != (shape[1], shape[2], 1):
            raise ValueError(f"mask has shape {mask.shape}; expected {(shape[1], shape[2], 1)}.")
        return mask
    region = options.mask_region or default_region
    return None if region is None else region_mask(shape, region)
