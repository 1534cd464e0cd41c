"""Samples from a trained model into ``OUT/samples.png`` (grid) and ``OUT/samples.npz``.

    python run_sample.py --workdir=DIR --sampler=ddim --steps=100 --num_samples=64 --out=OUT
    python run_sample.py --workdir=DIR --task=sdedit --input=img.png --t0=0.5 --out=OUT

The model and diffusion settings come from the config stored in the checkpoint, and the
first EMA of the parameters is used.

``--checkpoint=SD_DIR`` with a ``model_index.json`` is a Stable Diffusion pipeline (diffusers
layout, or converted by ``python -m diffusion_jax.convert.pipeline``); its diffusion settings
come from its ``scheduler/scheduler_config.json`` and it runs text-to-image::

    python run_sample.py --checkpoint=SD_DIR --out=OUT --prompt="a photo of a cat" \
        --negative_prompt="blurry" --guidance_scale=7.5 --steps=50 --num_samples=4 --seed=0
    python run_sample.py --checkpoint=SD_DIR --out=OUT --prompt="..." --task=img2img \
        --input=photo.png --strength=0.6
    python run_sample.py --checkpoint=SD_DIR --out=OUT --prompt="..." --task=inpaint \
        --input=photo.png --mask=hole.png

A ``--workdir`` of a ``latent_diffusion`` run (``configs/fashion_t2i.py``, with its frozen
autoencoder and CLIP stages) runs the same text-to-image tasks and flags::

    python run_sample.py --workdir=demo_t2i/t2i --out=OUT --prompt="an ankle boot" \
        --guidance_scale=3 --steps=50 --num_samples=8

Otherwise ``--checkpoint=PATH`` loads a converted diffusers ``UNet2DModel`` checkpoint
(``diffusion_jax.convert.unet2d``); its diffusion settings come from ``--config``
(default ``configs/default.py``: DDPM's linear schedule, T = 1000,
eps prediction), e.g. ``--config.diffusion.num_timesteps=...``, and its image size,
channels and classes from the checkpoint. ``samples.npz`` holds ``images``
(uint8 [N, H, W, C]) and ``labels`` (int32 [N], -1 = unconditional).

``--task`` other than ``sample`` runs an application (SDEdit, inpainting, ILVR,
super-resolution, inversion) instead; see ``diffusion_jax/cli/sample.py`` for its flags.
Bad flags, inputs or a non-finite result end with a one-line error and exit status 1.
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags as absl_flags

from diffusion_jax import (checkpoint, conditioning, generate, image_io, loading, objectives,
                           pipelines, sharding, stage_pipeline)
from diffusion_jax.cli import flags
from diffusion_jax.cli import sample as cli

_WORKDIR = flags.define_workdir()
_CHECKPOINT = flags.define_checkpoint()
_STEP = flags.define_step()
_OUT = flags.define_out()
_CONFIG = flags.define_config(
    help_text="Diffusion and sampling settings of a --checkpoint model (--workdir uses its own).")
absl_flags.mark_flags_as_required(["out"])
flags.define_compilation_cache()
cli.define_flags()


def main():
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("Pass exactly one of --workdir and --checkpoint.")
    if _WORKDIR.value is not None and flags.FLAGS["config"].present:
        raise app.UsageError("--config applies to --checkpoint only; --workdir uses its own.")
    cli.check_out_dir(_OUT.value)
    if _is_sd_pipeline(_CHECKPOINT.value):
        _sample_sd()
    elif _is_text_to_image_workdir(_WORKDIR.value):
        _sample_trained_t2i()
    else:
        _sample()


def _is_sd_pipeline(path):
    """Whether ``path`` is a Stable Diffusion pipeline directory (has ``model_index.json``)."""
    return path is not None and os.path.isfile(os.path.join(path, "model_index.json"))


def _sample_sd():
    """Stable Diffusion: settings from the checkpoint's scheduler config, never --config."""
    fv = flags.FLAGS
    if fv["config"].present or any(arg.startswith("--config") for arg in sys.argv[1:]):
        raise ValueError("--config does not apply to a Stable Diffusion checkpoint: its "
                         "diffusion settings come from scheduler/scheduler_config.json.")
    if fv.step is not None:
        raise ValueError("--step applies to --workdir only.")
    dtype = jnp.bfloat16 if fv.dtype == "bfloat16" else None
    pipe = pipelines.load(_CHECKPOINT.value, dtype=dtype)
    cli.check_sd_flags(fv, pipe)
    cli.run_sd_from_flags(fv, pipe, _OUT.value)


def _is_text_to_image_workdir(workdir):
    """Whether ``workdir`` holds a ``latent_diffusion`` run (configs/fashion_t2i.py)."""
    if workdir is None:
        return False
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    return objectives.objective_of(checkpoint.load_config(manager)) == "latent_diffusion"


def _sample_trained_t2i():
    """Text-to-image with the three stages trained here, through the same SD flag layer."""
    fv = flags.FLAGS
    pipe, config = stage_pipeline.load_pipeline_and_config(_WORKDIR.value, step=fv.step)
    cli.check_sd_flags(fv, pipe)
    cli.run_sd_from_flags(fv, pipe, _OUT.value, config)


def _sample():
    """Load, check the flags against the model, run the task and write its outputs."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    loaded = loading.load(workdir=_WORKDIR.value, checkpoint_path=_CHECKPOINT.value,
                          step=_STEP.value, mesh=mesh,
                          config=None if _CHECKPOINT.value is None else _CONFIG.value)
    config = loaded.config
    cli.check_flags(flags.FLAGS, config)
    if flags.FLAGS.task != "sample":
        cli.run_task_from_flags(flags.FLAGS, loaded.model, loaded.schedule, config, _OUT.value)
        return
    fv = flags.FLAGS
    n = fv.num_samples
    cond = conditioning.class_condition(fv.class_label, n)
    sample_fn = generate.make_sample_fn(
        loaded.graphdef, loaded.schedule, config, mesh, num_samples=n, sampler=fv.sampler,
        options=cli.sampler_options(fv, config))
    images = image_io.to_uint8(sample_fn(
        loaded.params, jax.random.key(fv.seed), cond,
        guidance_scale=fv.guidance_scale))
    if jax.process_index() == 0:
        os.makedirs(_OUT.value, exist_ok=True)
        image_io.save_png(os.path.join(_OUT.value, "samples.png"), image_io.image_grid(images))
        np.savez(os.path.join(_OUT.value, "samples.npz"), images=images,
                 labels=np.full((n,), -1, np.int32) if cond is None
                 else np.asarray(cond["label"]))
        print(f"Wrote {n} samples to {_OUT.value}/samples.png and samples.npz")


if __name__ == "__main__":
    flags.run(main, prog="run_sample.py")
