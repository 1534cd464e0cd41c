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

The two sides run in their own worker processes and are timed interleaved, one call each per
round (``interleave.run_pair``); the ratio reported is the median of the per-round ratios
theirs_time / ours_time, with quartiles, range and the load average before and after.

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

from benchmarks import common, interleave  # noqa: E402

NUM_TIMESTEPS = 1000
FULL_STEPS = {"ddpm": 1000, "ddim": 50}


def plan(args):
    """Cases: (model, sampler, batch size, steps per timed call, warm-up calls, rounds)."""
    if args.quick:
        return [dict(model="tiny", sampler=s, batch_size=2, steps=3, warmup=1, rounds=3)
                for s in ("ddpm", "ddim")]
    if args.device == "gpu":
        return [dict(model=m, sampler=s, batch_size=b, steps=FULL_STEPS[s], warmup=1, rounds=5)
                for m in ("ddpm_cifar10", "tiny") for s in ("ddpm", "ddim") for b in (64, 256)]
    cases = []
    for b in (1, 16):  # 35.7 M UNet: a few steps per call, extrapolated
        for s in ("ddpm", "ddim"):
            cases.append(dict(model="ddpm_cifar10", sampler=s, batch_size=b, steps=4, warmup=1,
                              rounds=5))
    for b in (1, 8):  # tiny UNet: full chains
        cases.append(dict(model="tiny", sampler="ddpm", batch_size=b, steps=1000, warmup=1, rounds=3))
    for b in (1, 16):
        cases.append(dict(model="tiny", sampler="ddim", batch_size=b, steps=50, warmup=1, rounds=7))
    return cases


def main():
    parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        setup = jax_setup if case["framework"] == "jax" else torch_setup
        interleave.serve(lambda: setup(case))
        return
    layouts = {spec["model"]: common.layout(spec["model"]) for spec in plan(args)}
    results = []
    cores = args.threads or common.cpu_cores()
    for spec in plan(args):
        ours, theirs = (dict(spec, framework=fw, layout=layouts[spec["model"]], device=args.device,
                             dtype=args.dtype, threads=cores) for fw in ("jax", "torch"))
        print(f"[sample] {spec['model']} {spec['sampler']} batch {spec['batch_size']} "
              f"({spec['steps']} steps per call, {spec['rounds']} rounds) ...", flush=True)
        res = interleave.run_pair(os.path.abspath(__file__), ours, theirs, rounds=spec["rounds"],
                                  env_theirs=common.torch_env(args), cores=common.cpu_cores())
        res.update({k: spec[k] for k in ("model", "sampler", "batch_size", "warmup")})
        if "error" not in res:
            _finish(res, spec)
        print("   ", _summary(res), flush=True)
        results.append(res)
    path = common.write_results(
        "sample_throughput" + ("_quick" if args.quick else ""),
        dict(config=dict(device=args.device, dtype=args.dtype,
                         torch_omp_wait_policy=args.omp_wait_policy, num_timesteps=NUM_TIMESTEPS,
                         full_steps=FULL_STEPS, clip_x0=[-1.0, 1.0], ddim_eta=0.0,
                         layouts=layouts, load_margin=interleave.LOAD_MARGIN),
             results=results,
             notes=["Cases with extrapolated=true ran measured_steps steps per call; full-chain "
                    "time = per-step time x full_steps.",
                    "Per-step time includes the sampler's fixed cost (initial noise, final "
                    "conversion) spread over the steps run, so extrapolation slightly overstates it.",
                    "Both sides are timed interleaved, one call each per round; cases with "
                    "loaded_host=true ran while other processes loaded the host."]))
    print("wrote", path)


def jax_setup(case):
    """``samplers.run`` (ddpm / ddim) on one (model, sampler, batch size), compiled and warmed
    up; returns ``(call, info)`` for `interleave.serve`."""
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

    def call():
        jax.block_until_ready(compiled(weights, x_T, key))

    warm = interleave.warm_up(call, case["warmup"])
    info = dict(compile_s=round(compile_s, 3), first_call_s=warm[0] if warm else None,
                device_kind=jax.devices()[0].device_kind,
                implementation=f"diffusion_jax.samplers.run({case['sampler']!r}) (jit, lax.scan)")
    if case["device"] == "gpu":
        info["peak_device_memory_mb"] = (jax.devices()[0].memory_stats() or {}).get(
            "peak_bytes_in_use", 0) / 2**20
    return call, info


def torch_setup(case):
    """diffusers' DDPMPipeline / DDIMPipeline on one (model, sampler, batch size), warmed up;
    returns ``(call, info)`` for `interleave.serve`."""
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
    warm = interleave.warm_up(lambda: run(case["steps"]), case["warmup"])
    info = dict(first_call_s=warm[0] if warm else None, torch_threads=torch.get_num_threads(),
                device_kind=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                implementation=f"diffusers.{type(pipe).__name__}")
    if device.type == "cuda":
        info["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return lambda: run(case["steps"]), info


def _finish(res, spec):
    """Per-step time, full-chain time and images/s of both sides of an interleaved case."""
    full = FULL_STEPS[spec["sampler"]]
    res.update(measured_steps=spec["steps"], full_steps=full, extrapolated=spec["steps"] != full)
    for side in ("ours", "theirs"):
        r = res[side]
        r["step_s"] = r["median_s"] / spec["steps"]
        r["full_chain_s"] = r["step_s"] * full
        r["images_per_s"] = spec["batch_size"] / r["full_chain_s"]


def _summary(res):
    if "error" in res:
        return "ERROR " + res["error"][-500:]
    o, t = res["ours"], res["theirs"]
    tag = " (extrapolated)" if res["extrapolated"] else ""
    s = (f"ours {1e3 * o['step_s']:.1f} ms/step (compile {o['compile_s']:.1f} s), theirs "
         f"{1e3 * t['step_s']:.1f} ms/step{tag}; ours/theirs {res['ratio_median']:.2f}x "
         f"[IQR {res['ratio_q1']:.2f}-{res['ratio_q3']:.2f}, range {res['ratio_min']:.2f}-"
         f"{res['ratio_max']:.2f}]; load {res['load_avg_before'][0]} -> {res['load_avg_after'][0]}")
    return s + (" LOADED HOST" if res["loaded_host"] else "")


if __name__ == "__main__":
    main()
