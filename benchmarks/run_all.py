"""Runs every benchmark and writes ``benchmarks/results/*.json`` and ``results/latest.md``.

    .venv/bin/python benchmarks/run_all.py              # `make bench`: CPU; 29 min on 2 cores shared with load ~5
    .venv/bin/python benchmarks/run_all.py --quick      # a minute or two; checks the scripts only
    .venv/bin/python benchmarks/run_all.py --only sample
    .venv/bin/python benchmarks/run_all.py --device gpu --dtype bf16

The scripts run one after another, each case in its own process: train_throughput.py (ours vs
diffusers, training), sample_throughput.py (DDPM / DDIM sampling), scaling.py (data-parallel and
FSDP on fake CPU devices). ``latest.md`` renders the JSON files as the tables of the README's
Performance section; ``python benchmarks/run_all.py --render`` rewrites it from the JSON alone.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, interleave  # noqa: E402

BENCHMARKS = ("train_throughput", "sample_throughput", "scaling")


def main():
    parser = argparse.ArgumentParser(description="Runs all benchmarks and renders results/latest.md.")
    parser.add_argument("--only", choices=BENCHMARKS, action="append",
                        help="run only this benchmark (repeatable); default all")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite latest.md from the JSON files already in results/")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default="PASSIVE")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    command = " ".join([".venv/bin/python", "benchmarks/run_all.py"] +
                       [a for a in sys.argv[1:] if a != "--render"])
    if not args.render:
        flags = ["--device", args.device, "--dtype", args.dtype,
                 "--omp-wait-policy", args.omp_wait_policy] + (["--quick"] if args.quick else [])
        if args.threads:
            flags += ["--threads", str(args.threads)]
        for name in args.only or BENCHMARKS:
            if name == "scaling" and args.device == "gpu":
                continue  # fake devices are a CPU feature
            t0 = time.perf_counter()
            print(f"=== {name} ===", flush=True)
            script = os.path.join(common.BENCH_DIR, f"{name}.py")
            subprocess.run([sys.executable, script] + flags, check=True)
            print(f"=== {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    path = os.path.join(common.RESULTS_DIR, f"latest{suffix}.md")
    with open(path, "w") as f:
        f.write(render(suffix, command))
    print("wrote", path)


def render(suffix="", command=".venv/bin/python benchmarks/run_all.py"):
    """Markdown tables from ``results/<benchmark><suffix>.json`` (missing files are skipped)."""
    runs = {}
    for name in BENCHMARKS:
        path = os.path.join(common.RESULTS_DIR, f"{name}{suffix}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)
    if not runs:
        return "No results yet: run `make bench`.\n"
    first = next(iter(runs.values()))
    m, v = first["machine"], first["versions"]
    lines = [
        f"Produced by `{command}` on {first['date'][:10]}.",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores_usable']} cores at {m['cpu_mhz']:.0f} MHz, "
        f"{m['memory_gib']} GiB ({m['platform']}). Versions: jax {v['jax']}, flax {v['flax']}, "
        f"optax {v['optax']}, torch {v['torch']}, diffusers {v['diffusers']}.",
        "Load average (1 min) per benchmark, start / end: " + ", ".join(
            f"{name} ({r['date'][:10]}) {r['machine']['load_average_1_5_15_at_start'][0]} / "
            f"{r['machine']['load_average_1_5_15_at_end'][0]}" for name, r in runs.items()) +
        f" -- a result is flagged **loaded host** above usable cores + "
        f"{interleave.LOAD_MARGIN}; the benchmark itself keeps every core busy.",
        "",
    ]
    if "train_throughput" in runs:
        lines += _render_train(runs["train_throughput"])
    if "sample_throughput" in runs:
        lines += _render_sample(runs["sample_throughput"])
    if "scaling" in runs:
        lines += _render_scaling(runs["scaling"])
    lines += [f"Not in this run: {name} (`benchmarks/run_all.py --only {name}`)."
              for name in BENCHMARKS if name not in runs]
    return "\n".join(lines) + "\n"


def _render_train(run):
    cfg = run["config"]
    out = [f"### Training step ({cfg['device']}, {cfg['dtype']})", "",
           "Ours: `train.make_train_step` under `train.jit_train_step` (the step `run_train.py` runs). "
           "Theirs: diffusers `UNet2DModel` in the same layout, `torch.optim.Adam`, "
           "`clip_grad_norm_`, `EMAModel`. Both: eps-MSE loss, Adam 2e-4, clip 1.0, EMA 0.9999. "
           "Timed interleaved (ours, theirs, ... one step each per round); ratio = median of the "
           "per-round ratios theirs_time / ours_time, with interquartile range and min-max.", "",
           "| model | params | batch | rounds | ours step (s) | theirs step (s) | ours / theirs "
           "[IQR] (min-max) | ours compile (s) | peak RSS ours / theirs (MB) | GFLOP/step (XLA) "
           "| MB accessed/step (XLA) | MFU ours / theirs | load 1 min before / after |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["results"]:
        if "error" in r:
            out.append(f"| {r['model']} | | {r['batch_size']} | | error | | | | | | | | |")
            continue
        o, t = r["ours"], r["theirs"]
        flops, nbytes = o.get("flops_per_step"), o.get("bytes_accessed_per_step")
        out.append(
            f"| {r['model']} | {o['num_params'] / 1e6:.2f} M | {r['batch_size']} | {r['rounds']} "
            f"| {o['median_s']:.3f} | {t['median_s']:.3f} | {_ratio(r)} | {_num(o.get('compile_s'), 1)} "
            f"| {o['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} | {_num(flops and flops / 1e9, 1)} "
            f"| {_num(nbytes and nbytes / 2**20, 0)} | {_pct(o.get('mfu'))} / {_pct(t.get('mfu'))} "
            f"| {_load(r)} |")
    out.append("")
    peak = next((r for r in run["results"] if r.get("peak_flops_source")), None)
    if peak:
        out.append(f"- MFU against a peak of {peak['peak_flops'] / 1e9:.0f} GFLOP/s "
                   f"({peak['peak_flops_source']}); torch uses the same XLA FLOP count.")
    cal = [c for c in run.get("matmul_calibration", []) if "error" not in c]
    if cal:
        out.append("- A large float32 matmul reaches " + ", ".join(
            f"{c['flops_per_s'] / 1e9:.0f} GFLOP/s ({c['framework']}, {c['size']}^2)" for c in cal)
            + " here: the attainable rate.")
    return out + _loaded_note(run) + [""]


def _render_sample(run):
    cfg = run["config"]
    out = [f"### Sampling ({cfg['device']}, {cfg['dtype']})", "",
           "Ours: `samplers.ddpm_sample` / `ddim_sample` (one jitted `lax.scan`). Theirs: diffusers "
           "`DDPMPipeline` / `DDIMPipeline`. DDPM 1000 steps, DDIM 50 steps (eta 0), x0 clipped. "
           "*extrapolated*: each call ran `measured steps` and the full chain is per-step time x "
           "steps. Timed interleaved, one call each per round; ratio as for training.",
           "", "| model | sampler | batch | measured steps | rounds | ours ms/step | theirs ms/step "
           "| ours / theirs [IQR] (min-max) | ours full chain (s) | theirs full chain (s) "
           "| ours compile (s) | load 1 min before / after |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["results"]:
        if "error" in r:
            out.append(f"| {r['model']} | {r['sampler']} | {r['batch_size']} | | | error "
                       "| | | | | | |")
            continue
        o, t = r["ours"], r["theirs"]
        tag = " (extrapolated)" if r["extrapolated"] else ""
        out.append(
            f"| {r['model']} | {r['sampler'].upper()} {r['full_steps']} | {r['batch_size']} "
            f"| {r['measured_steps']} | {r['rounds']} | {1e3 * o['step_s']:.1f} "
            f"| {1e3 * t['step_s']:.1f} | {_ratio(r)} | {o['full_chain_s']:.1f}{tag} "
            f"| {t['full_chain_s']:.1f}{tag} | {o['compile_s']:.1f} | {_load(r)} |")
    return out + _loaded_note(run) + [""]


def _ratio(r):
    return (f"**{r['ratio_median']:.2f}x** [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}] "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")


def _load(r):
    flag = " **loaded host**" if r["loaded_host"] else ""
    return f"{r['load_avg_before'][0]} / {r['load_avg_after'][0]}{flag}"


def _loaded_note(run):
    loaded = [r for r in run["results"] if r.get("loaded_host")]
    if not loaded:
        return []
    return [f"- **loaded host**: {len(loaded)} of {len(run['results'])} cases ran while the "
            f"1-minute load exceeded usable cores + {run['config'].get('load_margin')}: other "
            "processes shared the CPU, so these numbers must not be quoted as this project's "
            "performance."]


def _render_scaling(run):
    out = ["### Sharded train step on fake CPU devices (simulation)", "",
           "`XLA_FLAGS=--xla_force_host_platform_device_count=N`: the N devices share the same cores, "
           "so step time shows overhead, not speed-up. The collectives and per-device state are those "
           "of the real program. Global batch fixed.", "",
           "| mode | devices | mesh (data, fsdp) | step (s) | compile (s) | collectives per step "
           "| collective MB/step | state MB/device | GFLOP/step/device |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in run["results"]:
        if "error" in r:
            out.append(f"| {r['mode']} | {r['devices']} | error | | | | | | |")
            continue
        coll = ", ".join(f"{k} {n}" for k, n in sorted(r["collectives"].items())) or "none"
        mesh = f"({r['mesh']['data']}, {r['mesh']['fsdp']})"
        out.append(
            f"| {r['mode'] if r['devices'] > 1 else '-'} | {r['devices']} | {mesh} "
            f"| {r['step_s_median']:.3f} | {r['compile_s']:.1f} | {coll} "
            f"| {r['collective_mb_per_step']:.1f} | {r['state_mb_per_device']} "
            f"| {_num(r['flops_per_step_per_device'] and r['flops_per_step_per_device'] / 1e9, 2)} |")
    model = run["results"][0]
    out.append("")
    out.append(f"Model: {model['model']} ({model.get('num_params', 0) / 1e6:.2f} M parameters), "
               f"global batch {model['batch_size']}.")
    return out + [""]


def _num(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    main()
