"""Sample quality vs network evaluations (NFE) of every solver on a trained digits model.

    python scripts/quality_vs_nfe.py --workdir=demo/workdir --out=benchmarks/results \
        [--num_samples=512] [--nfe=5,10,20,50,100] [--seed=0]

For each target NFE the solvers get the step count that spends at most that many evaluations:
DDIM and DPM-Solver++ (2M) ``N`` steps (``N`` evaluations), EDM's Heun ``(N + 1) // 2`` steps
(``2 steps - 1``), predictor--corrector (VP, reverse diffusion + Langevin) ``N // 2`` steps
(2 per step; score_sde's VP discretisation needs more than ``beta_max`` steps: ``n/a`` below),
the probability-flow ODE with fixed-step RK4 ``(N - 1) // 4`` steps. The adaptive probability-flow ODE (Tsit5, PID controller) runs at a
ladder of tolerances instead and reports what it spent. Every NFE in the table is *counted* (a
host callback in the denoiser) and compared with
:func:`diffusion_jax.samplers.num_evaluations` for the fixed-step solvers (a mismatch is
printed). The samples are scored with the digits metric
(:class:`diffusion_jax.digits_classifier.DigitsMetric`: calibrated confident share and
digit-FD against real digits; the held-out real digits give the reference row).

Writes ``OUT/quality_vs_nfe.md`` (table), ``OUT/quality_vs_nfe.json`` and
``OUT/quality_vs_nfe.png`` (digit-FD and confident share against NFE, drawn with PIL).
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags
from flax import nnx
from PIL import Image, ImageDraw

from diffusion_jax import denoisers, digits_classifier, loading, samplers
from diffusion_jax.cli import flags

_WORKDIR = flags.define_workdir("Trained digits workdir.")
_OUT = flags.define_out(default="benchmarks/results")
_NUM = absl_flags.DEFINE_integer("num_samples", 512, "Samples per setting.")
_NFE = absl_flags.DEFINE_list("nfe", ["5", "10", "20", "50", "100"], "Target NFEs.")
_TOLS = absl_flags.DEFINE_list("tolerances", ["0.3", "0.1", "0.03", "0.01", "0.001"],
                               "rtol = atol ladder of the adaptive ODE.")
_SEED = flags.define_seed("Sampling / metric seed.")
absl_flags.mark_flags_as_required(["workdir"])

SOLVERS = {  # name -> (registry name, options overrides, steps for a target NFE)
    "DDIM": ("ddim", {}, lambda n: n),
    "DPM-Solver++(2M)": ("dpm_solver_pp", {}, lambda n: n),
    "EDM Heun": ("edm_heun", {}, lambda n: (n + 1) // 2),
    # score_sde's VP discretisation (reverse diffusion, Langevin) needs N > beta_max = 20 steps.
    "PC (RD + Langevin)": ("pc", {}, lambda n: max(1, n // 2)),
    # probability-flow ODE, fixed-step RK4: 4 evaluations per step + 1 final denoising step.
    "ODE RK4": ("probability_flow", {"method": "rk4"}, lambda n: max(1, (n - 1) // 4)),
}


def main():
    loaded = loading.load(workdir=_WORKDIR.value)
    base = samplers.options_from_config(loaded.config)
    metric = digits_classifier.DigitsMetric(seed=_SEED.value)
    counter = _Counter()
    sample = _make_sampler(loaded, counter, _NUM.value)
    rows = {}
    for label, (name, extra, steps_for) in SOLVERS.items():
        for target in map(int, _NFE.value):
            options = dataclasses.replace(base, num_steps=steps_for(target), **extra)
            try:
                images, nfe = sample(name, options, counter)
            except ValueError as err:         # e.g. pc below its minimum number of steps
                rows.setdefault(label, []).append(dict(target_nfe=target, nfe=None,
                                                       skipped=str(err)))
                print(label, target, "skipped:", err, flush=True)
                continue
            expected = samplers.num_evaluations(name, options, loaded.schedule.num_timesteps)
            if nfe != expected:
                print(f"WARNING {name}: counted {nfe} evaluations, num_evaluations says "
                      f"{expected}; the table shows the counted number.", flush=True)
            rows.setdefault(label, []).append(_score(metric, images, nfe, target))
            print(label, rows[label][-1], flush=True)
    for tol in map(float, _TOLS.value):
        options = dataclasses.replace(base, method="tsit5", rtol=tol, atol=tol)
        images, nfe = sample("probability_flow", options, counter)
        rows.setdefault("ODE Tsit5 (adaptive)", []).append(
            dict(_score(metric, images, nfe, None), tolerance=tol))
        print("ODE", rows["ODE Tsit5 (adaptive)"][-1], flush=True)
    real = metric.reference(digits_classifier.DIGITS_SIZE)["heldout_vs_train"]
    os.makedirs(_OUT.value, exist_ok=True)
    result = dict(workdir=_WORKDIR.value, num_samples=_NUM.value, seed=_SEED.value,
                  real=dict(confidence_share=real["confidence_share"],
                            digit_fd=real["digit_fd"]), solvers=rows)
    with open(os.path.join(_OUT.value, "quality_vs_nfe.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(_OUT.value, "quality_vs_nfe.md"), "w") as f:
        f.write(_markdown(result))
    _plot(result, os.path.join(_OUT.value, "quality_vs_nfe.png"))
    print(_markdown(result))


class _Counter:
    """Counts denoiser calls through a host callback (each call is one batched evaluation)."""

    def __init__(self):
        self.calls = 0

    def bump(self):
        self.calls += 1


def _make_sampler(loaded, counter, num):
    """``sample(name, options, counter) -> (images [num, 8, 8, 1] host, counted NFE)``."""
    config = loaded.config
    shape = (num, config.data.image_size, config.data.image_size, config.data.num_channels)
    compiled = {}

    def run(name, options, params, key):
        denoise = denoisers.build_denoiser(nnx.merge(loaded.graphdef, params),
                                           diffusion=config.diffusion, schedule=loaded.schedule)

        def counted(x, t):
            jax.debug.callback(counter.bump)
            return denoise(x, t)

        x_init = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        return samplers.run(name, denoise.wrap(counted), loaded.schedule, x_init, jax.random.fold_in(key, 1),
                            options)

    def sample(name, options, counter_):
        static = (name, jax.tree_util.tree_structure(options))
        if static not in compiled:
            compiled[static] = jax.jit(lambda o, p, k, name=name: run(name, o, p, k))
        counter_.calls = 0
        images = compiled[static](options, loaded.params, jax.random.key(_SEED.value))
        images = np.asarray(jax.block_until_ready(images))
        jax.effects_barrier()
        samplers.check_finite(images, name)
        return images, counter_.calls

    return sample


def _score(metric, images, nfe, target):
    scores = metric(np.clip(images, -1.0, 1.0))
    return dict(target_nfe=target, nfe=nfe, confidence_share=scores["confidence_share"],
                digit_fd=scores["digit_fd"])


def _markdown(result):
    targets = [int(n) for n in _NFE.value]
    command = ("python scripts/quality_vs_nfe.py " + " ".join(sys.argv[1:])).strip()
    lines = [f"`{command}`\n",
             f"Digits metric (confident share / digit-FD; real held-out digits: "
             f"{result['real']['confidence_share']:.3f} / {result['real']['digit_fd']:.2f}) "
             f"of {result['num_samples']} samples per cell, by network evaluations (NFE).\n",
             "| solver | " + " | ".join(f"NFE {n}" for n in targets) + " |",
             "| --- |" + " --- |" * len(targets)]
    for label, cells in result["solvers"].items():
        if cells[0]["target_nfe"] is None:
            continue
        text = ["n/a" if c["nfe"] is None else f"{c['confidence_share']:.3f} / {c['digit_fd']:.2f}"
                + ("" if c["nfe"] == c["target_nfe"] else f" ({c['nfe']})") for c in cells]
        lines.append(f"| {label} | " + " | ".join(text) + " |")
    lines.append("\nNFE in parentheses where the solver's step rule gives fewer than the column's; "
                 "n/a: not runnable at that NFE (the reason is in the JSON's `skipped`).")
    odes = result["solvers"].get("ODE Tsit5 (adaptive)", [])
    if odes:
        lines.append("\nAdaptive probability-flow ODE (Tsit5, rtol = atol), counted NFE:\n")
        lines.append("| tolerance | NFE | confident share | digit-FD |")
        lines.append("| --- | --- | --- | --- |")
    for c in odes:
        lines.append(f"| {c['tolerance']:g} | {c['nfe']} | {c['confidence_share']:.3f} | "
                     f"{c['digit_fd']:.2f} |")
    return "\n".join(lines) + "\n"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def _plot(result, path):
    """Two panels (digit-FD, confident share) against log NFE, one line per solver."""
    width, height, pad = 900, 420, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    series = list(result["solvers"].items())
    series = [(label, [c for c in cells if c["nfe"] is not None]) for label, cells in series]
    nfes = [c["nfe"] for _, cells in series for c in cells]
    lo, hi = np.log10(max(1, min(nfes))), np.log10(max(nfes))
    panels = [("digit-FD", "digit_fd", result["real"]["digit_fd"]),
              ("confident share", "confidence_share", result["real"]["confidence_share"])]
    panel_w = (width - 3 * pad) // 2
    for p, (title, key, real) in enumerate(panels):
        x0 = pad + p * (panel_w + pad)
        values = [c[key] for _, cells in series for c in cells] + [real]
        vlo, vhi = min(values), max(values)
        vhi = vhi + 0.05 * (vhi - vlo + 1e-9)
        vlo = vlo - 0.05 * (vhi - vlo + 1e-9)
        to_xy = lambda n, v: (x0 + (np.log10(n) - lo) / (hi - lo + 1e-9) * panel_w,
                              height - pad - (v - vlo) / (vhi - vlo) * (height - 2 * pad))
        draw.rectangle([x0, pad, x0 + panel_w, height - pad], outline="black")
        draw.text((x0, pad - 20), f"{title} vs NFE (log scale); dashed: real digits", fill="black")
        ry = to_xy(10 ** lo, real)[1]
        for xs in range(int(x0), int(x0 + panel_w), 12):
            draw.line([xs, ry, xs + 6, ry], fill="gray")
        for n in (5, 10, 20, 50, 100, 200):
            if 0.999 * 10 ** lo <= n <= 1.001 * 10 ** hi:
                x, _ = to_xy(n, vlo)
                draw.text((x - 8, height - pad + 5), str(n), fill="black")
        draw.text((x0 - pad + 5, pad), f"{vhi:.2f}", fill="black")
        draw.text((x0 - pad + 5, height - pad - 10), f"{vlo:.2f}", fill="black")
        for s, (label, cells) in enumerate(series):
            pts = sorted((c["nfe"], c[key]) for c in cells)
            xy = [to_xy(n, v) for n, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=_COLORS[s % len(_COLORS)], width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_COLORS[s % len(_COLORS)])
            if p == 0:
                draw.text((x0 + 10, pad + 10 + 14 * s), label, fill=_COLORS[s % len(_COLORS)])
    img.save(path)


if __name__ == "__main__":
    flags.run(main, prog="quality_vs_nfe.py")
