"""Samples from a trained model into ``OUT/samples.png`` (grid) and ``OUT/samples.npz``.

    python run_sample.py --workdir=DIR --sampler=ddim --steps=100 --num_samples=64 --out=OUT
    python run_sample.py --workdir=DIR --task=sdedit --input=img.png --t0=0.5 --out=OUT

The model and diffusion settings come from the config stored in the checkpoint, and the
first EMA of the parameters is used. ``--checkpoint=PATH`` instead loads a converted
diffusers checkpoint (``diffusion_jax.models.convert_diffusers``); its diffusion settings
come from ``--config`` (default ``configs/default.py``: DDPM's linear schedule, T = 1000,
eps prediction), e.g. ``--config.diffusion.num_timesteps=...``, and its image size,
channels and classes from the checkpoint. ``samples.npz`` holds ``images``
(uint8 [N, H, W, C]) and ``labels`` (int32 [N], -1 = unconditional).

``--task`` other than ``sample`` runs an application (SDEdit, inpainting, ILVR,
super-resolution, inversion) instead; see ``diffusion_jax/applications/cli.py`` for its flags.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from diffusion_jax import checkpoint, compilation_cache, generate, schedules, sharding, train
from diffusion_jax.applications import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to load the latest checkpoint of.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted diffusers checkpoint instead.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(generate.SAMPLERS),
                             "Sampler (default: config.sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps / Langevin levels (default: config).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: config.sample.eta).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Number of images.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_CLASS_LABEL = flags.DEFINE_integer("class_label", None, "Class of every sample (conditional models).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 0.0, "Classifier-free guidance weight w.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Diffusion and sampling settings of a --checkpoint model (--workdir uses its own).")
flags.mark_flags_as_required(["out"])
_JIT_CACHE = flags.DEFINE_string("compilation_cache_dir", None, compilation_cache.FLAG_HELP)
cli.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("Pass exactly one of --workdir and --checkpoint.")
    if _WORKDIR.value is not None and flags.FLAGS["config"].present:
        raise app.UsageError("--config applies to --checkpoint only; --workdir uses its own.")
    compilation_cache.enable(_JIT_CACHE.value)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    graphdef, params, config = _load(mesh)
    sched = schedules.schedule_from_config(config.diffusion)
    if flags.FLAGS.task != "sample":
        cli.run_task_from_flags(flags.FLAGS, nnx.merge(graphdef, params), sched, config,
                                _OUT.value)
        return
    n = _NUM_SAMPLES.value
    labels = None if _CLASS_LABEL.value is None else np.full((n,), _CLASS_LABEL.value, np.int32)
    sample_fn = generate.make_sample_fn(
        graphdef, sched, config, mesh, num_samples=n, sampler=_SAMPLER.value,
        num_steps=_STEPS.value, eta=_ETA.value, guidance_scale=_GUIDANCE.value)
    images = generate.to_uint8(sample_fn(params, jax.random.key(_SEED.value), labels))
    if jax.process_index() == 0:
        os.makedirs(_OUT.value, exist_ok=True)
        generate.save_png(os.path.join(_OUT.value, "samples.png"), generate.image_grid(images))
        np.savez(os.path.join(_OUT.value, "samples.npz"), images=images,
                 labels=np.full((n,), -1, np.int32) if labels is None else labels)
        print(f"Wrote {n} samples to {_OUT.value}/samples.png and samples.npz")


def _load(mesh):
    """``(graphdef, params, config)`` from --workdir (first EMA) or --checkpoint."""
    if _CHECKPOINT.value is not None:
        return _load_converted(_CHECKPOINT.value, _CONFIG.value, mesh)
    manager = checkpoint.make_manager(_WORKDIR.value, create=False, async_checkpointing=False)
    config = checkpoint.load_config(manager, _STEP.value)
    graphdef, abstract, _ = train.abstract_train_state(config, train.make_optimizer(config), mesh)
    state, _ = checkpoint.restore(manager, abstract, _STEP.value)
    params = state.ema_params[0] if state.ema_params else state.params
    return graphdef, params, config


def _load_converted(path, config, mesh):
    """``(graphdef, params, config)`` of a converted diffusers checkpoint, the params
    replicated over ``mesh``; ``config``'s ``data`` size, channels and classes are set from
    the model's ``unet.json``."""
    from diffusion_jax.models import convert_diffusers  # pylint: disable=g-import-not-at-top
    graphdef, params = nnx.split(convert_diffusers.load_converted(path))
    params = jax.device_put(params, sharding.replicated(mesh))
    with open(os.path.join(path, "unet.json")) as f:
        kwargs = json.load(f)["kwargs"]
    config.data.image_size = kwargs["image_size"]
    config.data.num_channels = kwargs["in_channels"]
    config.data.num_classes = kwargs["num_classes"]
    config.model.class_conditional = kwargs["num_classes"] > 0
    return graphdef, params, config


if __name__ == "__main__":
    app.run(main)
