"""Convolution kernels alone: XLA:CPU (what our train step runs) vs PyTorch (oneDNN), per shape.

The 3x3 convolutions of the 35.7 M DDPM CIFAR-10 UNet at batch 16, each timed three ways on
our side -- forward, weight gradient, input gradient, each its own ``jax.jit`` of
``lax.conv_general_dilated`` (NHWC / HWIO, "SAME") or its ``jax.vjp`` -- and two ways on
theirs -- ``conv2d`` forward under ``no_grad``, and forward + backward for both gradients
(``torch.autograd.grad``; NCHW, the layout diffusers runs). The rows are the shapes of the UNet's
convolutions (channels in -> out at a resolution); "count" is how many convolutions of the UNet
have that shape, so ``sum(count * time)`` approximates the convolution part of one train step.

All calls of one shape are timed interleaved (one call each per round, ``--rounds`` rounds) in
one process with 2 intra-op threads on both sides; the minimum over rounds is reported (the
least-disturbed call). The 1-minute load is recorded before and after, and the run is flagged
"loaded host" above cores + 0.5, as the other benchmarks do.

    .venv/bin/python benchmarks/conv_kernels.py            # about 1 minute on 2 idle cores
    .venv/bin/python benchmarks/conv_kernels.py --quick    # seconds; checks the script

Writes ``results/conv_kernels.json`` and ``results/conv_kernels.md``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, interleave  # noqa: E402

# (resolution, channels in, channels out, count in the ddpm_cifar10 UNet): conv_in / conv_out
# (3 channels) are left out; 1x1 skip convolutions are a few percent of the FLOPs.
# Counted from the layout (ch 128, mult (1, 2, 2, 2), 2 res blocks + the up path's extra one,
# skip concatenations, nearest-neighbour upsampling + conv); stride-2 downsampling is left out.
SHAPES = ((32, 128, 128, 7), (32, 256, 128, 2), (32, 384, 128, 1), (32, 256, 256, 1),
          (16, 128, 256, 1), (16, 256, 256, 7), (16, 512, 256, 2), (16, 384, 256, 1),
          (8, 256, 256, 8), (8, 512, 256, 3), (4, 256, 256, 11), (4, 512, 256, 3))
QUICK_SHAPES = ((8, 32, 32, 1),)
CALLS = ("xla_fwd", "xla_wgrad", "xla_dgrad", "torch_fwd", "torch_fwd_bwd")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small shape, 2 rounds")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    common.setup_jax_env("cpu")
    cores = common.cpu_cores()
    load_before = interleave.load_1min()
    rows = [time_shape(args.batch, *shape, rounds=2 if args.quick else args.rounds, threads=cores)
            for shape in (QUICK_SHAPES if args.quick else SHAPES)]
    load_after = interleave.load_1min()
    payload = dict(batch=args.batch, rounds=args.rounds, threads=cores, rows=rows,
                   load_1min_before=load_before, load_1min_after=load_after,
                   load_threshold=cores + interleave.LOAD_MARGIN,
                   loaded_host=interleave.is_loaded([load_before, load_after], cores))
    name = "conv_kernels" + ("_quick" if args.quick else "")
    path = common.write_results(name, payload)
    with open(os.path.join(common.RESULTS_DIR, name + ".md"), "w") as f:
        f.write(render(payload))
    print("wrote", path)


def time_shape(batch, size, c_in, c_out, count, *, rounds, threads):
    """Minimum milliseconds of every call in ``CALLS`` for one convolution shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, c_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, size, size, c_out)), jnp.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    wgrad = jax.jit(lambda x, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0])
    dgrad = jax.jit(lambda w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0])
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
    wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()
    dyt = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, padding=1)

    def torch_fwd_bwd():
        y = torch.nn.functional.conv2d(xt, wt, padding=1)
        torch.autograd.grad(y, (xt, wt), dyt)

    calls = dict(xla_fwd=lambda: jax.block_until_ready(fwd(x, w)),
                 xla_wgrad=lambda: jax.block_until_ready(wgrad(x, dy)),
                 xla_dgrad=lambda: jax.block_until_ready(dgrad(w, dy)),
                 torch_fwd=torch_fwd, torch_fwd_bwd=torch_fwd_bwd)
    for call in calls.values():  # compile / warm up
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * min(t) for name, t in times.items()}
    gflop = 2 * batch * size * size * c_in * c_out * 9 / 1e9
    row = dict(size=size, c_in=c_in, c_out=c_out, count=count, gflop_per_pass=gflop, ms=ms)
    print(f"[conv] {size}x{size} {c_in}->{c_out}: " +
          " ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
    return row


def render(p):
    """The per-shape table and the count-weighted totals as markdown."""
    flag = " **Loaded host: do not quote these numbers.**" if p["loaded_host"] else ""
    lines = [f"Produced by `.venv/bin/python benchmarks/conv_kernels.py`: batch {p['batch']}, "
             f"{p['threads']} threads per side, minimum of {p['rounds']} interleaved rounds. "
             f"1-minute load {p['load_1min_before']} before, {p['load_1min_after']} after "
             f"(threshold {p['load_threshold']}).{flag}", "",
             "| res | in -> out | count | XLA fwd | XLA wgrad | XLA dgrad | XLA fwd+wgrad+dgrad "
             "| torch fwd | torch fwd+bwd | torch / XLA (fwd+bwd) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    total_xla = total_torch = 0.0
    for r in p["rows"]:
        m = r["ms"]
        xla = m["xla_fwd"] + m["xla_wgrad"] + m["xla_dgrad"]
        total_xla += r["count"] * xla
        total_torch += r["count"] * m["torch_fwd_bwd"]
        lines.append(f"| {r['size']} | {r['c_in']} -> {r['c_out']} | {r['count']} | "
                     f"{m['xla_fwd']:.1f} | {m['xla_wgrad']:.1f} | {m['xla_dgrad']:.1f} | {xla:.1f} | "
                     f"{m['torch_fwd']:.1f} | {m['torch_fwd_bwd']:.1f} | "
                     f"{m['torch_fwd_bwd'] / xla:.2f}x |")
    lines += ["", f"Count-weighted sum of forward + backward over the UNet's 3x3 convolutions: "
              f"XLA {total_xla:.0f} ms, torch {total_torch:.0f} ms "
              f"(torch / XLA = {total_torch / total_xla:.2f}x). Times in ms per call.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
