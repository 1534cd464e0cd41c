"""A diffusers Stable Diffusion pipeline directory -> converted NNX components, in one call.

Source layout (diffusers ``save_pretrained``)::

    model_index.json                      component -> [library, class]
    unet/          config.json + diffusion_pytorch_model[.fp16].{safetensors,bin}
    vae/           config.json + diffusion_pytorch_model[.fp16].{safetensors,bin}
    text_encoder/  config.json + model[.fp16].safetensors | pytorch_model.bin
    tokenizer/     tokenizer.json | vocab.json + merges.txt, tokenizer_config.json
    scheduler/     scheduler_config.json

`convert_pipeline` writes the same five subdirectories in this package's format (orbax
``params`` + ``config.json`` per model; the tokenizer as ``tokenizer.json``; the validated
scheduler config) plus a ``model_index.json`` tagged with `FORMAT`. `load_pipeline` reads
either layout and returns a `StableDiffusion`.

Command line (:mod:`diffusion_jax.cli.convert`)::

    python -m diffusion_jax.convert.pipeline --src SD_DIR --out OUT_DIR
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any, NamedTuple

from diffusion_jax.convert import common, scheduler, text_encoder, unet_cond, vae
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.cond_unet import CondUNet
from diffusion_jax.models.text_encoder import CLIPTextModel
from diffusion_jax.clip_tokenizer import CLIPTokenizer, load_tokenizer

FORMAT = "diffusion_jax.stable_diffusion/1"
INDEX_FILE = "model_index.json"
SCHEDULER_FILE = "scheduler_config.json"
# component -> the (library, class) diffusers must have written for it.
_EXPECTED = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
             "text_encoder": ("transformers", "CLIPTextModel"),
             "tokenizer": ("transformers", "CLIPTokenizer")}
# Pipeline classes made of exactly these components (SD 1.x / 2.x; inpainting checkpoints have
# a 9-channel UNet, SDXL a second text encoder: neither is one of these).
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# Components a text-to-image run does not need (left unconverted).
_UNUSED = {"safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker"}


class StableDiffusion(NamedTuple):
    """The converted parts of an SD pipeline.

    Attributes:
        unet: `CondUNet`, ``unet(z_t, t, {"text": states}) -> prediction``.
        vae: `AutoencoderKL`; latents are ``vae.encode(x).mode() * vae.scaling_factor``.
        text_encoder: `CLIPTextModel`, ``text_encoder(ids).last_hidden_state`` is ``cond["text"]``.
        tokenizer: `CLIPTokenizer`, ``tokenizer(prompts) -> [B, 77]`` ids.
        scheduler: `scheduler.SchedulerSettings` (betas, prediction type, timestep spacing, ...).
        info: ``{"unet": record, "vae": record, "text_encoder": record,
            "scheduler_config": dict, "pipeline_class": str}`` (records hold the model kwargs and
            ``sample_size``).
    """
    unet: CondUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: scheduler.SchedulerSettings
    info: dict[str, Any]


def load_pipeline(path: str | os.PathLike, **overrides) -> StableDiffusion:
    """Loads a converted pipeline directory, or converts a diffusers one in memory.

    Args:
        path: a directory written by `convert_pipeline`, or a diffusers SD pipeline directory.
        **overrides: model keyword arguments for the three networks, e.g. ``dtype=jnp.bfloat16``.

    Raises:
        FileNotFoundError: ``model_index.json`` or a component file is missing.
        ValueError: a component or field that cannot be mapped (named).
    """
    path = os.fspath(path)
    index = common.read_json(os.path.join(path, INDEX_FILE), "pipeline index")
    if index.get("format") != FORMAT:
        return load_diffusers_pipeline(path, **overrides)
    unet, unet_rec = unet_cond.load_converted(os.path.join(path, "unet"), **overrides)
    ae, vae_rec = vae.load_converted(os.path.join(path, "vae"), **overrides)
    te, te_rec = text_encoder.load_converted(os.path.join(path, "text_encoder"), **overrides)
    return _assemble(path, (unet, unet_rec), (ae, vae_rec), (te, te_rec),
                     index.get("pipeline_class"))


def load_diffusers_pipeline(path: str | os.PathLike, **overrides) -> StableDiffusion:
    """Reads a diffusers SD pipeline directory into a `StableDiffusion` (float32 parameters).

    Raises:
        FileNotFoundError: ``model_index.json`` or a component file is missing.
        ValueError: the index names a component class we cannot convert, or a component's
            config field / weight cannot be mapped.
    """
    path = os.fspath(path)
    index = common.read_json(os.path.join(path, INDEX_FILE), "pipeline index")
    _check_index(index, path)
    unet, unet_rec = unet_cond.load_diffusers(os.path.join(path, "unet"), **overrides)
    ae, vae_rec = vae.load_diffusers(os.path.join(path, "vae"), **overrides)
    te, te_rec = text_encoder.load_transformers(os.path.join(path, "text_encoder"), **overrides)
    return _assemble(path, (unet, unet_rec), (ae, vae_rec), (te, te_rec),
                     index.get("_class_name"))


def convert_pipeline(src: str | os.PathLike, out: str | os.PathLike) -> StableDiffusion:
    """Converts the diffusers pipeline at ``src`` and writes it to ``out`` (see the module doc).

    Everything is written into a temporary directory beside ``out`` that is renamed to ``out``
    only once complete, so a failure never leaves a half-written ``out``. An existing ``out``
    is replaced only when it is empty or an earlier conversion (its index carries `FORMAT`).

    Returns:
        The loaded `StableDiffusion` (float32).

    Raises:
        ValueError: ``src`` and ``out`` are the same directory or one lies inside the other,
            or ``out`` holds something other than a converted pipeline; nothing is written.
        FileNotFoundError, ValueError: from `load_diffusers_pipeline`.
    """
    src, out = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(out))
    _check_out(src, out)
    sd = load_diffusers_pipeline(src)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        for name in ("unet", "vae", "text_encoder"):
            common.save_component(os.path.join(tmp, name), getattr(sd, name), sd.info[name])
        sd.tokenizer.save(os.path.join(tmp, "tokenizer"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        shutil.copyfile(os.path.join(src, "scheduler", SCHEDULER_FILE),
                        os.path.join(tmp, "scheduler", SCHEDULER_FILE))
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"format": FORMAT, "pipeline_class": sd.info["pipeline_class"],
                       "source": src}, f, indent=2)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sd


def _check_out(src: str, out: str) -> None:
    """Refuses an ``out`` that is ``src``, inside it or around it (after resolving links), or
    an existing directory that is neither empty nor an earlier conversion."""
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if real_src == real_out:
        raise ValueError(f"--out {out} is the source directory --src {src}; converting in place "
                         "would overwrite the source: choose a new directory")
    for inner, outer, what in ((real_out, real_src, "inside --src"),
                               (real_src, real_out, "contains --src")):
        if os.path.commonpath([inner, outer]) == outer:
            raise ValueError(f"--out {out} {what} {src}; choose a directory outside the source")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise ValueError(f"--out {out} exists and is not a directory")
        if os.listdir(out) and not _is_converted(out):
            raise ValueError(f"--out {out} exists and is not a converted pipeline (no "
                             f"{INDEX_FILE} with format {FORMAT!r}); choose a new or empty "
                             "directory")


def _is_converted(path: str) -> bool:
    """Whether ``path`` holds a pipeline written by `convert_pipeline`."""
    try:
        return common.read_json(os.path.join(path, INDEX_FILE), "index").get("format") == FORMAT
    except (FileNotFoundError, ValueError):
        return False


def _replace_dir(new: str, out: str) -> None:
    """Renames the complete directory ``new`` to ``out``; an existing ``out`` (checked by
    `_check_out`) is first renamed aside and deleted only after the swap."""
    old = None
    if os.path.lexists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _assemble(path, unet, vae_, text_enc, pipeline_class) -> StableDiffusion:
    """A `StableDiffusion` from loaded ``(model, record)`` pairs plus the directory's tokenizer
    and scheduler config."""
    sched_config = common.read_json(os.path.join(path, "scheduler", SCHEDULER_FILE),
                                    "scheduler config")
    return StableDiffusion(
        unet[0], vae_[0], text_enc[0], load_tokenizer(os.path.join(path, "tokenizer")),
        scheduler.scheduler_settings(sched_config),
        {"unet": unet[1], "vae": vae_[1], "text_encoder": text_enc[1],
         "scheduler_config": sched_config, "pipeline_class": pipeline_class})


def _check_index(index: dict[str, Any], path: str) -> None:
    """A supported pipeline class; every component we need is present with the class we
    convert; unknown extras raise."""
    cls = index.get("_class_name", PIPELINE_CLASSES[0])
    if cls not in PIPELINE_CLASSES:
        raise ValueError(f"{path}/{INDEX_FILE}: _class_name={cls!r} is not supported; expected "
                         f"one of {list(PIPELINE_CLASSES)} (Stable Diffusion 1.x / 2.x)")
    for name, (library, cls) in _EXPECTED.items():
        entry = index.get(name)
        if not entry or list(entry) != [library, cls]:
            raise ValueError(f"{path}/{INDEX_FILE}: component {name!r} is {entry!r}; expected "
                             f"{[library, cls]}")
    entry = index.get("scheduler")
    if not entry or list(entry) not in [["diffusers", c] for c in scheduler.SCHEDULER_CLASSES]:
        raise ValueError(f"{path}/{INDEX_FILE}: component 'scheduler' is {entry!r}; expected "
                         f"['diffusers', one of {list(scheduler.SCHEDULER_CLASSES)}]")
    extra = sorted(set(index) - set(_EXPECTED) - {"scheduler"} - _UNUSED
                   - {"_class_name", "_diffusers_version", "_name_or_path"})
    if extra:
        raise ValueError(f"{path}/{INDEX_FILE}: unsupported pipeline component(s) {extra}")


if __name__ == "__main__":  # the command line lives in the CLI layer
    from diffusion_jax.cli import convert as cli_convert  # pylint: disable=g-import-not-at-top

    cli_convert.pipeline(sys.argv[1:])
