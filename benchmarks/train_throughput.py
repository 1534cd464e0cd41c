"""Training throughput: diffusion_jax's train step vs the same UNet in PyTorch diffusers.

One training step is: draw t ~ U{0..T-1} and noise, form x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,
predict eps with the UNet (dropout on), take the mean squared error, backpropagate, clip the
gradient to global norm 1, apply an Adam update (lr 2e-4) and update an EMA of the parameters
(decay 0.9999) -- the DDPM recipe. Ours is ``train.make_train_step`` under ``train.jit_train_step``
(what ``run_train.py`` runs); theirs is diffusers' UNet2DModel with torch.optim.Adam and diffusers'
EMAModel. Both run the same architecture, batch size and resolution. Each (framework, model, batch size) runs in its own process, so peak memory is its own.

Reported per case: compile / first-step time, median step time over a few timed steps, steps/s,
images/s, peak memory (host RSS on CPU, device peak on GPU), and for jax XLA's cost analysis
(FLOPs and bytes accessed per step) with MFU against a stated peak. For torch, FLOPs are counted by
``torch.utils.flop_counter`` (matmuls and convolutions only) as a cross-check.

Usage:
    .venv/bin/python benchmarks/train_throughput.py            # full CPU run: 8-10 min on 2 busy cores
    .venv/bin/python benchmarks/train_throughput.py --quick    # seconds; checks the script
    .venv/bin/python benchmarks/train_throughput.py --device gpu --dtype bf16
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# The DDPM recipe of configs/default.py, which the jax side runs through common.train_config.
LEARNING_RATE = 2e-4
NUM_TIMESTEPS = 1000
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999


def plan(args):
    """The cases of a run: (model layout, batch sizes, warmup steps, timed steps)."""
    if args.quick:
        return [dict(model="tiny", batch_size=4, warmup=1, iters=2)]
    if args.device == "gpu":
        return [dict(model="ddpm_cifar10", batch_size=b, warmup=3, iters=20) for b in (128, 256)] + \
               [dict(model="tiny", batch_size=256, warmup=3, iters=20)]
    return [dict(model="ddpm_cifar10", batch_size=16, warmup=1, iters=2),
            dict(model="tiny", batch_size=16, warmup=2, iters=5),
            dict(model="tiny", batch_size=64, warmup=2, iters=5)]


def main():
    parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        if case.get("kind") == "matmul":
            common.emit_result(common.matmul_rate(case))
        else:
            common.emit_result((run_jax_case if case["framework"] == "jax" else run_torch_case)(case))
        return
    layouts = {spec["model"]: common.layout(spec["model"]) for spec in plan(args)}
    calibration = []
    for framework in ("jax", "torch"):
        case = dict(kind="matmul", framework=framework, device=args.device, dtype=args.dtype,
                    size=1024 if args.quick else 2048, threads=args.threads or common.cpu_cores())
        calibration.append(common.run_case_subprocess(
            os.path.abspath(__file__), case,
            env=common.torch_env(args) if framework == "torch" else None))
        print(f"[train] {framework} {case['size']}^2 matmul: "
              f"{calibration[-1].get('flops_per_s', 0) / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for spec in plan(args):
        for framework in ("jax", "torch"):
            case = dict(spec, framework=framework, layout=layouts[spec["model"]],
                        device=args.device, dtype=args.dtype,
                        threads=args.threads or common.cpu_cores())
            print(f"[train] {framework} {spec['model']} batch {spec['batch_size']} ...", flush=True)
            res = common.run_case_subprocess(
                os.path.abspath(__file__), case,
                env=common.torch_env(args) if framework == "torch" else None)
            print("   ", _summary(res), flush=True)
            results.append(res)
    path = common.write_results(
        "train_throughput" + ("_quick" if args.quick else ""),
        dict(config=dict(device=args.device, dtype=args.dtype,
                         torch_omp_wait_policy=args.omp_wait_policy, learning_rate=LEARNING_RATE,
                         num_timesteps=NUM_TIMESTEPS, optimizer="adam", grad_clip=GRAD_CLIP,
                         ema_decay=EMA_DECAY, loss="eps MSE, uniform t",
                         layouts=layouts),
             matmul_calibration=calibration, results=_add_model_mfu(results), ratios=ratios(results),
             notes=_notes(args)))
    print("wrote", path)


def ratios(results):
    """ours / theirs images-per-second for every (model, batch size) measured by both frameworks."""
    by_key = {}
    for r in results:
        if "error" not in r:
            by_key[(r["model"], r["batch_size"], r["framework"])] = r
    out = []
    for (model, batch, fw), r in sorted(by_key.items()):
        other = by_key.get((model, batch, "torch"))
        if fw == "jax" and other:
            out.append(dict(model=model, batch_size=batch,
                            images_per_s_ratio_jax_over_torch=r["images_per_s"] / other["images_per_s"]))
    return out


def _add_model_mfu(results):
    """Gives torch cases the XLA FLOP count of the jax case with the same model and batch size
    (the same computation), so both frameworks get an MFU from one definition of model FLOPs."""
    flops = {(r["model"], r["batch_size"]): r.get("flops_per_step") for r in results
             if r.get("framework") == "jax" and "error" not in r}
    for r in results:
        f = flops.get((r.get("model"), r.get("batch_size")))
        if r.get("framework") == "torch" and "error" not in r and f and r.get("peak_flops"):
            r["model_flops_per_step_from_xla"] = f
            r["achieved_flops"] = f / r["step_s_median"]
            r["mfu"] = r["achieved_flops"] / r["peak_flops"]
    return results


def run_jax_case(case):
    """Times diffusion_jax's train step (``train.make_train_step``) on one (model, batch size)."""
    common.setup_jax_env(case["device"])
    import jax

    config = common.train_config(case["layout"], batch_size=case["batch_size"], dtype=case["dtype"])
    step, state, batch, _, num_params = common.jax_train_setup(config)
    rss_before = common.current_rss_mb()
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops, nbytes = common.xla_cost(compiled)
    box = dict(state=state)

    def one_step():
        box["state"], metrics = compiled(box["state"], batch)
        jax.block_until_ready(metrics["loss"])

    timing = common.time_calls(one_step, warmup=case["warmup"], iters=case["iters"])
    device = jax.devices()[0]
    result = _finish(case, timing, compile_s=compile_s, flops=flops, bytes_accessed=nbytes,
                     num_params=num_params, device_kind=device.device_kind,
                     train_step_source="diffusion_jax.train.make_train_step (clip, Adam, EMA)")
    result["rss_before_compile_mb"] = round(rss_before, 1)
    if case["device"] == "gpu":
        stats = device.memory_stats() or {}
        result["peak_device_memory_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return result


def run_torch_case(case):
    """Times the diffusers UNet2DModel train step on one (model, batch size) in this process."""
    torch, device = common.torch_setup(case["device"], case["threads"])
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    model = common.torch_unet(case["layout"], device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    ema = EMAModel(model.parameters(), decay=EMA_DECAY, foreach=True)
    sched = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
    b, h, w, c = _image_shape(case)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand((b, c, h, w), generator=gen) * 2 - 1).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")

    def loss_fn():
        noise = torch.randn_like(x0)
        t = torch.randint(0, NUM_TIMESTEPS, (b,), device=device)
        with autocast:
            pred = model(sched.add_noise(x0, noise, t), t).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        ema.step(model.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn().backward()
    opt.zero_grad(set_to_none=True)

    timing = common.time_calls(one_step, warmup=case["warmup"], iters=case["iters"])
    result = _finish(case, timing, compile_s=None, flops=None, bytes_accessed=None,
                     num_params=sum(p.numel() for p in model.parameters()),
                     device_kind=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     train_step_source="diffusers.UNet2DModel; clip_grad_norm_, torch.optim.Adam, "
                                       "diffusers EMAModel(foreach=True)")
    result["torch_flop_counter_fwd_bwd"] = float(counter.get_total_flops())
    result["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        result["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _image_shape(case):
    lay = case["layout"]
    return (case["batch_size"], lay["image_size"], lay["image_size"], lay["in_channels"])


def _finish(case, timing, *, compile_s, flops, bytes_accessed, num_params, device_kind,
            train_step_source):
    step_s = timing["median_s"]
    peak, peak_source = common.device_peak_flops(case["device"], case["dtype"], device_kind)
    out = dict(case, num_params=num_params, train_step=train_step_source, device_kind=device_kind,
               compile_s=None if compile_s is None else round(compile_s, 3),
               first_step_s=round(timing["warmup_s"][0], 4) if timing["warmup_s"] else None,
               step_s_median=round(step_s, 4), step_s_all=[round(t, 4) for t in timing["times_s"]],
               steps_per_s=1.0 / step_s, images_per_s=case["batch_size"] / step_s,
               peak_rss_mb=round(common.peak_rss_mb(), 1),
               flops_per_step=flops, bytes_accessed_per_step=bytes_accessed,
               peak_flops=peak, peak_flops_source=peak_source)
    if flops and peak:
        out["achieved_flops"] = flops / step_s
        out["mfu"] = flops / step_s / peak
    return out


def _summary(res):
    if "error" in res:
        return "ERROR " + res["error"][-500:]
    s = f"{res['step_s_median']:.3f} s/step, {res['images_per_s']:.1f} img/s, RSS {res['peak_rss_mb']:.0f} MB"
    if res.get("compile_s") is not None:
        s += f", compile {res['compile_s']:.1f} s"
    if res.get("mfu") is not None:
        s += f", {res['flops_per_step'] / 1e9:.1f} GFLOP/step, MFU {100 * res['mfu']:.1f}%"
    return s


def _notes(args):
    return [
        "jax on CPU runs XLA's intra-op Eigen thread pool over all usable cores; torch uses "
        f"torch.set_num_threads({args.threads or common.cpu_cores()}) -- the same number of cores.",
        "Timings are medians of a few steps after warm-up steps; other processes on the host "
        "(see machine.load_average_1_5_15_at_start / _at_end) can slow either framework.",
        "MFU = model FLOPs per step (XLA cost analysis of the jax step, also used for torch) / step "
        "time / peak_flops; on CPU peak_flops is a nominal figure (see peak_flops_source), not a "
        "measurement. matmul_calibration gives the rate a large float32 matmul reaches here.",
    ]


if __name__ == "__main__":
    main()
