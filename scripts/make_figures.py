"""README figures of the applications, from a trained digits model.

    python scripts/make_figures.py --workdir=demo/workdir --out=docs/figures \
        [--sr_workdir=demo/sr_workdir] [--classifier_guidance \
         --classifier_config=configs/classifier_digits.py]

Writes, each a grid whose rows are labelled in the file name's README caption:

* ``sdedit.png``      rows: real digit, guide (its blocky 4x4 version), SDEdit at t0 = 0.1, 0.2, 0.3.
* ``inpaint.png``     rows: input with the right half removed, replacement, RePaint (5 resamplings).
* ``ilvr.png``        rows: reference, ILVR samples with N = 2, 4, 8.
* ``inversion.png``   rows: input, DDIM reconstruction (and, for class-conditional models, the
  inverted latent decoded as the next class).
* ``cfg.png``         class-conditional models: one row per guidance weight w = 0, 1, 3
  (columns: classes 0-9).
* ``classifier_guidance.png`` unconditional models with ``--classifier_guidance``: rows:
  unguided samples, then samples guided toward each class 0-9 (scale 3) by a noisy
  classifier trained here as ``--classifier_config`` says.
* ``super_resolution.png`` with ``--sr_workdir``: rows: 8x8 input (upsampled), SR3 output, truth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags
from ml_collections import config_flags

from diffusion_jax import (classifier_training, conditioning, data, denoisers, guidance,
                           image_io, loading, samplers)
from diffusion_jax.applications import common, tasks
from diffusion_jax.cli import flags

_WORKDIR = flags.define_workdir("Trained digits model workdir.", "demo/workdir")
_SR_WORKDIR = absl_flags.DEFINE_string("sr_workdir", None,
                                       "Trained SR3 workdir (configs/sr_digits.py).")
_OUT = flags.define_out("Output directory for the PNGs.", "docs/figures")
_NUM = absl_flags.DEFINE_integer("num", 8, "Images per row.")
_STEPS = flags.define_steps("DDIM steps.", 50)
_CLASSIFIER = absl_flags.DEFINE_bool(
    "classifier_guidance", False, "Train a noisy classifier and draw classifier-guided samples.")
_CLASSIFIER_CONFIG = config_flags.DEFINE_config_file(
    "classifier_config", "configs/classifier_digits.py", "Noisy-classifier config.")
_SEED = flags.define_seed("Seed.")


def main():
    os.makedirs(_OUT.value, exist_ok=True)
    loaded = loading.load(workdir=_WORKDIR.value)
    model, config, sched = loaded.model, loaded.config, loaded.schedule
    images, labels = data.load_eval_images(config.data, _NUM.value)
    key = jax.random.key(_SEED.value)

    options = _options(config)

    def run(task, inputs=images, **option_overrides):
        task_options = tasks.TaskOptions(**{"sampler": "ddim", "sampler_options": options,
                                            **option_overrides})
        return tasks.run_task(task, model, sched, inputs, task_options, key,
                              diffusion=config.diffusion)

    factor = max(1, config.data.image_size // 4)  # the guide keeps 4x4 blocks of the digit
    blocky = np.asarray(common.nearest_upsample(common.area_downsample(images, factor), factor))
    rows = [images, blocky] + [run("sdedit", blocky, t0=t0)["output"] for t0 in (0.1, 0.2, 0.3)]
    save_rows("sdedit.png", rows)

    plain = run("inpaint", mask_region="right")
    repaint = run("inpaint", mask_region="right", sampler="ddpm", jump_length=10, jump_n_sample=5)
    save_rows("inpaint.png", [plain["input"], plain["output"], repaint["output"]])

    save_rows("ilvr.png", [images] + [run("ilvr", ilvr_factor=n)["output"] for n in (2, 4, 8)])

    rows = [images, run("invert")["output"]]
    if model.num_classes:
        edited = [run("invert", images[i:i + 1], source_label=int(labels[i]),
                      class_label=(int(labels[i]) + 1) % model.num_classes)["output"]
                  for i in range(len(images))]
        rows.append(np.concatenate(edited))
        save_rows("cfg.png", [cfg_row(model, sched, config, s, key) for s in (1.0, 2.0, 4.0)])
    save_rows("inversion.png", rows)

    if not model.num_classes and _CLASSIFIER.value:
        save_rows("classifier_guidance.png", classifier_rows(model, sched, config, key))

    if _SR_WORKDIR.value:
        sr_loaded = loading.load(workdir=_SR_WORKDIR.value)
        sr_config = sr_loaded.config
        hi, _ = data.load_eval_images(sr_config.data, _NUM.value)
        sr_options = tasks.TaskOptions(
            sampler="ddim", sampler_options=_options(sr_config), sr_factor=sr_config.sr.factor,
            sr_method=sr_config.sr.upsample_method, sr_aug_t=sr_config.sr.sample_aug_t)
        out = tasks.run_task("sr", sr_loaded.model, sr_loaded.schedule, hi, sr_options, key,
                             diffusion=sr_config.diffusion)
        save_rows("super_resolution.png", [out["low_res"], out["output"], hi])


def _options(config):
    """DDIM options of ``config`` with ``--steps`` steps and x0 clipped to [-1, 1]."""
    return samplers.options_from_config(config, num_steps=_STEPS.value, clip_x0=True)


def cfg_row(model, sched, config, scale, key):
    """One sample per class (0..K-1) with classifier-free guidance scale ``s = scale``."""
    labels = jnp.arange(model.num_classes, dtype=jnp.int32)
    denoise = denoisers.build_denoiser(model, conditioning.label_condition(labels),
                                       guidance_scale=scale,
                                       diffusion=config.diffusion, schedule=sched)
    shape = (model.num_classes, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    x_T = jax.random.normal(jax.random.fold_in(key, 1), shape)
    return np.asarray(samplers.run("ddim", denoise, sched, x_T, key, _options(config)))


def classifier_rows(model, sched, config, key):
    """Unguided samples, then one row per class guided by a freshly trained noisy classifier."""
    images, labels = data.load_eval_images(config.data, None)
    classifier, _ = classifier_training.train_noisy_classifier_from_config(
        _CLASSIFIER_CONFIG.value, images, labels)
    log_prob = guidance.classifier_log_prob_fn(classifier)
    uncond = denoisers.build_denoiser(model, diffusion=config.diffusion, schedule=sched)
    shape = (_NUM.value, config.data.image_size, config.data.image_size, config.data.num_channels)
    x_T = jax.random.normal(jax.random.fold_in(key, 3), shape)
    sample = lambda denoise: np.asarray(samplers.run("ddim", denoise, sched, x_T, key,
                                                     _options(config)))
    rows = [sample(uncond)]
    for label in range(int(labels.max()) + 1):
        rows.append(sample(guidance.classifier_guided_denoiser(
            uncond, log_prob, label, sched, 3.0)))
    return rows


def save_rows(name, rows):
    """Stack ``rows`` (each ``[n, H, W, C]`` in [-1, 1]) into one grid PNG under ``--out``."""
    n = max(len(r) for r in rows)
    padded = [np.concatenate([r, -np.ones((n - len(r),) + r.shape[1:], np.float32)]) for r in rows]
    grid = image_io.image_grid(image_io.to_uint8(np.concatenate(padded)), num_cols=n)
    image_io.save_png(os.path.join(_OUT.value, name), grid)
    print(f"wrote {os.path.join(_OUT.value, name)}")


if __name__ == "__main__":
    flags.run(main, prog="make_figures.py")
