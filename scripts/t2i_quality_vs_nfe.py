"""Sample quality vs network evaluations (NFE) of the solvers on the trained Fashion-MNIST
text-to-image model (the latent diffusion stage of `make demo-t2i`).

    python scripts/t2i_quality_vs_nfe.py --workdir=demo_t2i/t2i --out=benchmarks/results \
        [--samplers=ddim,dpm_solver_pp,edm_heun] [--nfe=5,10,20,50] [--per_class=30]

For every solver and target NFE, ``per_class`` images of each prompt "a photo of <class>" are
generated from the same latent noise with classifier-free guidance ``--guidance_scale`` (one
NFE = one guided denoiser evaluation, i.e. one conditional + one unconditional UNet pass):
each solver gets the most steps whose count of evaluations, as its registry entry gives it
(:func:`diffusion_jax.samplers.num_evaluations`), stays within ``N`` (DDIM and DPM-Solver++
(2M): ``N`` steps; EDM's Heun: ``(N + 1) // 2``, ``2 steps - 1`` evaluations). Scores as in ``scripts/t2i_guidance_sweep.py``: prompt faithfulness and
fashion-FD (:class:`diffusion_jax.fashion_metric.FashionMetric`: 50 pixel PCs + 10 ridge
logits, no Inception) and the CLIP score with the workdir's own CLIP.

Writes ``OUT/t2i_quality_vs_nfe.json`` and ``OUT/t2i_quality_vs_nfe.md``.
"""
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import numpy as np
from absl import flags as absl_flags

from diffusion_jax import (captions, fashion_metric, idx, metrics_clip, pipelines, samplers,
                           stage_pipeline)
from diffusion_jax.cli import flags

flags.define_workdir("latent_diffusion workdir.")
flags.define_out(default="benchmarks/results")
absl_flags.DEFINE_string("samplers", "ddim,dpm_solver_pp,edm_heun", "Samplers, comma-separated.")
absl_flags.DEFINE_string("nfe", "5,10,20,50", "Target NFEs, comma-separated.")
absl_flags.DEFINE_float("guidance_scale", 3.0, "Guidance scale (SD convention).")
absl_flags.DEFINE_integer("per_class", 30, "Images per class prompt.")
absl_flags.DEFINE_integer("batch", 100, "Images per compiled call.")
flags.define_seed("Noise seed.")
absl_flags.DEFINE_string("fashion_dir", idx.FASHION_DIR, "IDX Fashion-MNIST directory.")
absl_flags.mark_flags_as_required(["workdir"])


def main():
    args = flags.FLAGS
    _check(args)
    pipe, config = stage_pipeline.load_pipeline_and_config(args.workdir)
    clip_model, tokenizer = metrics_clip.load_clip(config.latent.clip_workdir)
    prompts = captions.class_prompts("a photo of {}")
    labels = np.repeat(np.arange(len(prompts)), args.per_class)
    texts = [prompts[k] for k in labels]
    metric = fashion_metric.FashionMetric(args.fashion_dir, max_test=len(labels))
    ref = metric.reference(config.data.image_size)
    noise = np.asarray(jax.random.normal(jax.random.key(args.seed),
                                         pipelines.latent_shape(pipe, len(labels))))
    result = dict(workdir=args.workdir, guidance_scale=args.guidance_scale,
                  per_class=args.per_class, seed=args.seed, num_images=len(labels),
                  real=dict(faithfulness=ref["reference_accuracy"], fashion_fd=ref["fashion_fd"]),
                  solvers={})
    for sampler in args.samplers.split(","):
        for target in (int(n) for n in args.nfe.split(",")):
            steps, nfe = _steps_for(sampler, pipe, target)
            start = time.time()
            images = pipelines.text_to_image_in_batches(
                pipe, texts, jax.random.key(args.seed + 1), noise, batch=args.batch,
                guidance_scale=args.guidance_scale, sampler=sampler, num_steps=steps,
                output="float")
            scores = metric(images, labels)
            cell = dict(target_nfe=target, steps=steps,
                        nfe=nfe,
                        faithfulness=scores["faithfulness"], fashion_fd=scores["fashion_fd"],
                        clip_score=metrics_clip.clip_score(clip_model, tokenizer, images, texts),
                        seconds=round(time.time() - start, 1))
            result["solvers"].setdefault(sampler, []).append(cell)
            print(sampler, cell, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "t2i_quality_vs_nfe.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "t2i_quality_vs_nfe.md"), "w") as f:
        f.write(_markdown(result))
    print(_markdown(result))


def _steps_for(sampler, pipe, target):
    """``(steps, nfe)``: the most steps whose evaluations stay within ``target``.

    Raises:
        SystemExit: when no step count fits (e.g. ``ddpm``, or an adaptive ODE method).
    """
    fits = []
    for steps in range(1, target + 1):
        options = dataclasses.replace(pipe.options, num_steps=steps)
        nfe = samplers.num_evaluations(sampler, options, pipe.schedule.num_timesteps)
        if nfe is not None and nfe <= target:
            fits.append((steps, nfe))
    if not fits:
        raise ValueError(f"{sampler} cannot run within {target} evaluations.")
    return fits[-1]


def _check(args):
    """Refuses counts below 1, a negative guidance scale, unknown samplers and bad NFEs."""
    if min(args.per_class, args.batch) < 1 or args.guidance_scale < 0:
        raise ValueError("--per_class and --batch must be >= 1 and --guidance_scale >= 0")
    unknown = [s for s in args.samplers.split(",") if s not in samplers.SAMPLERS]
    if unknown:
        raise ValueError(f"--samplers: unknown {unknown[0]!r}; expected some of "
                         f"{list(samplers.SAMPLERS)}")
    try:
        if min(int(n) for n in args.nfe.split(",")) < 1:
            raise ValueError
    except ValueError:
        raise ValueError("--nfe must be a comma-separated list of integers >= 1, got "
                         f"{args.nfe!r}") from None


def _markdown(result):
    targets = [c["target_nfe"] for c in next(iter(result["solvers"].values()))]
    command = ("python scripts/t2i_quality_vs_nfe.py " + " ".join(sys.argv[1:])).strip()
    lines = [f"`{command}`\n",
             f"Fashion-MNIST text-to-image model, guidance scale {result['guidance_scale']:g}, "
             f"{result['per_class']} images per class prompt ({result['num_images']} in all); "
             "cells: prompt faithfulness / fashion-FD / CLIP score. Real test images: "
             f"faithfulness {result['real']['faithfulness']:.3f}, fashion-FD "
             f"{result['real']['fashion_fd']:.2f}.\n",
             "| solver | " + " | ".join(f"NFE {n}" for n in targets) + " |",
             "| --- |" + " --- |" * len(targets)]
    for sampler, cells in result["solvers"].items():
        text = [f"{c['faithfulness']:.3f} / {c['fashion_fd']:.2f} / {c['clip_score']:.1f}"
                + ("" if c["nfe"] == c["target_nfe"] else f" ({c['nfe']})") for c in cells]
        lines.append(f"| {sampler} | " + " | ".join(text) + " |")
    lines.append("\nNFE in parentheses where the solver's step rule gives fewer than the column's; "
                 "one NFE is one guided evaluation (two UNet passes).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    flags.run(main, prog="t2i_quality_vs_nfe.py")
