"""Command lines of the checkpoint converters (:mod:`diffusion_jax.convert`)::

    python -m diffusion_jax.convert.unet2d --src DIR_OR_FILE --out DIR
    python -m diffusion_jax.convert.pipeline --src SD_DIR --out OUT_DIR
    python -m diffusion_jax.convert.dit --src DIT_DIR --out OUT_DIR

The converter modules' ``__main__`` blocks call :func:`unet2d` / :func:`pipeline` /
:func:`dit` with ``sys.argv[1:]``; tests call them with a list. A bad source or output ends with one line
``convert.<name>: error: ...`` and exit status 1.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags as absl_flags

from diffusion_jax.cli import flags
from diffusion_jax.convert import dit as convert_dit
from diffusion_jax.convert import pipeline as convert_pipeline
from diffusion_jax.convert import unet2d as convert_unet2d


def unet2d(argv: Sequence[str]) -> None:
    """``--src`` a diffusers ``UNet2DModel`` directory (config.json + weights) or weights
    file, ``--out`` the output directory (:func:`diffusion_jax.convert.unet2d.convert`)."""
    def main(fv):
        kwargs = convert_unet2d.convert(fv.src, fv.out)
        print(f"wrote {fv.out}: UNet({json.dumps(kwargs)})")

    flags.run_in_process(_define("diffusers UNet2DModel directory (config.json + weights) or "
                                 "weights file"), main, argv, prog="convert.unet2d",
                         doc=convert_unet2d.__doc__, errors=(OSError,))


def pipeline(argv: Sequence[str]) -> None:
    """``--src`` a diffusers Stable Diffusion directory, ``--out`` the output directory
    (:func:`diffusion_jax.convert.pipeline.convert_pipeline`)."""
    def main(fv):
        sd = convert_pipeline.convert_pipeline(fv.src, fv.out)
        kwargs = sd.info["unet"]["kwargs"]
        print(f"wrote {fv.out}: unet {kwargs['block_out_channels']} "
              f"x{kwargs['layers_per_block']}, prediction {sd.scheduler.pred_type}, "
              f"tokenizer length {sd.tokenizer.max_length}")

    flags.run_in_process(_define("diffusers SD pipeline directory"), main, argv,
                         prog="convert.pipeline", doc=convert_pipeline.__doc__,
                         errors=(OSError,))


def dit(argv: Sequence[str]) -> None:
    """``--src`` a diffusers ``DiTTransformer2DModel`` directory (or a ``DiTPipeline`` directory
    with ``transformer/``), ``--out`` the output directory
    (:func:`diffusion_jax.convert.dit.convert`)."""
    def main(fv):
        kwargs = convert_dit.convert(fv.src, fv.out)
        print(f"wrote {fv.out}: DiT({json.dumps(kwargs)})")

    flags.run_in_process(_define("diffusers DiTTransformer2DModel directory (config.json + "
                                 "weights)"), main, argv, prog="convert.dit",
                         doc=convert_dit.__doc__, errors=(OSError,))


def _define(src_help: str):
    """``define(flag_values)`` of the converters' two required flags."""
    def define(fv):
        absl_flags.DEFINE_string("src", None, src_help, flag_values=fv)
        flags.define_out(flag_values=fv)
        absl_flags.mark_flags_as_required(["src", "out"], flag_values=fv)
    return define
