"""Data-parallel and FSDP train steps on 1, 2, 4 and 8 simulated CPU devices.

Each case starts a process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before
jax is imported) and runs the project's sharded train step (``train.jit_train_step``) on a
``("data", "fsdp")`` mesh of ``data=N`` (parameters replicated, gradients all-reduced) or
``fsdp=N`` (parameters, Adam moments and EMA split over devices, gathered for compute). The global
batch is fixed (strong scaling).

This is a simulation of the collective pattern, not a speed-up measurement: the N fake devices
share the same physical cores, so step time can only grow with N. What carries over to real
hardware is the program XLA builds for each mesh: the collectives per step (count and bytes, read
from the compiled HLO), the FLOPs each device runs, and the per-device memory of the state
(``compiled.memory_analysis()``), which FSDP divides by N.

Usage:
    .venv/bin/python benchmarks/scaling.py            # ~10 min on 2 busy cores, mostly compilation
    .venv/bin/python benchmarks/scaling.py --quick
"""
import argparse
import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_DTYPE_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8,
                    u64=8, f64=8)


def plan(args):
    """Cases: (devices, mode) with the model, global batch and timed steps."""
    model = "tiny"
    if args.quick:
        return [dict(model=model, batch_size=8, devices=n, mode="data", warmup=1, iters=1)
                for n in (1, 2)]
    cases = [dict(model=model, batch_size=16, devices=1, mode="data", warmup=1, iters=2)]
    for mode in ("data", "fsdp"):
        cases += [dict(model=model, batch_size=16, devices=n, mode=mode, warmup=1, iters=2)
                  for n in (2, 4, 8)]
    return cases


def main():
    parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    if args.case:
        common.emit_result(run_case(json.loads(args.case)))
        return
    layouts = {spec["model"]: common.layout(spec["model"]) for spec in plan(args)}
    results = []
    for spec in plan(args):
        case = dict(spec, layout=layouts[spec["model"]], device="cpu", dtype=args.dtype)
        print(f"[scaling] {spec['mode']} x {spec['devices']} devices ...", flush=True)
        res = common.run_case_subprocess(os.path.abspath(__file__), case)
        print("   ", _summary(res), flush=True)
        results.append(res)
    path = common.write_results(
        "scaling" + ("_quick" if args.quick else ""),
        dict(config=dict(dtype=args.dtype, layouts=layouts,
                         fake_devices="XLA_FLAGS=--xla_force_host_platform_device_count=N"),
             results=results,
             notes=["Simulation: N fake XLA CPU devices share the host's cores, so time per step "
                    "does not show real speed-up; collectives and per-device memory/FLOPs do.",
                    "collectives: ops in the compiled (SPMD-partitioned) HLO of one device; bytes "
                    "are the sizes of their results.",
                    "state_mb_per_device: argument bytes of the compiled step on one device (train "
                    "state + batch shard), from compiled.memory_analysis()."]))
    print("wrote", path)


def run_case(case):
    """Compiles and times the sharded train step on ``case['devices']`` fake CPU devices."""
    common.setup_jax_env("cpu", fake_devices=case["devices"])
    import jax

    n, mode = case["devices"], case["mode"]
    config = common.train_config(case["layout"], batch_size=case["batch_size"], dtype=case["dtype"],
                                 mesh_data=n if mode == "data" else 1,
                                 mesh_fsdp=n if mode == "fsdp" else 1)
    step, state, batch, mesh, num_params = common.jax_train_setup(config)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops, nbytes = common.xla_cost(compiled)
    mem = compiled.memory_analysis()
    box = dict(state=state)

    def one_step():
        box["state"], metrics = compiled(box["state"], batch)
        jax.block_until_ready(metrics["loss"])

    timing = common.time_calls(one_step, warmup=case["warmup"], iters=case["iters"])
    counts, coll_bytes = collective_stats(compiled.as_text())
    return dict(case, num_params=num_params, mesh=dict(mesh.shape), jax_devices=jax.device_count(),
                compile_s=round(compile_s, 3), step_s_median=round(timing["median_s"], 4),
                step_s_all=[round(t, 4) for t in timing["times_s"]],
                images_per_s=case["batch_size"] / timing["median_s"],
                flops_per_step_per_device=flops, bytes_accessed_per_step_per_device=nbytes,
                collectives=counts, collective_mb_per_step=round(coll_bytes / 2**20, 3),
                state_mb_per_device=None if mem is None else round(
                    mem.argument_size_in_bytes / 2**20, 2),
                temp_mb_per_device=None if mem is None else round(mem.temp_size_in_bytes / 2**20, 2),
                peak_rss_mb=round(common.peak_rss_mb(), 1))


def collective_stats(hlo_text):
    """Counts collective ops in HLO text and sums the bytes of their results.

    Args:
      hlo_text: ``compiled.as_text()`` of an SPMD-partitioned program (one device's view).

    Returns:
      (counts, total_bytes): ``{op name: count}`` and the summed result sizes in bytes (the data
      each device receives); asynchronous ``*-start`` / ``*-done`` pairs count once.
    """
    counts = collections.Counter()
    total = 0
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if not m:
            continue
        counts[m.group(2)] += 1
        for dtype, dims in _SHAPE_RE.findall(m.group(1)):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            total += size * _DTYPE_BYTES[dtype]
    return dict(counts), total


def _summary(res):
    if "error" in res:
        return "ERROR " + res["error"][-500:]
    return (f"mesh {res['mesh']}: {res['step_s_median']:.3f} s/step, compile {res['compile_s']:.1f} s, "
            f"collectives {res['collectives']} ({res['collective_mb_per_step']:.1f} MB), "
            f"state {res['state_mb_per_device']} MB/device")


if __name__ == "__main__":
    main()
