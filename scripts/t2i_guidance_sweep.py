"""FID-like distance, CLIP score and prompt faithfulness of the Fashion-MNIST text-to-image
model over classifier-free guidance scales (the standard FID-vs-CLIP-score curve).

    python scripts/t2i_guidance_sweep.py --workdir=demo_t2i/t2i --out=benchmarks/results \
        --scales=1,1.5,2,3,5,7.5 --per_class=50 --steps=50

For each guidance scale ``s`` (Stable Diffusion convention, 1 = the conditional model) it
generates ``per_class`` images for each prompt "a photo of <class>" with DDIM, from the same
noise at every scale, through :func:`diffusion_jax.pipelines.text_to_image` on the trained
stages, and scores them:

* ``fashion_fd``: Fréchet distance to real training images in the offline feature space of
  :mod:`diffusion_jax.fashion_metric` (50 pixel principal components + 10 logits of a ridge
  classifier fit on 10,000 real training images); not Inception FID.
* ``clip_fd``: Fréchet distance of our CLIP's unit image embeddings to as many real test
  images (:func:`diffusion_jax.metrics_clip.clip_fd`).
* ``clip_score``: 100 cos(E_I, E_T("a photo of <class>")) clipped at 0, averaged, with the CLIP
  stage trained here (``latent.clip_workdir`` of the workdir).
* ``faithfulness``: the share of images the ridge classifier assigns to the prompted class
  (also per class: ``faithfulness_by_class``, and a second table in the .md file).

The same numbers for the same count of real test images (via 32x32, the model's resolution)
are the reference: faithfulness there is the classifier's test accuracy. Writes
``OUT/t2i_guidance.json``, ``OUT/t2i_guidance.md`` and ``OUT/t2i_guidance.png``
(fashion-FD against CLIP score, one point per scale).
"""
import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags as absl_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from diffusion_jax import (captions, data, fashion_metric, idx, metrics_clip,  # noqa: E402
                           pipelines, plotting, stage_pipeline)
from diffusion_jax.cli import flags  # noqa: E402

flags.define_workdir("latent_diffusion workdir.")
flags.define_out(default="benchmarks/results")
absl_flags.DEFINE_list("scales", ["1", "1.5", "2", "3", "5", "7.5"], "Guidance scales.")
absl_flags.DEFINE_integer("per_class", 50, "Images per class prompt.")
flags.define_steps("DDIM steps.", 50)
absl_flags.DEFINE_integer("batch", 100, "Images per compiled call.")
flags.define_seed("Noise seed.")
absl_flags.DEFINE_string("template", "a photo of {}", "Prompt template.")
absl_flags.DEFINE_string("fashion_dir", idx.FASHION_DIR, "IDX Fashion-MNIST directory.")
absl_flags.DEFINE_bool("save_images", False, "Also write the npz files.")
absl_flags.mark_flags_as_required(["workdir"])


def main():
    args = flags.FLAGS
    if min(args.per_class, args.steps, args.batch) < 1:
        raise ValueError("--per_class, --steps and --batch must be >= 1")
    pipe, config = stage_pipeline.load_pipeline_and_config(args.workdir)
    clip_model, tokenizer = metrics_clip.load_clip(config.latent.clip_workdir)
    scales = _scales(args.scales)
    prompts = captions.class_prompts(args.template)
    labels = np.repeat(np.arange(len(prompts)), args.per_class)
    texts = [prompts[k] for k in labels]
    num = len(labels)
    metric = fashion_metric.FashionMetric(args.fashion_dir, max_test=num)
    real, real_labels = _real_test_images(config, num)
    result = dict(workdir=args.workdir, template=args.template, per_class=args.per_class,
                  steps=args.steps, seed=args.seed, num_images=num,
                  features="fashion_fd: 50 pixel PCs + 10 ridge-classifier logits "
                           "(diffusion_jax/fashion_metric.py); clip_fd: our CLIP's image "
                           "embeddings", scales={})
    ref = metric.reference(config.data.image_size)
    result["real"] = dict(faithfulness=ref["reference_accuracy"],
                          faithfulness_by_class=ref["reference_accuracy_by_class"],
                          fashion_fd=ref["fashion_fd"],
                          clip_score=metrics_clip.clip_score(
                              clip_model, tokenizer, real, [prompts[k] for k in real_labels]),
                          clip_fd=0.0, num_images=num)
    noise = np.asarray(jax.random.normal(jax.random.key(args.seed),
                                         pipelines.latent_shape(pipe, num)))
    for s in scales:
        start = time.time()
        images = pipelines.text_to_image_in_batches(
            pipe, texts, jax.random.key(args.seed + 1), noise, batch=args.batch,
            guidance_scale=s, num_steps=args.steps, output="float")
        scores = metric(images, labels)
        cell = dict(faithfulness=scores["faithfulness"], fashion_fd=scores["fashion_fd"],
                    clip_score=metrics_clip.clip_score(clip_model, tokenizer, images, texts),
                    clip_fd=metrics_clip.clip_fd(clip_model, images, real),
                    faithfulness_by_class=scores["faithfulness_by_class"],
                    class_histogram=scores["class_histogram"],
                    seconds=round(time.time() - start, 1))
        result["scales"][str(s)] = cell
        print(f"s={s}: " + " ".join(f"{k}={v:.3f}" for k, v in cell.items()
                                    if isinstance(v, float)), flush=True)
        if args.save_images:
            os.makedirs(args.out, exist_ok=True)
            np.savez(os.path.join(args.out, f"t2i_guidance_s{s}.npz"),
                     images=np.asarray(images), labels=labels, prompts=np.asarray(texts))
    _write(result, args.out)


def _scales(items):
    """``--scales`` as floats."""
    try:
        return [float(item) for item in items]
    except ValueError:
        raise ValueError(f"--scales must be numbers, got {','.join(items)}") from None


def _real_test_images(config, num):
    """The first ``num`` test images as the model saw them (``[num, S, S, C]`` in [-1, 1])
    and their labels ``[num]``."""
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.split = "test"
    images, labels = data.load_eval_images(data_cfg, num)
    return np.asarray(images), np.asarray(labels)


def _write(result, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "t2i_guidance.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "t2i_guidance.md"), "w") as f:
        f.write(_markdown(result))
    real, cells = result["real"], result["scales"]
    series = {"generated, label = guidance scale":
              ([c["clip_score"] for c in cells.values()],
               [c["fashion_fd"] for c in cells.values()], [f"s={s}" for s in cells])}
    plot = plotting.line_plot(
        series, title=f"Fashion-MNIST text-to-image over guidance scales "
                      f"({result['num_images']} images each)",
        x_label="CLIP score (our CLIP)", y_label="fashion-FD (lower is better)",
        h_lines={"real test images: FD": real["fashion_fd"]},
        v_lines={"real: CLIP score": real["clip_score"]})
    plot.save(os.path.join(out, "t2i_guidance.png"))
    print(f"Wrote {out}/t2i_guidance.json, .md and .png")


def _markdown(result):
    real = result["real"]
    lines = [f"Fashion-MNIST text-to-image over guidance scales: {result['per_class']} images "
             f"per class prompt ('{result['template']}'), {result['steps']} DDIM steps, "
             f"seed {result['seed']}, the same noise at every scale; "
             f"real = the first {real['num_images']} test images via 32x32.", "",
             "| guidance scale | faithfulness | fashion-FD | CLIP score | CLIP-FD |",
             "| --- | --- | --- | --- | --- |"]
    for s, c in result["scales"].items():
        lines.append(f"| {s} | {c['faithfulness']:.3f} | {c['fashion_fd']:.2f} | "
                     f"{c['clip_score']:.2f} | {c['clip_fd']:.3f} |")
    lines.append(f"| real test images | {real['faithfulness']:.3f} | {real['fashion_fd']:.2f} | "
                 f"{real['clip_score']:.2f} | 0 |")
    names = captions.FASHION_MNIST_CLASSES
    lines += ["", "Faithfulness by prompted class (share the classifier assigns to it):", "",
              "| guidance scale | " + " | ".join(names) + " |",
              "| --- |" + " --- |" * len(names)]
    rows = [(s, c["faithfulness_by_class"]) for s, c in result["scales"].items()]
    for s, by_class in rows + [("real test images", real["faithfulness_by_class"])]:
        lines.append(f"| {s} | " + " | ".join("-" if a is None else f"{a:.2f}"
                                              for a in by_class) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    flags.run(main, prog="t2i_guidance_sweep.py")
