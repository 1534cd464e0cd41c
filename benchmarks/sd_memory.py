"""Compiled memory of one bf16 SD-1.5 UNet denoising step, from XLA's memory analysis.

Nothing is allocated: the model is built with ``nnx.eval_shape`` and the step
``unet(z_t, t, {"text": states})`` is lowered on abstract shapes and compiled for the default
backend; ``compiled.memory_analysis()`` gives the sizes of the arguments (parameters +
inputs), the output and the temporaries XLA's buffer assignment needs.

A 512x512 image is a ``[B, 64, 64, 4]`` latent; the text states are ``[B, 77, 768]``. With
classifier-free guidance a pipeline runs the UNet on ``2B`` rows per step.

Usage::

    python benchmarks/sd_memory.py [--batch 1 8] [--param_dtype float32 bfloat16] [--out FILE]

On the CPU backend, bf16 convolutions and matmuls are computed through float32 copies, which
adds ~3 GiB of temporaries at any batch (float32 compute needs 1.58 GiB at batch 1); GPU and
TPU numbers need a run there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion_jax.models.cond_unet import SD15_UNET, CondUNet  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def step_memory(batch: int, *, image_size: int = 512, param_dtype=jnp.float32) -> dict:
    """XLA memory analysis (bytes) of one bf16-compute SD-1.5 UNet forward on ``batch`` latents."""
    model = nnx.eval_shape(lambda: CondUNet(**SD15_UNET, dtype=jnp.bfloat16,
                                            param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def step(state, z, t, text):
        return nnx.merge(graphdef, state)(z, t, {"text": text})

    side = image_size // 8
    args = (state, jax.ShapeDtypeStruct((batch, side, side, 4), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, 77, SD15_UNET["cross_attention_dim"]), jnp.bfloat16))
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    mem = compiled.memory_analysis()
    return {
        "batch": batch, "image_size": image_size,
        "param_dtype": jnp.dtype(param_dtype).name, "compute_dtype": "bfloat16",
        "backend": jax.default_backend(),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "peak_estimate_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--param_dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=sorted(DTYPES))
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for pdt in args.param_dtype:
        for batch in args.batch:
            row = step_memory(batch, param_dtype=DTYPES[pdt])
            rows.append(row)
            gib = {k: round(v / 2**30, 3) for k, v in row.items() if k.endswith("_bytes")}
            print(json.dumps({**{k: v for k, v in row.items() if not k.endswith("_bytes")},
                              **{k.replace("_bytes", "_GiB"): v for k, v in gib.items()}}),
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
