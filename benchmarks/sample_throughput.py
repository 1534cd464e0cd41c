"""Sampling throughput: diffusion_jax's DDPM / DDIM samplers vs diffusers' DDPMPipeline / DDIMPipeline.

Both sides run the same UNet layout (freshly initialised; speed does not depend on the weights) with
the linear beta schedule, T = 1000, x_0 clipped to [-1, 1] and DDIM eta = 0:

* ours: ``samplers.run("ddpm" | "ddim", ...)`` (one ``lax.scan``) under ``jax.jit``,
  compiled ahead of time (compile time reported separately);
* theirs: ``DDPMPipeline`` / ``DDIMPipeline`` (scheduler step loop under ``torch.no_grad``), progress
  bar off, ``output_type="np"``.

Full chains are DDPM 1000 steps and DDIM 50 steps. Where a full chain is too slow (the 35.7 M UNet on
a CPU) a case runs only ``measured_steps`` steps and the full-chain time is extrapolated linearly
(``extrapolated: true``): per-step cost is the same at every step of both samplers.

Usage:
    .venv/bin/python benchmarks/sample_throughput.py            # full CPU run: 8-10 min on 2 busy cores
    .venv/bin/python benchmarks/sample_throughput.py --quick
    .venv/bin/python benchmarks/sample_throughput.py --device gpu --dtype bf16
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NUM_TIMESTEPS = 1000
FULL_STEPS = {"ddpm": 1000, "ddim": 50}


def plan(args):
    """Cases: (model, sampler, batch size, steps actually run, warm-up calls, timed calls)."""
    if args.quick:
        return [dict(model="tiny", sampler=s, batch_size=2, steps=3, warmup=1, iters=1)
                for s in ("ddpm", "ddim")]
    if args.device == "gpu":
        return [dict(model=m, sampler=s, batch_size=b, steps=FULL_STEPS[s], warmup=1, iters=3)
                for m in ("ddpm_cifar10", "tiny") for s in ("ddpm", "ddim") for b in (64, 256)]
    cases = []
    for b in (1, 16):  # 35.7 M UNet: a few steps, extrapolated
        for s in ("ddpm", "ddim"):
            cases.append(dict(model="ddpm_cifar10", sampler=s, batch_size=b, steps=4, warmup=0, iters=2))
    for b in (1, 8):  # tiny UNet: full chains
        cases.append(dict(model="tiny", sampler="ddpm", batch_size=b, steps=1000, warmup=0, iters=1))
    for b in (1, 16):
        cases.append(dict(model="tiny", sampler="ddim", batch_size=b, steps=50, warmup=1, iters=2))
    return cases


def main():
    parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        runner = run_jax_case if case["framework"] == "jax" else run_torch_case
        common.emit_result(runner(case))
        return
    layouts = {spec["model"]: common.layout(spec["model"]) for spec in plan(args)}
    results = []
    for spec in plan(args):
        for framework in ("jax", "torch"):
            case = dict(spec, framework=framework, layout=layouts[spec["model"]],
                        device=args.device, dtype=args.dtype,
                        threads=args.threads or common.cpu_cores())
            print(f"[sample] {framework} {spec['model']} {spec['sampler']} batch {spec['batch_size']} "
                  f"({spec['steps']} steps) ...", flush=True)
            res = common.run_case_subprocess(
                os.path.abspath(__file__), case,
                env=common.torch_env(args) if framework == "torch" else None)
            print("   ", _summary(res), flush=True)
            results.append(res)
    path = common.write_results(
        "sample_throughput" + ("_quick" if args.quick else ""),
        dict(config=dict(device=args.device, dtype=args.dtype,
                         torch_omp_wait_policy=args.omp_wait_policy, num_timesteps=NUM_TIMESTEPS,
                         full_steps=FULL_STEPS, clip_x0=[-1.0, 1.0], ddim_eta=0.0,
                         layouts=layouts),
             results=results, ratios=ratios(results),
             notes=["Cases with extrapolated=true ran measured_steps steps; full-chain time = "
                    "per-step time x full_steps.",
                    "Per-step time includes the sampler's fixed cost (initial noise, final "
                    "conversion) spread over the steps run, so extrapolation slightly overstates it.",
                    "Other processes on the host (machine.load_average_1_5_15_at_start / _at_end) can skew timings."]))
    print("wrote", path)


def ratios(results):
    """ours / theirs images-per-second for each (model, sampler, batch size) measured by both."""
    by_key = {(r["model"], r["sampler"], r["batch_size"], r["framework"]): r
              for r in results if "error" not in r}
    out = []
    for (model, sampler, batch, fw), r in sorted(by_key.items()):
        other = by_key.get((model, sampler, batch, "torch"))
        if fw == "jax" and other:
            out.append(dict(model=model, sampler=sampler, batch_size=batch,
                            extrapolated=r["extrapolated"],
                            images_per_s_ratio_jax_over_torch=r["images_per_s"] / other["images_per_s"]))
    return out


def run_jax_case(case):
    """Times ``ddpm_sample`` / ``ddim_sample`` on one (model, sampler, batch size) in this process."""
    common.setup_jax_env(case["device"])
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from diffusion_jax import denoisers, samplers, schedules

    model = common.jax_unet(case["layout"], case["dtype"])
    graphdef, weights = nnx.split(model)
    sched = schedules.make_schedule(schedules.linear_beta_schedule(NUM_TIMESTEPS))
    steps = case["steps"]

    options = samplers.make_options(num_steps=steps, eta=0.0, pred_type="eps",
                                    variance="posterior", clip_x0=(-1.0, 1.0))
    # DDPM takes every step; a shorter timed DDPM chain starts part-way (t_start).
    t_start = None if case["sampler"] != "ddpm" or steps == FULL_STEPS["ddpm"] else steps - 1

    def sample(weights, x_T, key):
        denoise = denoisers.model_denoiser(nnx.merge(graphdef, weights))
        return samplers.run(case["sampler"], denoise, sched, x_T, key, options, t_start=t_start)

    lay = case["layout"]
    key = jax.random.key(0)
    x_T = jax.random.normal(key, (case["batch_size"], lay["image_size"], lay["image_size"],
                                  lay["in_channels"]), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(sample).lower(weights, x_T, key).compile()
    compile_s = time.perf_counter() - t0
    timing = common.time_calls(lambda: jax.block_until_ready(compiled(weights, x_T, key)),
                               warmup=case["warmup"], iters=case["iters"])
    result = _finish(case, timing, compile_s=compile_s, device_kind=jax.devices()[0].device_kind,
                     implementation=f"diffusion_jax.samplers.run({case['sampler']!r}) (jit, lax.scan)")
    if case["device"] == "gpu":
        result["peak_device_memory_mb"] = (jax.devices()[0].memory_stats() or {}).get(
            "peak_bytes_in_use", 0) / 2**20
    return result


def run_torch_case(case):
    """Times diffusers' DDPMPipeline / DDIMPipeline on one (model, sampler, batch size)."""
    torch, device = common.torch_setup(case["device"], case["threads"])
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    model = common.torch_unet(case["layout"], device).eval()
    if case["sampler"] == "ddpm":
        # Timesteps of a k-step run are spread over [0, T); the cost per step does not depend on t.
        pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(
            num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear", clip_sample=True,
            variance_type="fixed_small"))
    else:
        pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler(
            num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear", clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")

    def run(num_steps):
        with autocast:
            pipe(batch_size=case["batch_size"], num_inference_steps=num_steps, output_type="np",
                 generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(2)  # allocator and thread-pool warm-up, cheap
    timing = common.time_calls(lambda: run(case["steps"]), warmup=case["warmup"], iters=case["iters"])
    result = _finish(case, timing, compile_s=None,
                     device_kind=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     implementation=f"diffusers.{type(pipe).__name__}")
    result["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        result["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _finish(case, timing, *, compile_s, device_kind, implementation):
    full = FULL_STEPS[case["sampler"]]
    per_step = timing["median_s"] / case["steps"]
    full_s = per_step * full
    return dict(case, implementation=implementation, device_kind=device_kind,
                compile_s=None if compile_s is None else round(compile_s, 3),
                measured_steps=case["steps"], full_steps=full, extrapolated=case["steps"] != full,
                call_s_median=round(timing["median_s"], 4),
                call_s_all=[round(t, 4) for t in timing["times_s"]],
                step_s=per_step, full_chain_s=full_s, images_per_s=case["batch_size"] / full_s,
                peak_rss_mb=round(common.peak_rss_mb(), 1))


def _summary(res):
    if "error" in res:
        return "ERROR " + res["error"][-500:]
    tag = " (extrapolated)" if res["extrapolated"] else ""
    s = (f"{1e3 * res['step_s']:.1f} ms/step, full chain {res['full_chain_s']:.1f} s{tag}, "
         f"{res['images_per_s']:.3f} img/s")
    if res.get("compile_s") is not None:
        s += f", compile {res['compile_s']:.1f} s"
    return s


if __name__ == "__main__":
    main()
