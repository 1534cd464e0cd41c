"""Command-line tasks for ``run_sample.py``: SDEdit, inpainting, ILVR, super-resolution, inversion.

``run_sample.py`` registers the extra flags with :func:`define_flags` and, when ``--task`` is not
``sample``, hands over to :func:`run_task_from_flags`::

    python run_sample.py --workdir=W --out=O --task=sdedit --input=img.png --t0=0.5
    python run_sample.py --workdir=W --out=O --task=inpaint --mask_region=center --jump_n_sample=5
    python run_sample.py --workdir=W --out=O --task=ilvr --ilvr_factor=4
    python run_sample.py --workdir=W_sr --out=O --task=sr --input=low.png
    python run_sample.py --workdir=W --out=O --task=invert --source_label=3 --class_label=8

Without ``--input`` the first ``--num_samples`` images of the model's dataset are used.
``--class_label`` / ``--guidance_scale`` apply to every task (classifier-free guidance for
class-conditional models). Outputs: ``OUT/<task>.png`` (rows: input, [mask,] output) and
``OUT/<task>.npz`` (float arrays in [-1, 1]).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import data, generate
from diffusion_jax.applications import common, ilvr, inpaint, inversion, sdedit
from diffusion_jax.applications import super_resolution as sr

TASKS = ("sample", "sdedit", "inpaint", "ilvr", "sr", "invert")
MASK_REGIONS = ("left", "right", "top", "bottom", "center")


@dataclasses.dataclass
class TaskOptions:
    """Settings of one task run (the flags of :func:`define_flags` plus ``run_sample.py``'s).

    Attributes:
        sampler: ``"ddpm"`` or ``"ddim"``.
        num_steps: DDIM steps (and inversion steps).
        eta: DDIM eta.
        num_samples: images to process when no ``input`` is given.
        class_label: class for conditional models (``None``: null label / unconditional).
        guidance_scale: classifier-free guidance weight ``w``.
        input: PNG path of the input image (resized to the model's size), or ``None``.
        mask: PNG path of a mask, white where the image is regenerated (the hole for
            ``inpaint``, the edited region for ``sdedit``).
        mask_region: the regenerated region when ``mask`` is ``None`` (a half or ``center``;
            ``inpaint`` defaults to ``right``, ``sdedit`` to editing everything).
        t0: SDEdit noise fraction in (0, 1].
        ilvr_factor: ILVR downsampling factor ``N``.
        ilvr_t_min: last refined ILVR step (``-1``: all).
        sr_factor: super-resolution factor; the input is reduced to ``image_size / sr_factor``.
        sr_method: upsampling method of the SR conditioning (as in training).
        sr_aug_t: noise-augmentation step for the low-res input (``-1``: none).
        jump_length, jump_n_sample: RePaint resampling for ``inpaint`` (``1``: none).
        source_label: class the input is inverted under (``invert``; ``None``: ``class_label``).
    """
    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    num_samples: int = 8
    class_label: int | None = None
    guidance_scale: float = 0.0
    input: str | None = None
    mask: str | None = None
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


def define_flags(flag_values=None):
    """Register the task flags (``--task``, ``--input``, ``--mask``, ``--t0``, ...) with absl.

    ``run_sample.py`` already defines ``--sampler --steps --eta --num_samples --seed --out
    --class_label --guidance_scale``; these are the rest of :class:`TaskOptions`.
    """
    from absl import flags  # pylint: disable=g-import-not-at-top

    fv = flags.FLAGS if flag_values is None else flag_values
    defaults = TaskOptions()
    flags.DEFINE_enum("task", "sample", list(TASKS), "What to do with the model.", flag_values=fv)
    flags.DEFINE_string("input", None, "Input PNG (default: dataset images).", flag_values=fv)
    flags.DEFINE_string("mask", None, "Mask PNG, white = regenerate (inpaint hole / sdedit edit).",
                        flag_values=fv)
    flags.DEFINE_enum("mask_region", None, list(MASK_REGIONS),
                      "Region to regenerate when --mask is absent.", flag_values=fv)
    flags.DEFINE_float("t0", defaults.t0, "SDEdit noise fraction in (0, 1].", flag_values=fv)
    flags.DEFINE_integer("ilvr_factor", defaults.ilvr_factor, "ILVR downsampling factor N.",
                         flag_values=fv)
    flags.DEFINE_integer("ilvr_t_min", defaults.ilvr_t_min, "Last ILVR-refined step (-1 = all).",
                         flag_values=fv)
    flags.DEFINE_integer("sr_factor", defaults.sr_factor, "Super-resolution factor.",
                         flag_values=fv)
    flags.DEFINE_enum("sr_method", defaults.sr_method, list(sr.UPSAMPLE_METHODS),
                      "SR conditioning upsampling.", flag_values=fv)
    flags.DEFINE_integer("sr_aug_t", defaults.sr_aug_t, "SR noise-augmentation step (-1 = none).",
                         flag_values=fv)
    flags.DEFINE_integer("jump_length", defaults.jump_length, "RePaint jump length.",
                         flag_values=fv)
    flags.DEFINE_integer("jump_n_sample", defaults.jump_n_sample,
                         "RePaint resamplings per jump (1 = none).", flag_values=fv)
    flags.DEFINE_integer("source_label", None, "invert: class the input is inverted under.",
                         flag_values=fv)


def run_task_from_flags(flag_values, model, sched, config, out_dir):
    """Run ``flag_values.task`` with a loaded model and write its outputs to ``out_dir``.

    Args:
        flag_values: parsed absl flags (those of :func:`define_flags` and ``run_sample.py``).
        model: the UNet (``model(x, t, y=None, cond_image=None)``, ``num_classes`` attribute).
        sched: the model's :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        config: the model's config (``data``, ``diffusion.pred_type``, ``sample``).
        out_dir: output directory.

    Returns:
        The dict of arrays :func:`run_task` returns.
    """
    fv = flag_values
    options = TaskOptions(
        sampler=fv.sampler or config.sample.sampler, num_steps=fv.steps or config.sample.num_steps,
        eta=config.sample.eta if fv.eta is None else fv.eta, num_samples=fv.num_samples,
        class_label=fv.class_label, guidance_scale=fv.guidance_scale, input=fv.input,
        mask=fv.mask, mask_region=fv.mask_region, t0=fv.t0, ilvr_factor=fv.ilvr_factor,
        ilvr_t_min=fv.ilvr_t_min, sr_factor=fv.sr_factor, sr_method=fv.sr_method,
        sr_aug_t=fv.sr_aug_t, jump_length=fv.jump_length, jump_n_sample=fv.jump_n_sample,
        source_label=fv.source_label)
    images = load_inputs(options, config.data)
    results = run_task(fv.task, model, sched, images, options, jax.random.key(fv.seed),
                       pred_type=config.diffusion.pred_type,
                       clip_x0=(-1.0, 1.0) if config.sample.clip_x0 else None)
    write_outputs(out_dir, fv.task, results)
    return results


def run_task(task, model, sched, images, options, key, *, pred_type="eps", clip_x0=None):
    """Apply one application to ``images`` with ``model``.

    Args:
        task: one of ``sdedit``, ``inpaint``, ``ilvr``, ``sr``, ``invert``.
        model: callable ``model(x, t, y=None, cond_image=None) -> prediction`` with a
            ``num_classes`` attribute (0 for unconditional models), e.g. the UNet.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        images: ``[B, H, W, C]`` inputs in [-1, 1] at the model's resolution.
        options: :class:`TaskOptions`.
        key: PRNG key.
        pred_type: the model's prediction type.
        clip_x0: clip range of the predicted ``x0`` while sampling.

    Returns:
        dict of float32 numpy arrays ``[B, H, W, C]``: ``input``, ``output`` and, for tasks that
        use one, ``mask`` (inpaint, sdedit with a region) or ``low_res`` (sr, nearest-upsampled).

    Raises:
        ValueError: for an unknown task or inconsistent options.
    """
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    labels = None if options.class_label is None else jnp.full((batch,), options.class_label,
                                                                  jnp.int32)
    denoise = generate.build_denoiser(model, labels=labels, guidance_scale=options.guidance_scale)
    common_kw = dict(pred_type=pred_type, clip_x0=clip_x0)
    sampler_kw = dict(sampler=options.sampler, num_steps=options.num_steps, eta=options.eta,
                      **common_kw)
    results = {"input": images}
    if task == "sdedit":
        edit_mask = _mask(options, images.shape)
        out = sdedit.sdedit(denoise, sched, images, key, t0=options.t0, edit_mask=edit_mask,
                            **sampler_kw)
        if edit_mask is not None:
            results["mask"] = jnp.broadcast_to(2.0 * edit_mask - 1.0, images.shape)
    elif task == "inpaint":
        hole = _mask(options, images.shape, default_region="right")
        out = inpaint.inpaint(denoise, sched, images, 1.0 - hole, key,
                              jump_length=options.jump_length,
                              jump_n_sample=options.jump_n_sample, **sampler_kw)
        results["mask"] = jnp.broadcast_to(2.0 * hole - 1.0, images.shape)
        results["input"] = jnp.where(hole > 0.5, -1.0, images)
    elif task == "ilvr":
        out = ilvr.ilvr_sample(denoise, sched, images, key, factor=options.ilvr_factor,
                               t_min=options.ilvr_t_min, **sampler_kw)
    elif task == "sr":
        low = common.area_downsample(images, options.sr_factor)
        model_fn = lambda x, t, c: model(x, t, labels, cond_image=c)
        out = sr.sr_sample(model_fn, sched, low, key, image_size=images.shape[1],
                           method=options.sr_method, aug_t=options.sr_aug_t, **sampler_kw)
        results["low_res"] = common.nearest_upsample(low, options.sr_factor)
    elif task == "invert":
        source = options.class_label if options.source_label is None else options.source_label
        source_labels = None if source is None else jnp.full((batch,), source, jnp.int32)
        source_denoise = generate.build_denoiser(model, labels=source_labels)
        out = inversion.ddim_edit(source_denoise, denoise, sched, images,
                                  num_steps=options.num_steps, **common_kw)
    else:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS[1:])}.")
    results["output"] = out
    return {name: np.asarray(value, np.float32) for name, value in results.items()}


def load_inputs(options, data_cfg):
    """Input images ``[B, S, S, C]`` in [-1, 1]: ``options.input`` resized to the model's size,
    repeated ``num_samples`` times, or the first ``num_samples`` dataset images.

    Raises:
        FileNotFoundError: if ``options.input`` does not exist.
    """
    size, channels = data_cfg.image_size, data_cfg.num_channels
    if options.input is None:
        images, _ = data.load_eval_images(data_cfg, options.num_samples)
        return images
    image = _read_png(options.input, size, channels)
    return np.repeat(image[None], options.num_samples, axis=0)


def write_outputs(out_dir, task, results):
    """Write ``OUT/<task>.png`` (one row per array: input, [mask / low_res,] output) and
    ``OUT/<task>.npz``."""
    os.makedirs(out_dir, exist_ok=True)
    order = [name for name in ("input", "mask", "low_res", "output") if name in results]
    rows = np.concatenate([results[name] for name in order])
    grid = generate.image_grid(generate.to_uint8(rows), num_cols=results["input"].shape[0])
    generate.save_png(os.path.join(out_dir, f"{task}.png"), grid)
    np.savez(os.path.join(out_dir, f"{task}.npz"), **results)
    print(f"Wrote {task} results ({', '.join(order)}) to {out_dir}/{task}.png and {task}.npz")


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
    """``[H, W, 1]``, 1 where the image is regenerated: ``options.mask`` (white pixels) or
    ``options.mask_region`` (else ``default_region``); ``None`` if neither is set."""
    if options.mask is not None:
        return jnp.asarray(_read_png(options.mask, shape[1], 1) > 0.0, jnp.float32)
    region = options.mask_region or default_region
    return None if region is None else region_mask(shape, region)


def _read_png(path, size, channels):
    """``[size, size, channels]`` float32 in [-1, 1] from an image file (bilinear resize)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Input image {path!r} does not exist.")
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, np.float32).reshape(size, size, channels)
    return array / 127.5 - 1.0
