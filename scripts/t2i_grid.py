"""The text-to-image prompt grid of ``make demo-t2i``: rows = prompts, columns = seeds.

    python scripts/t2i_grid.py --workdir=runs/fashion_t2i --out=demo_t2i --guidance_scale=3

Rows 1-10: "a photo of <class>" for the ten Fashion-MNIST classes; the last row: held-out
caption templates (never seen in training), column j filled with class j mod 10. Each column
starts from the same noise for every row (one seed per column). Writes ``OUT/t2i_grid.png``
(4x enlarged) and ``OUT/t2i_prompts.txt`` (the prompt of every cell, row by row), through
:func:`diffusion_jax.pipelines.text_to_image` on the pipeline of the three trained stages
(:func:`diffusion_jax.stage_pipeline.load_pipeline`).
"""
import os
import sys

import jax
import numpy as np
from absl import flags as absl_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from diffusion_jax import captions, checkpoint, image_io, pipelines, stage_pipeline  # noqa: E402
from diffusion_jax.cli import flags  # noqa: E402

flags.define_workdir("latent_diffusion workdir.")
flags.define_out()
absl_flags.DEFINE_integer("num_seeds", 8, "Columns.")
absl_flags.DEFINE_float("guidance_scale", 3.0, "Guidance scale (SD convention).")
flags.define_steps("DDIM steps.", 50)
flags.define_seed("Noise seed.")
absl_flags.mark_flags_as_required(["workdir", "out"])


def grid_prompts(num_cols: int, heldout) -> list[list[str]]:
    """The prompts of each row (see the module docstring)."""
    rows = [[p] * num_cols for p in captions.class_prompts("a photo of {}")]
    rows.append([heldout[j % len(heldout)].format(captions.object_phrase(j % 10))
                 for j in range(num_cols)])
    return rows


def main():
    args = flags.FLAGS
    pipe = stage_pipeline.load_pipeline(args.workdir)
    stored = checkpoint.load_config(
        checkpoint.make_manager(args.workdir, create=False, async_checkpointing=False))
    heldout = captions.split_templates(num_heldout=stored.captions.num_heldout,
                                       seed=stored.captions.template_seed)[1]
    rows = grid_prompts(args.num_seeds, heldout)
    prompts = [p for row in rows for p in row]
    latents = jax.random.normal(jax.random.key(args.seed),
                                pipelines.latent_shape(pipe, args.num_seeds))
    latents = np.tile(np.asarray(latents), (len(rows), 1, 1, 1))
    images = pipelines.text_to_image(pipe, prompts, jax.random.key(args.seed + 1),
                                     guidance_scale=args.guidance_scale, num_steps=args.steps,
                                     latents=latents)
    os.makedirs(args.out, exist_ok=True)
    grid = image_io.image_grid(images, num_cols=args.num_seeds, min_tile=128)
    image_io.save_png(os.path.join(args.out, "t2i_grid.png"), grid)
    with open(os.path.join(args.out, "t2i_prompts.txt"), "w") as f:
        f.writelines(" | ".join(row) + "\n" for row in rows)
    print(f"Wrote {len(prompts)} images to {args.out}/t2i_grid.png (prompts in t2i_prompts.txt)")


if __name__ == "__main__":
    flags.run(main, prog="t2i_grid.py")
