"""One short GPU run: train step and SD-1.5 UNet step, ours vs diffusers (eager and torch.compile).

Run through ``benchmarks/device_check.sh`` on a fresh machine with one NVIDIA GPU (it installs
what is missing from carried wheels first). Cases, in this order, each in its own process
(``common.run_case_subprocess``) so that jax and torch never hold the GPU at the same time:

1. the 35.7 M DDPM CIFAR-10 train step (``train.build(config).step_fn``: eps loss, clipping,
   Adam, EMA; batch 128, bf16 then float32 at the end) vs diffusers' ``UNet2DModel`` step
   (the same recipe as ``train_throughput.py``), eager and under ``torch.compile``;
2. one SD-1.5 UNet denoising step (``CondUNet(**SD15_UNET)``, bf16 weights and compute, 512x512
   -> 64x64 latents, 77 text tokens; batch 1 and 8) vs diffusers' ``UNet2DConditionModel`` in
   bf16 with its default SDPA attention, eager and under ``torch.compile``.

Reported per case: compile / first-call seconds, median ms/step over the timed calls, images/s,
peak device memory, parameter count (equal on both sides, checked), and MFU = FLOPs per step
(XLA's cost analysis of our step, used for both sides) / step time / the device's data-sheet
peak (``common.GPU_PEAK_FLOPS``). A wall-clock budget (``--budget_s``, default 450 s) is checked
before each case; cases that no longer fit are recorded as skipped, so the run ends in time.
Results: ``<out_dir>/gpu_device_check.json`` and ``.md``.

``--dry_run`` runs the same cases on the CPU with tiny shapes (a smaller ``tiny`` UNet layout, a
two-level conditional UNet, batch 2, one timed call; bf16 only; ``torch.compile`` with the
"eager" backend), all in this one process rather than one process per case, and writes
``dry_run_device_check.*``; the test suite runs it (``--kinds sd``) so the script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, interleave, train_throughput  # noqa: E402

# diffusion_jax.models.cond_unet keyword arguments of the dry run's two-level UNet, and the
# diffusers config of the same network (diffusers' SD-era "attention_head_dim" is the head count).
TINY_COND = dict(block_out_channels=(32, 64), cross_attn=(True, False), layers_per_block=1,
                 num_heads=(2, 2), cross_attention_dim=32)
TINY_COND_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=2)


# The dry run's train-step UNet: the "tiny" layout made smaller still (8x8 images, two levels).
DRY_RUN_TRAIN_LAYOUT = dict(image_size=8, base_channels=16, channel_mult=(1, 2),
                            attn_resolutions=(4,), num_groups=8)


def plan(dry_run: bool) -> list[dict]:
    """The cases in priority order (the budget drops the tail first)."""
    train = dict(kind="train", model="tiny" if dry_run else "ddpm_cifar10",
                 batch_size=2 if dry_run else 128)
    sd = dict(kind="sd", latent=8 if dry_run else 64, text_len=7 if dry_run else 77)
    # The dry run compiles through dynamo with the "eager" backend: the same graph capture,
    # without AOT autograd and inductor's C++ code generation (minutes on a 2-core CPU).
    sides = [dict(framework="jax"), dict(framework="torch"),
             dict(framework="torch", torch_compile=True,
                  torch_compile_backend="eager" if dry_run else "inductor")]
    cases = [dict(train, dtype="bf16", **s) for s in sides]
    for batch in (1, 8):
        cases += [dict(sd, dtype="bf16", batch_size=2 if dry_run else batch, **s) for s in sides]
        if dry_run:
            break
    if not dry_run:  # float32 runs the same code as bf16
        cases += [dict(train, dtype="f32", **s) for s in sides]
    timing = dict(warmup=1, iters=1) if dry_run else dict(warmup=3, iters=10)
    return [dict(c, **timing) for c in cases]


def run_case(case: dict) -> dict:
    """One case in this process: set up, warm up, time; returns its result row."""
    case = dict(case, threads=common.cpu_cores())
    if case["framework"] == "jax":
        setup = train_throughput.jax_setup if case["kind"] == "train" else _sd_jax
        step, info = _with_attention_fallback(setup, case)
    else:
        step, info = (train_throughput.torch_setup if case["kind"] == "train" else _sd_torch)(case)
    timing = common.time_calls(step, warmup=0, iters=case["iters"])
    return dict(case, **info, step_ms=1e3 * timing["median_s"],
                step_ms_all=[round(1e3 * t, 3) for t in timing["times_s"]],
                images_per_s=case["batch_size"] / timing["median_s"])


def _run_in_process(case: dict) -> dict:
    """`run_case` here (the dry run: one CPU process holds jax and torch), errors recorded."""
    try:
        return run_case(case)
    except Exception:  # noqa: BLE001 -- one broken case must not hide the others
        return dict(case, error=traceback.format_exc()[-3000:])


def _with_attention_fallback(setup, case):
    """``setup(case)`` (which compiles and warms up) with the default attention kernels; if that
    fails (cuDNN attention was never run on this device), once more with XLA's plain attention,
    recording the first error."""
    common.setup_jax_env(case["device"])
    from diffusion_jax.models import attention
    error = None
    for impl in ("auto", "xla"):
        try:
            with attention.options(implementation=impl):
                step, info = setup(case)
        except Exception as e:  # noqa: BLE001 -- recorded, then the plain kernel is tried
            if impl == "xla":
                raise
            error = f"{type(e).__name__}: {e}"[:2000]
            continue
        info["attention"] = impl
        if error:
            info["attention_auto_error"] = error
        return step, info


def _sd_jax(case):
    """Our bf16 conditional UNet step (``CondUNet``), compiled and warmed up."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from diffusion_jax.models.cond_unet import SD15_UNET, CondUNet

    kwargs = TINY_COND if case["dry_run"] else SD15_UNET
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CondUNet(
        **kwargs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    # Random N(0, 0.02^2) parameters drawn in numpy: eager initialisers dispatch (and compile)
    # op by op, half a minute even for the tiny UNet on a busy CPU; zeros would flatter matmuls.
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32), a.dtype),
        nnx.to_pure_dict(state)))
    b, side = case["batch_size"], case["latent"]
    key = jax.random.key(1)
    z = jax.random.normal(key, (b, side, side, 4), jnp.float32)
    t = jnp.full((b,), 500, jnp.int32)
    text = jax.random.normal(key, (b, case["text_len"], kwargs["cross_attention_dim"]),
                             jnp.bfloat16)
    start = time.perf_counter()
    compiled = jax.jit(lambda s, z, t, c: nnx.merge(graphdef, s)(z, t, {"text": c})
                       ).lower(state, z, t, text).compile()
    compile_s = time.perf_counter() - start
    step = lambda: compiled(state, z, t, text).block_until_ready()  # noqa: E731
    warm = interleave.warm_up(step, case["warmup"])
    info = dict(num_params=int(sum(x.size for x in jax.tree.leaves(state))),
                device_kind=jax.devices()[0].device_kind, compile_s=round(compile_s, 3),
                first_step_s=round(warm[0], 4) if warm else None)
    info["flops_per_step"], info["bytes_accessed_per_step"] = common.xla_cost(compiled)
    mem = compiled.memory_analysis()
    info["xla_temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
    if case["device"] == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        info["peak_device_memory_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    return step, info


def _sd_torch(case):
    """diffusers' UNet2DConditionModel in bf16 (SDPA attention), eager or ``torch.compile``d,
    warmed up."""
    torch, device = common.torch_setup(case["device"], common.cpu_cores())
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = TINY_COND_DIFFUSERS if case["dry_run"] else common.SD15_DIFFUSERS
    unet = UNet2DConditionModel(**config).to(device=device, dtype=torch.bfloat16).eval()
    forward = torch.compile(unet, backend=case["torch_compile_backend"]) \
        if case.get("torch_compile") else unet
    b, side = case["batch_size"], case["latent"]
    z = torch.randn(b, 4, side, side, device=device, dtype=torch.bfloat16)
    t = torch.full((b,), 500, device=device)
    text = torch.randn(b, case["text_len"], config["cross_attention_dim"], device=device,
                       dtype=torch.bfloat16)

    def step():
        with torch.no_grad():
            forward(z, t, text)
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = interleave.warm_up(step, case["warmup"])
    info = dict(num_params=sum(p.numel() for p in unet.parameters()),
                device_kind=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                first_step_s=round(warm[0], 4) if warm else None,
                attention=type(next(iter(unet.attn_processors.values()))).__name__)
    if device.type == "cuda":
        info["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return step, info


def _finish(rows: list[dict], device: str) -> None:
    """MFU from our FLOP count per (kind, dtype, batch) for every side; the parameter-count
    check between ours and diffusers."""
    ours = {(r["kind"], r["dtype"], r["batch_size"]): r for r in rows
            if r.get("framework") == "jax" and "error" not in r and "skipped" not in r}
    for r in rows:
        ref = ours.get((r["kind"], r["dtype"], r["batch_size"]))
        if ref is None or "step_ms" not in r:
            continue
        flops = ref.get("flops_per_step")
        peak, source = common.device_peak_flops(device, r["dtype"], ref.get("device_kind", ""))
        r.update(peak_flops=peak, peak_flops_source=source)
        if flops and peak:
            r["mfu"] = flops / (r["step_ms"] / 1e3) / peak
        r["same_num_params_as_ours"] = r.get("num_params") == ref.get("num_params")


def _markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| case | side | ms/step | images/s | MFU | compile / first call s | peak mem MiB "
             "| note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['kind']} {r['dtype']} batch {r['batch_size']}"
        side = {"jax": "ours"}.get(r["framework"], "diffusers " + (
            "torch.compile" if r.get("torch_compile") else "eager"))
        if "step_ms" not in r:
            lines.append(f"| {name} | {side} | - | - | - | - | - | "
                         f"{r.get('skipped') or r.get('error', '')[-200:]!s} |".replace("\n", " "))
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        first = r.get("compile_s", r.get("first_step_s"))
        mem = r.get("peak_device_memory_mb")
        note = f"attention {r.get('attention', '')}".strip()
        lines.append(f"| {name} | {side} | {r['step_ms']:.2f} | {r['images_per_s']:.1f} | {mfu} | "
                     f"{first if first is not None else '-'} | "
                     f"{f'{mem:.0f}' if mem else '-'} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Runs the cases; returns 1 if any failed (skipped ones are no failure)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", "--dry-run", action="store_true",
                        help="tiny shapes on the CPU (the test suite runs this)")
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="wall-clock seconds for all cases; later cases are skipped")
    parser.add_argument("--kinds", nargs="+", default=["train", "sd"], choices=["train", "sd"],
                        help="which cases to run (the test suite's dry run takes sd only)")
    parser.add_argument("--out_dir", default=common.RESULTS_DIR)
    parser.add_argument("--case", default=None, help="internal: one case, run in this process")
    args = parser.parse_args(argv)
    if args.case:
        common.emit_result(run_case(json.loads(args.case)))
        return 0
    device = "cpu" if args.dry_run else "gpu"
    if args.dry_run:  # torch runs in this process: keep its OpenMP threads from spinning
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    layouts = {}
    rows = []
    for case in [c for c in plan(args.dry_run) if c["kind"] in args.kinds]:
        case = dict(case, device=device, dry_run=args.dry_run)
        if case["kind"] == "train":  # from the parent: torch children never import jax
            if case["model"] not in layouts:
                layouts[case["model"]] = common.layout(case["model"])
                if args.dry_run:
                    layouts[case["model"]].update(DRY_RUN_TRAIN_LAYOUT)
            case["layout"] = layouts[case["model"]]
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            rows.append(dict(case, skipped=f"time budget ({args.budget_s:.0f} s) spent"))
            continue
        if args.dry_run:
            row = _run_in_process(case)
        else:
            row = common.run_case_subprocess(os.path.abspath(__file__), case, timeout=int(left))
        row.pop("layout", None)
        rows.append(row)
        status = (f"{row['step_ms']:.2f} ms/step" if "step_ms" in row
                  else "ERROR " + row.get("error", "")[-300:])
        print(f"[device_check] {case['kind']} {case['dtype']} b{case['batch_size']} "
              f"{case['framework']}{' compile' if case.get('torch_compile') else ''}: {status} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    _finish(rows, device)
    name = "dry_run_device_check" if args.dry_run else "gpu_device_check"
    os.makedirs(args.out_dir, exist_ok=True)
    payload = dict(benchmark=name, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   command="python " + " ".join(sys.argv),
                   wall_s=round(time.perf_counter() - start, 1),
                   machine=common.machine_info(), versions=common.versions(), rows=rows)
    with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    header = (f"# {name}\n\n{payload['date']}, `{payload['command']}`, wall {payload['wall_s']} s, "
              f"load {payload['machine']['load_average_1_5_15_at_start']} -> "
              f"{payload['machine']['load_average_1_5_15_at_end']}; MFU against "
              f"{next((r['peak_flops_source'] for r in rows if r.get('peak_flops_source')), '-')}")
    with open(os.path.join(args.out_dir, name + ".md"), "w") as f:
        f.write(_markdown(rows, header))
    errors = [r for r in rows if "error" in r]
    print(f"[device_check] wrote {args.out_dir}/{name}.json|md; {len(errors)} errors", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
