"""Memory of one bf16 SD-1.5 UNet denoising step: XLA's memory analysis, peak RSS, and diffusers.

Ours: the model is built with ``nnx.eval_shape`` and the step ``unet(z_t, t, {"text": states})``
is lowered on abstract shapes and compiled for the default backend; ``compiled.memory_analysis()``
gives the sizes of the arguments (parameters + inputs), the output and the temporaries XLA's
buffer assignment needs. ``--attention`` picks the kernel (`diffusion_jax.models.attention`):
``xla`` forms every ``[B, heads, 4096, 4096]`` score matrix (the behaviour before the chunked
kernel), ``auto`` is the default. With ``--execute`` the compiled step also runs once on random
parameters, and the process's peak RSS is recorded.

Theirs (``--diffusers``): diffusers' ``UNet2DConditionModel`` in the SD-1.5 layout with its
default attention processor (PyTorch SDPA), float32 parameters under ``torch.autocast(bfloat16)``,
one forward under ``no_grad``; peak RSS of its process.

Each row runs in its own process (``common.run_case_subprocess``), so peak RSS is its own. A
512x512 image is a ``[B, 64, 64, 4]`` latent; the text states are ``[B, 77, 768]`` (with
classifier-free guidance a pipeline runs the UNet on ``2B`` rows per step). The 1-minute load
average is recorded before and after each row.

Usage::

    python benchmarks/sd_memory.py [--batch 1 8] [--param_dtype float32 bfloat16]
        [--attention auto xla] [--execute 1] [--diffusers 1] [--attention_tokens 16384]
        [--out FILE]

(``--execute`` / ``--diffusers`` take the batch sizes to run.) On the CPU backend, bf16
convolutions and matmuls are computed through float32 copies, which adds ~3 GiB of temporaries at
any batch; GPU and TPU numbers need a run there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

DTYPES = ("float32", "bfloat16")


def step_memory(batch: int, *, image_size: int = 512, param_dtype: str = "float32",
                attention_impl: str = "auto", execute: bool = False) -> dict:
    """XLA memory analysis (bytes) of one bf16-compute SD-1.5 UNet forward on ``batch`` latents;
    with ``execute``, also one call on random parameters and this process's peak RSS."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from diffusion_jax.models import attention
    from diffusion_jax.models.cond_unet import SD15_UNET, CondUNet

    pdt = jnp.dtype(param_dtype)
    model = nnx.eval_shape(lambda: CondUNet(**SD15_UNET, dtype=jnp.bfloat16, param_dtype=pdt,
                                            rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def step(state, z, t, text):
        return nnx.merge(graphdef, state)(z, t, {"text": text})

    side = image_size // 8
    args = (state, jax.ShapeDtypeStruct((batch, side, side, 4), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, 77, SD15_UNET["cross_attention_dim"]), jnp.bfloat16))
    start = time.perf_counter()
    with attention.options(implementation=attention_impl):
        compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    row = {
        "framework": "diffusion_jax", "batch": batch, "image_size": image_size,
        "param_dtype": param_dtype, "compute_dtype": "bfloat16", "attention": attention_impl,
        "backend": jax.default_backend(),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "peak_estimate_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        "compile_s": round(compile_s, 1),
        "peak_rss_after_compile_mb": round(common.peak_rss_mb(), 1),
    }
    if execute:
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: jnp.asarray(
            0.02 * rng.standard_normal(a.shape, np.float32), a.dtype), state)
        inputs = [jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in args[1:]]
        inputs[1] = jnp.full((batch,), 500, jnp.int32)
        start = time.perf_counter()
        out = compiled(params, *inputs)
        out.block_until_ready()
        row.update(execute_s=round(time.perf_counter() - start, 1),
                   output_finite=bool(np.isfinite(np.asarray(out)).all()),
                   peak_rss_mb=round(common.peak_rss_mb(), 1))
    return row


def attention_memory(tokens: int, *, batch: int = 2, heads: int = 10, head_dim: int = 64,
                     attention_impl: str = "auto") -> dict:
    """XLA memory analysis of one bf16 self-attention call over ``tokens`` positions (SDXL's
    10 heads of 64; 16,384 tokens = a 128x128 latent, i.e. a 1024x1024 image at full latent
    resolution), forward and gradient with respect to q, k, v."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models import attention

    shape = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.bfloat16)
    row = {"framework": "diffusion_jax", "kind": "attention", "batch": batch, "tokens": tokens,
           "heads": heads, "head_dim": head_dim, "attention": attention_impl,
           "backend": jax.default_backend(),
           "score_matrix_f32_bytes": 4 * batch * heads * tokens * tokens}
    fns = {"forward": lambda q, k, v: attention.dot_product_attention(q, k, v),
           "gradient": jax.grad(lambda q, k, v: attention.dot_product_attention(q, k, v).astype(
               jnp.float32).sum(), argnums=(0, 1, 2))}
    for name, fn in fns.items():
        start = time.perf_counter()
        with attention.options(implementation=attention_impl):
            compiled = jax.jit(fn).lower(shape, shape, shape).compile()
        row[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
        row[f"{name}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    return row


def diffusers_memory(batch: int, *, image_size: int = 512) -> dict:
    """Peak RSS of one diffusers SD-1.5 UNet forward (SDPA, f32 weights, bf16 autocast)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(common.cpu_cores())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**common.SD15_DIFFUSERS).eval()
    side = image_size // 8
    z = torch.randn(batch, 4, side, side)
    text = torch.randn(batch, 77, common.SD15_DIFFUSERS["cross_attention_dim"])
    rss_model = common.peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(z, torch.full((batch,), 500), text).sample
    return {"framework": "diffusers", "batch": batch, "image_size": image_size,
            "param_dtype": "float32", "compute_dtype": "bfloat16 (autocast)",
            "attention": type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__,
            "execute_s": round(time.perf_counter() - start, 1),
            "output_finite": bool(torch.isfinite(out).all()),
            "peak_rss_after_build_mb": round(rss_model, 1),
            "peak_rss_mb": round(common.peak_rss_mb(), 1), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--param_dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--attention", nargs="+", default=["auto"],
                        choices=["auto", "xla", "chunked"])
    parser.add_argument("--execute", type=int, nargs="*", default=[],
                        help="batch sizes whose compiled step also runs once (peak RSS)")
    parser.add_argument("--diffusers", type=int, nargs="*", default=[],
                        help="batch sizes to run diffusers' UNet at (peak RSS)")
    parser.add_argument("--attention_tokens", type=int, nargs="*", default=[],
                        help="also compile one bf16 self-attention call (10 heads of 64, batch 2) "
                             "over these token counts, e.g. 16384 (SDXL-size)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--case", default=None, help="internal: one row, run in this process")
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        kind = case.pop("kind")
        run = {"diffusers": diffusers_memory, "attention": attention_memory,
               "jax": step_memory}[kind]
        common.emit_result(run(**case))
        return
    cases = [dict(kind="jax", batch=b, param_dtype=p, attention_impl=a, execute=b in args.execute)
             for a in args.attention for p in args.param_dtype for b in args.batch]
    cases += [dict(kind="diffusers", batch=b) for b in args.diffusers]
    cases += [dict(kind="attention", tokens=n, attention_impl=a)
              for n in args.attention_tokens for a in args.attention]
    rows = []
    for case in cases:
        load_before = [round(x, 2) for x in os.getloadavg()]
        row = common.run_case_subprocess(os.path.abspath(__file__), case,
                                         env={"OMP_WAIT_POLICY": "PASSIVE"})
        row.update(load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()])
        rows.append(row)
        gib = {k.replace("_bytes", "_GiB"): round(v / 2**30, 3)
               for k, v in row.items() if k.endswith("_bytes")}
        print(json.dumps({**{k: v for k, v in row.items() if not k.endswith("_bytes")}, **gib}),
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "command": "python " + " ".join(sys.argv), "cpu_cores": common.cpu_cores(),
                       "versions": common.versions(), "rows": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
