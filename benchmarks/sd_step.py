"""One denoising step of a conditional UNet, and a full small text-to-image pipeline: ours vs
diffusers, interleaved in one process, with the host load recorded.

Cases (random weights; no checkpoint is needed):

* ``small``: the small test UNet (block_out_channels (32, 64), cross_attention_dim 32), one
  classifier-free-guidance step = one UNet call on ``2B`` latent rows of 16x16.
* ``sd15``: the SD-1.5 UNet (859,520,964 parameters), one guided step for one image
  (2 rows); latents ``[2, S/8, S/8, 4]`` for an ``S x S`` image (``--sd15_size``, default 256:
  512 takes minutes per call on a 2-core CPU).
* ``pipeline``: the tiny random StableDiffusionPipeline of the tests (32x32 images), DDIM with
  CFG 7.5, ``--pipeline_steps`` steps, batch 2: ``pipelines.text_to_image`` vs diffusers'
  ``StableDiffusionPipeline.__call__`` from the same latents.

Each repeat times ours then diffusers back to back (after one untimed warm-up call each, which
for ours includes compilation, reported separately), so both see the same host conditions.
``os.getloadavg()`` is recorded before and after; a 1-minute load above ``nproc + 0.5`` marks
the result ``"loaded_host": true`` — then the ratios are not to be quoted.

Usage::

    python benchmarks/sd_step.py [--cases small sd15 pipeline] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

# Keep torch's OpenMP threads from spinning: on a busy host spinning made its steps many times
# slower (see benchmarks/common.py); set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion_jax import pipelines  # noqa: E402
from diffusion_jax.convert import unet_cond  # noqa: E402
from diffusion_jax.models.cond_unet import CondUNet  # noqa: E402
from benchmarks.common import SD15_DIFFUSERS  # noqa: E402

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["small", "sd15", "pipeline"],
                        choices=["small", "sd15", "pipeline"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sd15_size", type=int, default=256, help="image side of the sd15 case")
    parser.add_argument("--pipeline_steps", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "sd_step_cpu.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    results = []
    for case in args.cases:
        load_before = os.getloadavg()
        if case == "pipeline":
            record = _pipeline_case(args.pipeline_steps, args.repeats)
        else:
            record = _unet_case(case, args.sd15_size, args.repeats)
        load_after = os.getloadavg()
        record.update(load_before=[round(x, 2) for x in load_before],
                      load_after=[round(x, 2) for x in load_after],
                      loaded_host=max(load_before[0], load_after[0]) > os.cpu_count() + 0.5)
        print(json.dumps(record), flush=True)
        results.append(record)
    payload = {"machine": {"platform": platform.platform(), "nproc": os.cpu_count(),
                           "backend": jax.default_backend(), "jax": jax.__version__,
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]},
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": "python " + " ".join(sys.argv), "results": results}
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.out}")


def _unet_case(case, sd15_size, repeats):
    """One CFG step (2 rows per image) of the small or the SD-1.5 UNet, both frameworks."""
    import diffusers
    import torch
    from sd_fixtures import UNET_LINEAR

    config = UNET_LINEAR if case == "small" else SD15_DIFFUSERS
    side = 16 if case == "small" else sd15_size // 8
    rows = 4 if case == "small" else 2
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    kwargs = unet_cond.config_to_kwargs({k: v for k, v in theirs.config.items()
                                         if not k.startswith("_")})
    ours = _numpy_init(lambda: CondUNet(**kwargs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(ours)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((rows, side, side, 4)).astype(np.float32)
    text = rng.standard_normal((rows, 77, config["cross_attention_dim"])).astype(np.float32)
    t = np.full((rows,), 500, np.int32)
    step = jax.jit(lambda s, z, t, c: nnx.merge(graphdef, s)(z, t, {"text": c}))
    args = (state, jnp.asarray(z), jnp.asarray(t), jnp.asarray(text))
    z_t, t_t, c_t = (torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                     torch.from_numpy(text))

    def ours_call():
        step(*args).block_until_ready()

    def theirs_call():
        with torch.no_grad():
            theirs(z_t, t_t, c_t)

    record = _interleaved(ours_call, theirs_call, repeats)
    record.update(case=case, rows=rows, latent=[side, side, 4],
                  params=sum(p.numel() for p in theirs.parameters()))
    return record


def _pipeline_case(steps, repeats):
    """The tiny random SD pipeline of the tests, 32x32 images, batch 2, CFG 7.5."""
    import torch
    from sd_fixtures import save_tiny_pipeline

    root = pathlib.Path(tempfile.mkdtemp())
    src, pipe = save_tiny_pipeline(root, dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1))
    ours = pipelines.load(src)
    prompts = ["a photo of a cat", "hello"]
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)

    def ours_call():
        pipelines.text_to_image(ours, prompts, jax.random.key(0), num_steps=steps,
                                latents=latents.transpose(0, 2, 3, 1))

    def theirs_call():
        with torch.no_grad():
            pipe(prompt=prompts, latents=torch.from_numpy(latents), height=32, width=32,
                 num_inference_steps=steps, guidance_scale=7.5, output_type="np")

    record = _interleaved(ours_call, theirs_call, repeats)
    record.update(case="pipeline", steps=steps, batch=2, image=[32, 32, 3])
    return record


def _interleaved(ours_call, theirs_call, repeats):
    """Warm-up (timed separately) then ``repeats`` rounds of ours, diffusers; seconds."""
    start = time.perf_counter()
    ours_call()
    ours_first = time.perf_counter() - start
    theirs_call()
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours_call, ours_times), (theirs_call, theirs_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"ours_first_call_s": round(ours_first, 3),
            "ours_s": [round(x, 4) for x in ours_times],
            "diffusers_s": [round(x, 4) for x in theirs_times],
            "ours_median_s": round(statistics.median(ours_times), 4),
            "diffusers_median_s": round(statistics.median(theirs_times), 4)}


def _numpy_init(build, seed=0):
    """``build()``'s model with N(0, 0.02^2) numpy parameters (no initialiser compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    values = jax.tree.map(
        lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32), a.dtype),
        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


if __name__ == "__main__":
    main()
