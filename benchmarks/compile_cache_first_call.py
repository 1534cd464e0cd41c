"""First-call time of the sampling chain with and without the persistent compilation cache.

    .venv/bin/python benchmarks/compile_cache_first_call.py --config=configs/cifar10.py

Runs three fresh processes that each build ``generate.make_sample_fn`` (what ``run_sample.py``
calls) and time its first and second call: cache off, cache empty (compiles and writes), cache
filled by the previous process (loads). first - second is the compile (or cache-load) cost.
Prints one JSON line per process with the 1-minute load before and after.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--child", default=None, help="internal: cache dir of one measurement")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_measure(args)))
        return
    cache = tempfile.mkdtemp(prefix="jax_cache_")
    for mode, cache_dir in (("off", ""), ("cold", cache), ("warm", cache)):
        load0 = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, f"--config={args.config}",
                              f"--steps={args.steps}", f"--num_samples={args.num_samples}",
                              f"--child={cache_dir}"], capture_output=True, text=True, cwd=REPO,
                             timeout=1800, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(dict(mode=mode, load_1min_before=round(load0, 2),
                              load_1min_after=round(os.getloadavg()[0], 2),
                              cache_entries=len(os.listdir(cache)), **res)), flush=True)


def _measure(args):
    sys.path.insert(0, REPO)
    import importlib.util
    import jax
    import ml_collections
    from diffusion_jax import compilation_cache, generate, schedules, sharding, train
    compilation_cache.enable(args.child)
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    tx = train.make_optimizer(config)
    graphdef, _, shardings = train.abstract_train_state(config, tx, mesh)
    params = train.create_train_state(config, tx, shardings).params
    fn = generate.make_sample_fn(graphdef, schedules.schedule_from_config(config.diffusion), config,
                                 mesh, num_samples=args.num_samples, sampler="ddim",
                                 num_steps=args.steps)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, jax.random.key(0), None))
        times.append(time.perf_counter() - t0)
    return dict(config=args.config, first_call_s=round(times[0], 2),
                second_call_s=round(times[1], 2), compile_or_load_s=round(times[0] - times[1], 2))


if __name__ == "__main__":
    main()
