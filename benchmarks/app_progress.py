"""Cost of the web app's progress bar: text-to-image with and without the per-step host tick.

The app wraps the UNet in :class:`diffusion_jax.app.progress.ProgressModel`, which adds one
``jax.debug.callback`` (without operands) per network evaluation. This times
``pipelines.text_to_image`` on the same random pipeline end to end (text encoding, the guided DDIM chain, decoding), plain and
wrapped (with a counter receiving the ticks), interleaved round by round so a busy host slows
both alike, and reports the median per-round overhead ``progress / plain - 1``. The 1-minute
load is recorded before and after the whole run and around every round; a round (and the run)
is flagged ``loaded_host`` when a reading exceeds usable cores + 0.5 (``interleave.LOAD_MARGIN``),
and the overhead is also given over the unflagged rounds only:

    .venv/bin/python benchmarks/app_progress.py            # writes results/app_progress.json
    .venv/bin/python benchmarks/app_progress.py --quick    # a smoke run (numbers meaningless)

Cases: ``tiny`` (the web-app tests' pipeline, 32x32 px: the worst case, a UNet call costs
little) and ``small`` (a 2-level 64/128-channel UNet at 64x64 px). Weights are random; speed
does not depend on them. A third measurement isolates the tick itself: a ``lax.scan`` of
2,000 cheap steps with and without the callback gives its cost per evaluation, which divided
by a model's step time is its overhead on any model.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, interleave  # noqa: E402
from diffusion_jax import pipelines, samplers, schedules  # noqa: E402
from diffusion_jax.app import progress  # noqa: E402
from diffusion_jax.convert import text_encoder, unet_cond, vae  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "app_progress.json")
TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16)
VAE = dict(latent_channels=4, block_out_channels=[32, 64], layers_per_block=1,
           norm_num_groups=32, scaling_factor=0.3)
CASES = {
    "tiny": dict(size=32, unet=dict(block_out_channels=[32, 64], layers_per_block=1,
                                    attention_head_dim=[2, 4])),
    "small": dict(size=64, unet=dict(block_out_channels=[64, 128], layers_per_block=1,
                                     attention_head_dim=[4, 8])),
}


def build_pipeline(case) -> pipelines.Pipeline:
    """A random text-to-image pipeline of ``case`` (a :data:`CASES` entry)."""
    unet_config = dict(in_channels=4, out_channels=4, cross_attention_dim=32,
                       down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                       norm_num_groups=32, use_linear_projection=True, **case["unet"])
    unet = unet_cond.build(unet_cond.config_to_kwargs(unet_config))
    autoencoder = vae.build(vae.config_to_kwargs(VAE))
    encoder = text_encoder.build(text_encoder.config_to_kwargs(TEXT))
    tokenizer = _Tokenizer()
    schedule = schedules.make_schedule(schedules.linear_beta_schedule(1000))
    return pipelines.Pipeline(unet, autoencoder, encoder, tokenizer, schedule,
                              samplers.make_options(), None, case["size"])


class _Tokenizer:
    """Prompts -> fixed ``[B, 16]`` ids (the text is irrelevant to the timing)."""

    def __call__(self, prompts):
        return np.tile(np.arange(16, dtype=np.int32), (len(prompts), 1))


def time_case(name, steps, rounds, cores):
    """Seconds per run, plain and with progress, over interleaved rounds (see module doc)."""
    plain = build_pipeline(CASES[name])
    wrapped = plain._replace(unet=progress.ProgressModel(plain.unet))
    counter = progress.StepCounter()

    def timed(pipe, seed):
        start = time.perf_counter()
        with progress.counting(counter, steps):
            pipelines.text_to_image(pipe, ["a prompt"], jax.random.key(seed), num_steps=steps,
                                    guidance_scale=7.5)
            jax.effects_barrier()
        return time.perf_counter() - start

    compile_s = {"plain": timed(plain, 0), "progress": timed(wrapped, 0)}
    assert counter.count == steps, counter.count  # the wrapped chain ticks once per step
    rows = []
    for i in range(rounds):
        load_before = interleave.load_1min()
        order = ("plain", "progress") if i % 2 == 0 else ("progress", "plain")
        row = {kind: timed(plain if kind == "plain" else wrapped, i + 1) for kind in order}
        loads = [load_before, interleave.load_1min()]
        rows.append(dict(row, load=loads, loaded_host=interleave.is_loaded(loads, cores),
                         ratio=row["progress"] / row["plain"]))
    quiet = [r["ratio"] for r in rows if not r["loaded_host"]]
    return dict(case=name, image_size=CASES[name]["size"], steps=steps, rounds=rounds,
                compile_s=compile_s,
                plain_s=statistics.median(r["plain"] for r in rows),
                progress_s=statistics.median(r["progress"] for r in rows),
                overhead=statistics.median(r["ratio"] for r in rows) - 1.0,
                overhead_quiet_rounds=statistics.median(quiet) - 1.0 if quiet else None,
                quiet_rounds=len(quiet), ratio_min=min(r["ratio"] for r in rows),
                ratio_max=max(r["ratio"] for r in rows), rounds_detail=rows)


def time_tick(steps=2000, rounds=5):
    """Seconds per ``jax.debug.callback`` tick: a scan of cheap steps with and without it."""

    def chain(tick):
        def body(x, t):
            if tick:
                jax.debug.callback(progress._report_step)  # pylint: disable=protected-access
            return jnp.tanh(x @ x) * 0.5, None
        return jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(steps))[0])

    x = jnp.eye(16) * 0.1
    runs = {kind: chain(kind == "progress") for kind in ("plain", "progress")}
    best = {}
    for kind, run in runs.items():
        jax.block_until_ready(run(x))
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(run(x))
            jax.effects_barrier()
            samples.append(time.perf_counter() - start)
        best[kind] = min(samples)
    return dict(steps=steps, plain_s=best["plain"], progress_s=best["progress"],
                tick_us=(best["progress"] - best["plain"]) / steps * 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    cores, load_before = common.cpu_cores(), os.getloadavg()
    rounds, steps = (2, 4) if args.quick else (args.rounds, args.steps)
    tick = time_tick()
    print(f"one tick: {tick['tick_us']:.1f} us per network evaluation "
          f"({tick['steps']} cheap scan steps)")
    results = [time_case(name, steps, rounds, cores) for name in CASES]
    load_after = os.getloadavg()
    for r in results:
        quiet = (f"{100 * r['overhead_quiet_rounds']:+.1f}%" if r["quiet_rounds"] else "none")
        print(f"{r['case']:6s} {r['image_size']}px {r['steps']} steps: plain "
              f"{r['plain_s']:.3f} s, with progress {r['progress_s']:.3f} s, overhead "
              f"{100 * r['overhead']:+.1f}% (median of {r['rounds']} interleaved rounds; "
              f"{r['quiet_rounds']} unflagged: {quiet})")
    loads = [load_before[0], load_after[0]]
    print(f"1-minute load {loads[0]:.2f} before, {loads[1]:.2f} after ({cores} cores)"
          + (": LOADED HOST" if interleave.is_loaded(loads, cores) else ""))
    record = dict(benchmark="app_progress", date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
                  command="benchmarks/app_progress.py" + (" --quick" if args.quick else ""),
                  cores=cores, load_margin=interleave.LOAD_MARGIN,
                  load_before=[round(x, 2) for x in load_before],
                  load_after=[round(x, 2) for x in load_after],
                  loaded_host=interleave.is_loaded(loads, cores),
                  jax=jax.__version__, device=str(jax.devices()[0]), tick=tick, results=results)
    path = RESULTS.replace(".json", "_quick.json") if args.quick else RESULTS
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
