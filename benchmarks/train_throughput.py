"""Training throughput: diffusion_jax's train step vs the same UNet in PyTorch diffusers.

One training step is: draw t ~ U{0..T-1} and noise, form x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,
predict eps with the UNet (dropout on), take the mean squared error, backpropagate, clip the
gradient to global norm 1, apply an Adam update (lr 2e-4) and update an EMA of the parameters
(decay 0.9999) -- the DDPM recipe. Ours is ``train.make_train_step`` under ``train.jit_train_step``
(what ``run_train.py`` runs); theirs is diffusers' UNet2DModel with torch.optim.Adam and diffusers'
EMAModel. Both run the same architecture, batch size and resolution.

Each (model, batch size) starts one worker process per framework (peak memory is its own), which
compiles and warms up, then the two are timed interleaved -- ours, theirs, ours, theirs, ... one
step each per round (``interleave.run_pair``) -- so both see the same host load. Reported per case:
compile / first-step time, median step time, the median of the per-round ratios
theirs_time / ours_time with its quartiles and range, the load average before and after (flag
``loaded_host``), images/s, peak memory (host RSS on CPU, device peak on GPU), and for jax XLA's cost analysis
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

from benchmarks import common, interleave  # noqa: E402

# The DDPM recipe of configs/default.py, which the jax side runs through common.train_config.
LEARNING_RATE = 2e-4
NUM_TIMESTEPS = 1000
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999


def plan(args):
    """The cases of a run: (model layout, batch size, warm-up steps, interleaved rounds)."""
    if args.quick:
        return [dict(model="tiny", batch_size=4, warmup=1, rounds=3)]
    if args.device == "gpu":
        return [dict(model="ddpm_cifar10", batch_size=b, warmup=3, rounds=20) for b in (128, 256)] + \
               [dict(model="tiny", batch_size=256, warmup=3, rounds=20)]
    return [dict(model="ddpm_cifar10", batch_size=16, warmup=1, rounds=5),
            dict(model="tiny", batch_size=16, warmup=2, rounds=9),
            dict(model="tiny", batch_size=64, warmup=2, rounds=7)]


def main():
    parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        if case.get("kind") == "matmul":
            common.emit_result(common.matmul_rate(case))
        else:
            setup = jax_setup if case["framework"] == "jax" else torch_setup
            interleave.serve(lambda: setup(case))
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
    cores = args.threads or common.cpu_cores()
    for spec in plan(args):
        ours, theirs = (dict(spec, framework=fw, layout=layouts[spec["model"]], device=args.device,
                             dtype=args.dtype, threads=cores) for fw in ("jax", "torch"))
        print(f"[train] {spec['model']} batch {spec['batch_size']}: {spec['rounds']} rounds "
              "(ours, theirs) ...", flush=True)
        res = interleave.run_pair(os.path.abspath(__file__), ours, theirs, rounds=spec["rounds"],
                                  env_theirs=common.torch_env(args), cores=common.cpu_cores())
        res.update(model=spec["model"], batch_size=spec["batch_size"], warmup=spec["warmup"])
        if "error" not in res:
            _finish(res, args)
        print("   ", _summary(res), flush=True)
        results.append(res)
    path = common.write_results(
        "train_throughput" + ("_quick" if args.quick else ""),
        dict(config=dict(device=args.device, dtype=args.dtype,
                         torch_omp_wait_policy=args.omp_wait_policy, learning_rate=LEARNING_RATE,
                         num_timesteps=NUM_TIMESTEPS, optimizer="adam", grad_clip=GRAD_CLIP,
                         ema_decay=EMA_DECAY, loss="eps MSE, uniform t",
                         layouts=layouts, load_margin=interleave.LOAD_MARGIN),
             matmul_calibration=calibration, results=results, notes=_notes(args)))
    print("wrote", path)


def jax_setup(case):
    """diffusion_jax's train step (``train.make_train_step``) on one (model, batch size):
    compiled and warmed up; returns ``(one_step, info)`` for `interleave.serve`."""
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

    warm = interleave.warm_up(one_step, case["warmup"])
    device = jax.devices()[0]
    info = dict(num_params=num_params, device_kind=device.device_kind, compile_s=round(compile_s, 3),
                first_step_s=round(warm[0], 4) if warm else None, flops_per_step=flops,
                bytes_accessed_per_step=nbytes, rss_before_compile_mb=round(rss_before, 1),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                train_step="diffusion_jax.train.make_train_step (clip, Adam, EMA)")
    if case["device"] == "gpu":
        stats = device.memory_stats() or {}
        info["peak_device_memory_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    return one_step, info


def torch_setup(case):
    """The diffusers UNet2DModel train step on one (model, batch size), warmed up; returns
    ``(one_step, info)`` for `interleave.serve`. ``case["torch_compile"]``: the UNet under
    ``torch.compile`` (the first warm-up step compiles) with ``case["torch_compile_backend"]``
    (default "inductor")."""
    torch, device = common.torch_setup(case["device"], case["threads"])
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    model = common.torch_unet(case["layout"], device)
    model.train()
    forward = torch.compile(model, backend=case.get("torch_compile_backend", "inductor")) \
        if case.get("torch_compile") else model
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
            pred = forward(sched.add_noise(x0, noise, t), t).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        ema.step(model.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()

    flops = None
    if not case.get("torch_compile"):  # the counter is for eager code
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            loss_fn().backward()
        opt.zero_grad(set_to_none=True)
        flops = float(counter.get_total_flops())
    warm = interleave.warm_up(one_step, case["warmup"])
    info = dict(num_params=sum(p.numel() for p in model.parameters()),
                device_kind=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                first_step_s=round(warm[0], 4) if warm else None,
                torch_compile=bool(case.get("torch_compile")),
                torch_flop_counter_fwd_bwd=flops,
                torch_threads=torch.get_num_threads(),
                train_step="diffusers.UNet2DModel; clip_grad_norm_, torch.optim.Adam, "
                           "diffusers EMAModel(foreach=True)")
    if device.type == "cuda":
        info["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return one_step, info


def _image_shape(case):
    lay = case["layout"]
    return (case["batch_size"], lay["image_size"], lay["image_size"], lay["in_channels"])


def _finish(res, args):
    """Adds images/s and, from the XLA FLOP count of our step (the same computation on both
    sides), achieved FLOP/s and MFU to both sides of an interleaved case."""
    b = res["batch_size"]
    flops = res["ours"].get("flops_per_step")
    peak, peak_source = common.device_peak_flops(args.device, args.dtype, res["ours"]["device_kind"])
    res.update(peak_flops=peak, peak_flops_source=peak_source)
    for side in ("ours", "theirs"):
        r = res[side]
        r["images_per_s"] = b / r["median_s"]
        if flops and peak:
            r["achieved_flops"] = flops / r["median_s"]
            r["mfu"] = r["achieved_flops"] / peak


def _summary(res):
    if "error" in res:
        return "ERROR " + res["error"][-500:]
    o, t = res["ours"], res["theirs"]
    s = (f"ours {o['median_s']:.3f} s/step (compile {o['compile_s']:.1f} s), theirs "
         f"{t['median_s']:.3f} s/step; ours/theirs {res['ratio_median']:.2f}x "
         f"[IQR {res['ratio_q1']:.2f}-{res['ratio_q3']:.2f}, range {res['ratio_min']:.2f}-"
         f"{res['ratio_max']:.2f}]; load {res['load_avg_before'][0]} -> {res['load_avg_after'][0]}")
    return s + (" LOADED HOST" if res["loaded_host"] else "")


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
