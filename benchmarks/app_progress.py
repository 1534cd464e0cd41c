"""Cost of the web app's progress bar: text-to-image with and without the per-step host tick.

The app wraps the UNet in :class:`diffusion_jax.app.progress.ProgressModel`, which adds one
``jax.debug.callback`` per network evaluation. This times ``pipelines.text_to_image`` on the
same random pipeline, plain and wrapped (with a counter receiving the ticks), interleaved
round by round so a busy host slows both alike, and reports the median overhead:

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
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import pipelines, samplers, schedules
from diffusion_jax.app import progress
from diffusion_jax.convert import text_encoder, unet_cond, vae

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


def time_case(name, steps, rounds):
    """Median seconds per run, plain and with progress, over interleaved rounds."""
    plain = build_pipeline(CASES[name])
    wrapped = plain._replace(unet=progress.ProgressModel(plain.unet))
    counter = progress.StepCounter()

    def run(pipe, seed):
        return pipelines.text_to_image(pipe, ["a prompt"], jax.random.key(seed),
                                       num_steps=steps, guidance_scale=7.5)

    def timed(pipe, seed):
        start = time.perf_counter()
        with progress.counting(counter, steps):
            run(pipe, seed)
            jax.effects_barrier()
        return time.perf_counter() - start

    timed(plain, 0), timed(wrapped, 0)  # compile both
    assert counter.count == steps, counter.count  # the wrapped chain ticks once per step
    times = {"plain": [], "progress": []}
    for i in range(rounds):
        order = ("plain", "progress") if i % 2 == 0 else ("progress", "plain")
        for kind in order:
            times[kind].append(timed(plain if kind == "plain" else wrapped, i + 1))
    plain_s, progress_s = (statistics.median(times[k]) for k in ("plain", "progress"))
    ratios = [p / q for p, q in zip(times["progress"], times["plain"])]
    return dict(case=name, image_size=CASES[name]["size"], steps=steps, rounds=rounds,
                plain_s=plain_s, progress_s=progress_s,
                overhead=statistics.median(ratios) - 1.0,
                per_step_ms=(progress_s - plain_s) / steps * 1e3, times=times)


def time_tick(steps=2000, rounds=5):
    """Seconds per ``jax.debug.callback`` tick: a scan of cheap steps with and without it."""

    def chain(tick):
        def body(x, t):
            if tick:
                jax.debug.callback(progress._report_step, t)  # pylint: disable=protected-access
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
    load = [round(x, 2) for x in os.getloadavg()]
    rounds, steps = (2, 4) if args.quick else (args.rounds, args.steps)
    tick = time_tick()
    print(f"one tick: {tick['tick_us']:.1f} us per network evaluation "
          f"({tick['steps']} cheap scan steps)")
    results = [time_case(name, steps, rounds) for name in CASES]
    for r in results:
        print(f"{r['case']:6s} {r['image_size']}px {r['steps']} steps: plain "
              f"{r['plain_s']:.3f} s, with progress {r['progress_s']:.3f} s, overhead "
              f"{100 * r['overhead']:+.1f}% (median of {r['rounds']} interleaved rounds)")
    record = dict(benchmark="app_progress", date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
                  command="benchmarks/app_progress.py" + (" --quick" if args.quick else ""),
                  load_before=load, load_after=[round(x, 2) for x in os.getloadavg()],
                  jax=jax.__version__, device=str(jax.devices()[0]), tick=tick, results=results)
    path = RESULTS.replace(".json", "_quick.json") if args.quick else RESULTS
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
