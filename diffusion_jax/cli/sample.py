"""Command-line layer of ``run_sample.py``: flags, their checks, input files, outputs.

``run_sample.py`` registers the flags with :func:`define_flags`, checks them against the loaded
model with :func:`check_flags`, and for ``--task`` other than ``sample`` hands over to
:func:`run_task_from_flags`::

    python run_sample.py --workdir=W --out=O --task=sdedit --input=img.png --t0=0.5
    python run_sample.py --workdir=W --out=O --task=inpaint --mask_region=center --jump_n_sample=5
    python run_sample.py --workdir=W --out=O --task=ilvr --ilvr_factor=4
    python run_sample.py --workdir=W_sr --out=O --task=sr --input=low.png
    python run_sample.py --workdir=W --out=O --task=invert --source_label=3 --class_label=8
    python run_sample.py --workdir=W --out=O --task=diffusionclip --input=shirt.png \
        --source_text="a photo of a shirt" --target_text="a photo of a t-shirt" \
        --clip_workdir=runs/fashion_clip --finetune_steps=10 --clip_lr=1e-4 --t0=0.5
    python run_sample.py --checkpoint=SD_DIR --out=O --prompt="a photo of a cat" --steps=25
    python run_sample.py --checkpoint=SD_DIR --out=O --task=img2img --input=x.png --strength=0.6
    python run_sample.py --checkpoint=SD_DIR --out=O --task=inpaint --input=x.png --mask=m.png

Without ``--input`` the first ``--num_samples`` images of the model's dataset are used; an
input or mask of another size than the model's is an error unless ``--resize_input``.
``--class_label`` / ``--guidance_scale`` apply to every task (classifier-free guidance for
class-conditional models). A flag the task does not use is an error. The SR flags default to
the checkpoint's ``config.sr``. Outputs: ``OUT/<task>.png`` (rows: input, [mask,] output) and
``OUT/<task>.npz`` (float arrays in [-1, 1]). Nothing in the library imports this module.

A Stable Diffusion checkpoint (a directory with ``model_index.json``, diffusers or converted)
runs text-to-image (:func:`run_sd_from_flags`, :mod:`diffusion_jax.pipelines`) with
``--prompt`` / ``--negative_prompt`` / ``--height`` / ``--width`` and the tasks in
:data:`SD_TASKS`; there ``--guidance_scale`` defaults to 7.5 (Stable Diffusion's scale ``s``,
the convention of every model: 1 = none), ``--sampler`` defaults to the one reproducing the
checkpoint's own scheduler (:func:`diffusion_jax.pipelines.default_sampler`; an error naming the
field when its ``scheduler_config.json`` has none here) and ``--input`` is required for ``img2img`` /
``inpaint`` / ``diffusionclip`` (DiffusionCLIP in latent space,
:func:`diffusion_jax.pipelines.diffusionclip`; ``--steps`` inversion steps, default 20)::

    python run_sample.py --workdir=demo_t2i/t2i --out=O --task=diffusionclip --input=shirt.png \
        --source_text="a photo of a shirt" --target_text="a photo of a t-shirt" \
        --clip_workdir=demo_t2i/clip
"""
import dataclasses
import os

import jax
import ml_collections
import numpy as np
from absl import flags

from diffusion_jax import data, denoisers, image_io, pipelines, samplers, sharding
from diffusion_jax.applications import diffusionclip, tasks
from diffusion_jax.cli import flags as cli_flags
from diffusion_jax.conditioning import UPSAMPLE_METHODS


SAMPLER_FLAGS = ("sampler", "eta", "sampler_option")
_INPUT = ("input", "resize_input")
_DIFFUSIONCLIP = ("t0", "source_text", "target_text", "clip_workdir", "finetune_steps", "clip_lr",
                  "id_weight", "clip_decode_steps")
# The task-specific flags each task reads (the tasks themselves, the models they run on and
# their samplers come from the library's one table, tasks.TASK_TABLE); a task that runs a
# sampler also reads SAMPLER_FLAGS. Any other task given one of them is an error.
_TASK_ONLY_FLAGS = {
    "sdedit": _INPUT + ("mask", "mask_region", "t0"),
    "inpaint": _INPUT + ("mask", "mask_region", "jump_length", "jump_n_sample"),
    "ilvr": _INPUT + ("ilvr_factor", "ilvr_t_min"),
    "sr": _INPUT + ("sr_factor", "sr_method", "sr_aug_t"),
    "invert": _INPUT + ("source_label",),
    "diffusionclip": _INPUT + _DIFFUSIONCLIP,
    "img2img": ("input", "strength"),
}
TASK_TABLE = {name: task for name, task in tasks.TASK_TABLE.items() if task.cli}
"""The tasks ``--task`` offers, read from the library's one table
(:data:`~diffusion_jax.applications.tasks.TASK_TABLE`)."""
TASKS = tuple(TASK_TABLE)
PIXEL_TASKS = tasks.tasks_for(tasks.PIXEL)
SD_TASKS = tasks.tasks_for(tasks.TEXT)
# Flags only a Stable Diffusion checkpoint uses.
SD_FLAGS = ("prompt", "negative_prompt", "height", "width", "strength", "dtype")


def reads(task: str, flag: str) -> bool:
    """Whether ``--task=task`` uses ``--flag``."""
    return flag in _TASK_ONLY_FLAGS.get(task, ()) or (TASK_TABLE[task].sampler and
                                                       flag in SAMPLER_FLAGS)


# Flag -> the tasks that use it; any other task given one of them is an error.
TASK_FLAGS = {flag: tuple(name for name in TASKS if reads(name, flag))
              for flag in dict.fromkeys(SAMPLER_FLAGS + sum(_TASK_ONLY_FLAGS.values(), ()))}


def define_flags(flag_values=None):
    """Register the sampling and task flags (``--sampler``, ``--steps``, ``--task``, ...) with absl.

    ``run_sample.py`` adds where the model comes from (``--workdir`` / ``--checkpoint``) and
    where the outputs go (``--out``).
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    defaults = tasks.TaskOptions()
    cli_flags.define_sampler("Sampler (default: config.sample.sampler; for a Stable Diffusion "
                             "checkpoint, the one matching its scheduler_config.json).",
                             flag_values=fv)
    cli_flags.define_steps(flag_values=fv)
    flags.DEFINE_float("eta", None, "DDIM eta (default: config.sample.eta).", flag_values=fv)
    flags.DEFINE_multi_string(
        "sampler_option", [], "NAME=VALUE of a SamplerOptions field the sampler reads (another "
        "sampler's is refused), e.g. churn=40, order=3, sde=ve, method=tsit5, "
        "dynamic_threshold=0.995 (repeatable; default: config.sample).",
        flag_values=fv)
    flags.DEFINE_integer("num_samples", 64, "Number of images.", flag_values=fv)
    cli_flags.define_seed(flag_values=fv)
    flags.DEFINE_integer("class_label", None, "Class of every sample (conditional models).",
                         flag_values=fv)
    flags.DEFINE_float("guidance_scale", None,
                       "Classifier-free guidance scale s >= 0, Stable Diffusion's convention for "
                       "every model: 1 (or less) = the conditional model alone, larger = "
                       "stronger guidance; the weight w = s - 1 of older releases' pixel "
                       "models (default: the checkpoint's config.sample.guidance_scale; 7.5 for "
                       "a Stable Diffusion directory).", flag_values=fv)
    flags.DEFINE_enum("task", "sample", list(TASKS), "What to do with the model.", flag_values=fv)
    flags.DEFINE_string("input", None, "Input PNG (default: dataset images).", flag_values=fv)
    flags.DEFINE_bool("resize_input", False, "Resize --input / --mask to the model's size "
                      "(otherwise a different size is an error).", flag_values=fv)
    flags.DEFINE_string("mask", None, "Mask PNG, white = regenerate (inpaint hole / sdedit edit).",
                        flag_values=fv)
    flags.DEFINE_enum("mask_region", None, list(tasks.MASK_REGIONS),
                      "Region to regenerate when --mask is absent.", flag_values=fv)
    flags.DEFINE_float("t0", defaults.t0, "SDEdit noise fraction in (0, 1].", flag_values=fv)
    flags.DEFINE_integer("ilvr_factor", defaults.ilvr_factor, "ILVR downsampling factor N.",
                         flag_values=fv)
    flags.DEFINE_integer("ilvr_t_min", defaults.ilvr_t_min, "Last ILVR-refined step (-1 = all).",
                         flag_values=fv)
    flags.DEFINE_integer("sr_factor", None, "Super-resolution factor (default: config.sr.factor).",
                         flag_values=fv)
    flags.DEFINE_enum("sr_method", None, list(UPSAMPLE_METHODS),
                      "SR conditioning upsampling (default: config.sr.upsample_method).",
                      flag_values=fv)
    flags.DEFINE_integer("sr_aug_t", None, "SR noise-augmentation step, -1 = none "
                         "(default: config.sr.sample_aug_t).", flag_values=fv)
    flags.DEFINE_integer("jump_length", defaults.jump_length, "RePaint jump length.",
                         flag_values=fv)
    flags.DEFINE_integer("jump_n_sample", defaults.jump_n_sample,
                         "RePaint resamplings per jump (1 = none).", flag_values=fv)
    flags.DEFINE_integer("source_label", None, "invert: class the input is inverted under.",
                         flag_values=fv)
    flags.DEFINE_string("source_text", None, "diffusionclip: text describing the input.",
                        flag_values=fv)
    flags.DEFINE_string("target_text", None, "diffusionclip: text to edit toward.",
                        flag_values=fv)
    flags.DEFINE_string("clip_workdir", None, "diffusionclip: CLIP-stage training workdir "
                        "(configs/fashion_clip.py).", flag_values=fv)
    flags.DEFINE_integer("finetune_steps", defaults.finetune_steps,
                         "diffusionclip: Adam steps on the denoiser copy.", flag_values=fv)
    flags.DEFINE_float("clip_lr", defaults.clip_lr, "diffusionclip: learning rate.",
                       flag_values=fv)
    flags.DEFINE_float("id_weight", defaults.id_weight, "diffusionclip: identity L1 weight.",
                       flag_values=fv)
    flags.DEFINE_integer("clip_decode_steps", defaults.clip_decode_steps,
                         "diffusionclip: differentiated DDIM steps.", flag_values=fv)
    flags.DEFINE_string("prompt", None, "SD: the text prompt of every sample.", flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "SD: the negative prompt (default: empty).",
                        flag_values=fv)
    flags.DEFINE_integer("height", None, "SD: image height in pixels (default: the model's).",
                         flag_values=fv)
    flags.DEFINE_integer("width", None, "SD: image width in pixels (default: the model's).",
                         flag_values=fv)
    flags.DEFINE_float("strength", 0.8, "SD img2img: noise fraction in (0, 1].", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                      "SD: compute dtype of the networks (parameters stay float32).",
                      flag_values=fv)


def check_flags(fv, config):
    """Check the parsed flags against the task and the loaded model's ``config``.

    Raises:
        ValueError: with a one-line message naming the flag, for: a flag the task does not
            use; ``--steps`` or ``--num_samples`` below 1; a negative ``--guidance_scale``, or
            one on an unconditional model; a label outside ``[0, num_classes)``; a sampler the
            task cannot use, or a ``--steps`` / ``--eta`` / ``--sampler_option`` setting it does
            not read (:func:`~diffusion_jax.samplers.check_options`); ``--task=sr`` without a
            super-resolution model or the reverse;
            ``--task=diffusionclip`` without its texts and CLIP workdir, or with step counts
            below 1, ``--clip_lr <= 0`` or ``--id_weight < 0``.
    """
    task = fv.task
    for name in SD_FLAGS:
        if fv[name].present:
            kind = ("a class-conditional pixel model (--class_label picks the class)"
                    if config.model.class_conditional else "an unconditional pixel model")
            raise ValueError(f"--{name} needs a text-to-image model (a Stable Diffusion "
                             "--checkpoint with model_index.json, or the --workdir of a "
                             f"latent_diffusion run); this is {kind}.")
    if task not in PIXEL_TASKS:
        raise ValueError(f"--task={task} needs a Stable Diffusion --checkpoint (this model runs "
                         f"{list(PIXEL_TASKS)}; --task=sdedit is img2img for it).")
    _check_common(fv)
    if task == "diffusionclip":
        _check_diffusionclip(fv)
    num_classes = config.data.num_classes if config.model.class_conditional else 0
    if fv.guidance_scale is not None and not num_classes:
        raise ValueError("--guidance_scale needs a class-conditional model; this one is "
                         "unconditional.")
    for name in ("class_label", "source_label"):
        label = fv[name].value
        if label is not None and not 0 <= label < num_classes:
            allowed = f"[0, {num_classes - 1}]" if num_classes else "none (unconditional model)"
            raise ValueError(f"--{name}={label} is out of range: this model's classes are "
                             f"{allowed}.")
    is_sr_model = config.model.cond_image_channels > 0
    if (task == "sr") != is_sr_model:
        raise ValueError("--task=sr needs a super-resolution model (model.cond_image_channels > 0)"
                         if task == "sr" else
                         f"This is a super-resolution model; it runs with --task=sr, not {task}.")
    sampler = fv.sampler or config.sample.sampler
    samplers.check_sampler(sampler, **TASK_TABLE[task].needs)
    if TASK_TABLE[task].sampler:
        samplers.check_options(sampler, sampler_overrides(fv))


def check_sd_flags(fv, pipe):
    """Check the parsed flags for a Stable Diffusion pipeline ``pipe``.

    Raises:
        ValueError: naming the flag, for: a task outside :data:`SD_TASKS`; a flag the task
            does not use, or one only class-conditional / UNet checkpoints use; no
            ``--prompt`` (``diffusionclip``: the checks of `_check_diffusionclip`, and no
            ``--prompt`` / ``--negative_prompt`` / ``--guidance_scale``); ``--steps`` /
            ``--num_samples`` below 1; a negative ``--guidance_scale``; a size that is not a
            multiple of the autoencoder's factor;
            ``--strength`` outside (0, 1]; ``--input`` missing for img2img / inpaint /
            diffusionclip, or not square; a sampler the task cannot use, or a sampler setting
            it does not read.
    """
    task = fv.task
    if task not in SD_TASKS:
        raise ValueError(f"--task={task} is not available for a Stable Diffusion checkpoint; "
                         f"expected one of {list(SD_TASKS)}.")
    _check_common(fv)
    for name in ("class_label", "source_label", "resize_input", "jump_length", "jump_n_sample"):
        if fv[name].present and not (name == "resize_input" and task == "diffusionclip"):
            raise ValueError(f"--{name} does not apply to a Stable Diffusion checkpoint.")
    if task == "diffusionclip":
        _check_diffusionclip(fv)
        for name in ("prompt", "negative_prompt", "guidance_scale"):
            if fv[name].present:
                raise ValueError(f"--{name} is not used by --task=diffusionclip (it edits "
                                 "from --source_text to --target_text without guidance).")
    elif fv.prompt is None:
        raise ValueError("--prompt is required for a Stable Diffusion checkpoint.")
    height, width = (pipe.sample_size if v is None else v for v in (fv.height, fv.width))
    try:
        pipelines.latent_shape(pipe, 1, height, width)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
    if not 0.0 < fv.strength <= 1.0:
        raise ValueError(f"--strength must lie in (0, 1], got {fv.strength}.")
    if task != "sample":
        if fv.input is None:
            raise ValueError(f"--task={task} needs --input (an image file).")
        if height != width:
            raise ValueError(f"--input is read as a square image: --height={height} and "
                             f"--width={width} must be equal.")
    if TASK_TABLE[task].sampler:
        sampler = pipelines.default_sampler(pipe, fv.sampler)
        samplers.check_sampler(sampler, **TASK_TABLE[task].needs)
        samplers.check_options(sampler, sampler_overrides(fv))


def run_sd_from_flags(fv, pipe, out_dir, config=None):
    """Run ``fv.task`` with a Stable Diffusion pipeline and write its outputs.

    ``config``: the stored config of a text-to-image workdir trained here (its
    ``sample.guidance_scale`` is the default scale), ``None`` for a Stable Diffusion directory
    (default 7.5).

    ``sample`` writes ``OUT/samples.png`` (grid) and ``OUT/samples.npz`` (``images`` uint8
    ``[N, H, W, 3]``, ``prompt``); ``img2img`` / ``inpaint`` write ``OUT/<task>.png`` and
    ``OUT/<task>.npz`` like the other tasks (:func:`write_outputs`). Flags must have passed
    :func:`check_sd_flags`.
    """
    n, task = fv.num_samples, fv.task
    prompts = [fv.prompt] * n
    overrides = sampler_overrides(fv)
    kwargs = dict(negative_prompts=fv.negative_prompt,
                  guidance_scale=guidance_scale(fv, config),
                  sampler=pipelines.default_sampler(pipe, fv.sampler),
                  num_steps=overrides.pop("num_steps", 50),
                  eta=overrides.pop("eta", None), option_overrides=overrides,
                  mesh=_data_mesh(), output="float")
    key = jax.random.key(fv.seed)
    if task == "sample":
        images = image_io.to_uint8(pipelines.text_to_image(
            pipe, prompts, key, height=fv.height, width=fv.width, **kwargs))
        if jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            image_io.save_png(os.path.join(out_dir, "samples.png"), image_io.image_grid(images))
            np.savez(os.path.join(out_dir, "samples.npz"), images=images,
                     prompt=np.asarray(fv.prompt))
            print(f"Wrote {n} samples to {out_dir}/samples.png and samples.npz")
        return {"images": images}
    size = pipe.sample_size if fv.height is None else fv.height
    channels = pipe.vae.encoder.conv_in.in_features
    images = np.repeat(image_io.read_image(fv.input, size, channels,
                                           resize=fv.resize_input)[None], n, axis=0)
    if task == "diffusionclip":
        return _latent_diffusionclip(fv, pipe, images, out_dir)
    results = {"input": images}
    if task == "img2img":
        out = pipelines.img2img(pipe, images, prompts, key, strength=fv.strength, **kwargs)
    else:
        hole = _sd_mask(fv, size)
        out = pipelines.inpaint(pipe, images, hole, prompts, key, **kwargs)
        results["mask"] = np.broadcast_to(2.0 * hole - 1.0, images.shape)
    results["output"] = out
    if jax.process_index() == 0:
        write_outputs(out_dir, task, results)
    return results


def _latent_diffusionclip(fv, pipe, images, out_dir):
    """``--task=diffusionclip`` on a latent pipeline (:func:`pipelines.diffusionclip`): writes
    ``OUT/diffusionclip.{png,npz}`` and prints the scores of `diffusionclip.edit_scores`."""
    clip = _load_clip(fv)
    res = pipelines.diffusionclip(
        pipe, images, clip, fv.source_text, fv.target_text, t0=fv.t0,
        num_inversion_steps=fv.steps or 20, num_decode_steps=fv.clip_decode_steps,
        finetune_steps=fv.finetune_steps, learning_rate=fv.clip_lr, id_weight=fv.id_weight)
    results = {"input": images, "reconstruction": res["reconstruction"],
               "output": res["output"]}
    samplers.check_finite(results["output"], "ddim")
    results.update(diffusionclip.edit_scores(*clip, images, res["output"], fv.source_text,
                                             fv.target_text))
    results = {name: np.asarray(value, np.float32) for name, value in results.items()}
    if jax.process_index() == 0:
        write_outputs(out_dir, "diffusionclip", results)
    _print_diffusionclip(results)
    return results


def guidance_scale(fv, config):
    """``--guidance_scale``, else the checkpoint's default
    (:func:`~diffusion_jax.denoisers.default_guidance_scale` of ``config``; 7.5, diffusers'
    default, for a Stable Diffusion directory, ``config=None``)."""
    if fv.guidance_scale is not None:
        return fv.guidance_scale
    if config is None:
        return denoisers.LEGACY_TEXT_GUIDANCE
    return denoisers.default_guidance_scale(config)


def _print_diffusionclip(results):
    scores = {name: float(np.mean(results[name])) for name in
              ("directional", "identity_l1", "target_score_input", "target_score_output")}
    print("diffusionclip " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))


def _check_diffusionclip(fv):
    """``--task=diffusionclip`` needs its texts and CLIP; counts >= 1, lr > 0, weight >= 0."""
    for name in ("source_text", "target_text", "clip_workdir"):
        if not fv[name].value:
            raise ValueError(f"--task=diffusionclip needs --{name}.")
    for name in ("finetune_steps", "clip_decode_steps"):
        if fv[name].value < 1:
            raise ValueError(f"--{name} must be >= 1, got {fv[name].value}.")
    if fv.clip_lr <= 0 or fv.id_weight < 0:
        raise ValueError(f"--clip_lr must be > 0 and --id_weight >= 0, got {fv.clip_lr} "
                         f"and {fv.id_weight}.")


def check_out_dir(path):
    """Fail before any work when outputs could not be written to ``path`` (it is a file, or
    its nearest existing ancestor is not a writable directory); creates nothing.

    Raises:
        ValueError: naming ``path`` and the problem.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out={path} is a file; it must be a directory (or not exist yet).")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out={path} cannot be created: {parent} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out={path} cannot be written: no write permission on {parent}.")


def _check_common(fv):
    """Checks shared by every kind of checkpoint: flags of other tasks, counts, a finite
    guidance scale."""
    for name, users in TASK_FLAGS.items():
        if fv[name].present and fv.task not in users:
            raise ValueError(f"--{name} is not used by --task={fv.task} (it applies to "
                             f"{', '.join(users)}).")
    if fv.steps is not None and fv.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {fv.steps}.")
    if fv.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {fv.num_samples}.")
    denoisers.check_guidance_scale(fv.guidance_scale, "--guidance_scale")


def _sd_mask(fv, size):
    """``[S, S, 1]`` hole (1 = regenerate) from ``--mask`` or ``--mask_region`` (default right)."""
    if fv.mask is not None:
        return (image_io.read_image(fv.mask, size, 1) > 0.0).astype(np.float32)
    return np.asarray(tasks.region_mask((1, size, size, 3), fv.mask_region or "right"))


def _data_mesh():
    """A data-parallel mesh over every device (the pipeline pads the batch to fit)."""
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))


def sampler_options(fv, config):
    """The run's :class:`~diffusion_jax.samplers.SamplerOptions`: config + flags, built once.

    ``--steps`` / ``--eta`` and ``--sampler_option=num_steps=`` / ``eta=`` are the same setting
    (giving both is an error); an option set to ``none`` is ``None``, not the config's value.

    Raises:
        ValueError: from :func:`sampler_overrides`, or an invalid value.
    """
    base = samplers.options_from_config(config)
    return samplers.make_options(**{**dataclasses.asdict(base), **sampler_overrides(fv)})


def sampler_overrides(fv):
    """The :class:`~diffusion_jax.samplers.SamplerOptions` fields the flags set: ``--steps``,
    ``--eta`` and every ``--sampler_option`` (:func:`~diffusion_jax.samplers.parse_options`).

    Raises:
        ValueError: a setting given twice (``--steps`` and ``num_steps=``), or one the
            checkpoint decides (``pred_type``: a model predicts what it was trained to;
            ``timesteps``).
    """
    parsed = samplers.parse_options(fv.sampler_option)
    if "pred_type" in parsed:
        raise ValueError("--sampler_option=pred_type=... cannot be set: the checkpoint decides "
                         "it (a model predicts what it was trained to predict).")
    if "timesteps" in parsed:
        raise ValueError("--sampler_option=timesteps=... cannot be set: use --steps (a "
                         "Stable Diffusion checkpoint's DDIM steps follow its scheduler).")
    for field, flag in (("num_steps", "steps"), ("eta", "eta")):
        if fv[flag].value is not None:
            if field in parsed:
                raise ValueError(f"--{flag} and --sampler_option={field}=... set the same "
                                 "thing; pass one.")
            parsed[field] = fv[flag].value
    return parsed


def run_task_from_flags(fv, model, sched, config, out_dir):
    """Run ``fv.task`` with a loaded model and write its outputs to ``out_dir``.

    Args:
        fv: parsed absl flags (those of :func:`define_flags` and ``run_sample.py``), checked
            by :func:`check_flags`.
        model: the model (``model(x, t, cond)``, ``num_classes`` attribute).
        sched: the model's :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        config: the model's config (``data``, ``diffusion``, ``sample``, ``sr``).
        out_dir: output directory.

    Returns:
        The dict of arrays :func:`~.tasks.run_task` returns.
    """
    data_cfg, sr_cfg = config.data, config.sr
    mask = None
    if fv.mask is not None:
        mask = image_io.read_image(fv.mask, data_cfg.image_size, 1, resize=fv.resize_input) > 0.0
    options = tasks.TaskOptions(
        sampler=fv.sampler or config.sample.sampler, sampler_options=sampler_options(fv, config),
        class_label=fv.class_label, guidance_scale=guidance_scale(fv, config),
        mask=None if mask is None else mask.astype(np.float32), mask_region=fv.mask_region,
        t0=fv.t0, ilvr_factor=fv.ilvr_factor, ilvr_t_min=fv.ilvr_t_min,
        sr_factor=sr_cfg.factor if fv.sr_factor is None else fv.sr_factor,
        sr_method=fv.sr_method or sr_cfg.upsample_method,
        sr_aug_t=sr_cfg.sample_aug_t if fv.sr_aug_t is None else fv.sr_aug_t,
        jump_length=fv.jump_length, jump_n_sample=fv.jump_n_sample,
        source_label=fv.source_label, clip=_load_clip(fv),
        source_text=fv.source_text or "", target_text=fv.target_text or "",
        finetune_steps=fv.finetune_steps, clip_lr=fv.clip_lr, id_weight=fv.id_weight,
        clip_decode_steps=fv.clip_decode_steps)
    images = load_inputs(fv.input, fv.num_samples, data_cfg, resize=fv.resize_input)
    results = tasks.run_task(fv.task, model, sched, images, options, jax.random.key(fv.seed),
                             diffusion=config.diffusion)
    samplers.check_finite(results["output"], options.sampler)
    write_outputs(out_dir, fv.task, results)
    if fv.task == "diffusionclip":
        _print_diffusionclip(results)
    return results


def _load_clip(fv):
    """``(CLIPModel, tokenizer)`` of ``--clip_workdir`` for diffusionclip, else ``None``."""
    if fv.task != "diffusionclip":
        return None
    from diffusion_jax import metrics_clip  # pylint: disable=g-import-not-at-top
    return metrics_clip.load_clip(fv.clip_workdir)


def load_inputs(path, num_samples, data_cfg, *, resize=False):
    """Input images ``[B, S, S, C]`` in [-1, 1]: the image at ``path`` repeated
    ``num_samples`` times, or the first ``num_samples`` dataset images when ``path`` is None.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if its size is not the model's and ``resize`` is not set.
    """
    if path is None:
        images, _ = data.load_eval_images(data_cfg, num_samples)
        return images
    image = image_io.read_image(path, data_cfg.image_size, data_cfg.num_channels, resize=resize)
    return np.repeat(image[None], num_samples, axis=0)


def write_outputs(out_dir, task, results):
    """Write ``OUT/<task>.png`` (one row per array: input, [mask / low_res / reconstruction,]
    output) and
    ``OUT/<task>.npz``."""
    os.makedirs(out_dir, exist_ok=True)
    order = [name for name in ("input", "mask", "low_res", "reconstruction", "output")
             if name in results]
    rows = np.concatenate([results[name] for name in order])
    grid = image_io.image_grid(image_io.to_uint8(rows), num_cols=results["input"].shape[0])
    image_io.save_png(os.path.join(out_dir, f"{task}.png"), grid)
    np.savez(os.path.join(out_dir, f"{task}.npz"), **results)
    print(f"Wrote {task} results ({', '.join(order)}) to {out_dir}/{task}.png and {task}.npz")
