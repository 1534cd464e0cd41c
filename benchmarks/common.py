"""Shared pieces of the benchmarks: model layouts, timing, memory, FLOPs, machine info, result files.

Every benchmark case runs in its own subprocess (``run_case_subprocess``), so that peak host memory
(``ru_maxrss``) belongs to one framework and one model, and so that XLA flags such as the fake device
count can be set before jax is imported. A case prints one line ``RESULT {json}`` that the parent reads.
"""
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]  # before this process did any work
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")

# Models benchmarked: named layouts of diffusion_jax.models.unet.LAYOUTS. "ddpm_cifar10" is Ho et al.
# (2020)'s CIFAR-10 network (35.7 M parameters, google/ddpm-cifar10-32 in diffusers); "tiny" is the
# project's ~1 M-parameter 16x16 network for CPU smoke runs.
MODELS = ("ddpm_cifar10", "tiny")

# diffusers' UNet2DConditionModel config of the SD-1.5 UNet (859,520,964 parameters), the
# reference for diffusion_jax.models.cond_unet.SD15_UNET.
SD15_DIFFUSERS = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8)

# Nominal peak FLOP/s of accelerators by (device kind prefix, dtype), dense, from vendor data sheets.
GPU_PEAK_FLOPS = {
    ("NVIDIA H100", "bf16"): 989e12, ("NVIDIA H100", "f32"): 67e12,
    ("NVIDIA H200", "bf16"): 989e12, ("NVIDIA H200", "f32"): 67e12,
    ("NVIDIA A100", "bf16"): 312e12, ("NVIDIA A100", "f32"): 19.5e12,
}
# x86 cores with AVX2 and two 256-bit FMA pipes (AMD Zen 2/3/4, Intel Haswell..): 2 pipes x 8 float32
# lanes x 2 FLOPs per fused multiply-add = 32 float32 FLOPs per cycle per core.
CPU_FLOPS_PER_CYCLE_F32 = 32


def add_common_flags(parser):
    """Adds the flags every benchmark script shares to an ``argparse.ArgumentParser``."""
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu (default) or gpu; gpu runs jax on CUDA and torch on cuda:0.")
    parser.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                        help="compute dtype: jax UNet dtype / torch autocast dtype (params stay f32).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: the CPU cores this process may use).")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default="PASSIVE",
                        help="OMP_WAIT_POLICY of the torch processes. PASSIVE (default) keeps torch's "
                             "OpenMP threads from spinning, which on a busy host made its 2-thread "
                             "steps up to 15x slower; ACTIVE is libgomp's spin-then-sleep.")
    parser.add_argument("--quick", action="store_true",
                        help="small settings to check the script runs; numbers are meaningless.")
    parser.add_argument("--case", default=None,
                        help="internal: JSON of one case to run in this process (set by the parent).")
    return parser


def torch_env(args):
    """Environment variables of the torch child processes (see ``--omp-wait-policy``)."""
    return {"OMP_WAIT_POLICY": args.omp_wait_policy}


def cpu_cores():
    """Number of CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def setup_jax_env(device, fake_devices=None):
    """Sets environment variables jax reads at import; call before ``import jax``.

    Args:
      device: "cpu" or "gpu".
      fake_devices: on CPU, split the host into this many XLA devices
        (``--xla_force_host_platform_device_count``); they share the same cores and thread pool.
    """
    os.environ["JAX_PLATFORMS"] = "cuda" if device == "gpu" else "cpu"
    if fake_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={fake_devices}".strip()


def time_calls(fn, *, warmup, iters):
    """Times ``fn()`` (which must block until its result is ready).

    Returns:
      dict with ``warmup_s`` (list, the first includes compilation for jitted code), ``times_s`` (list)
      and ``median_s``.
    """
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(warmup_s=warm, times_s=times, median_s=statistics.median(times))


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    """Current resident set size of this process, in MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def xla_cost(compiled):
    """FLOPs and bytes accessed of one call of a compiled jax function, from XLA's cost analysis.

    Args:
      compiled: ``jax.jit(f).lower(*args).compile()``.

    Returns:
      (flops, bytes_accessed) as floats, or (None, None) where the backend gives no analysis.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None, None
    flops = cost.get("flops")
    nbytes = cost.get("bytes accessed")
    return (float(flops) if flops is not None else None,
            float(nbytes) if nbytes is not None else None)


def matmul_rate(case):
    """FLOP/s of a ``size x size`` matmul in jax or torch: what this device attains in practice.

    Args:
      case: dict with ``framework`` ("jax" | "torch"), ``device``, ``dtype``, ``size``, ``threads``.

    Returns:
      ``dict(case, flops_per_s=2 size^3 / median time)`` over 5 timed products after 2 warm-ups.
    """
    n = case["size"]
    if case["framework"] == "jax":
        setup_jax_env(case["device"])
        import jax
        import jax.numpy as jnp
        dtype = jnp.bfloat16 if case["dtype"] == "bf16" else jnp.float32
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(jnp.matmul)
        fn = lambda: jax.block_until_ready(matmul(a, a))  # noqa: E731
    else:
        torch, device = torch_setup(case["device"], case["threads"])
        a = torch.ones((n, n), device=device,
                       dtype=torch.bfloat16 if case["dtype"] == "bf16" else torch.float32)

        def fn():
            torch.mm(a, a)
            if device.type == "cuda":
                torch.cuda.synchronize()
    timing = time_calls(fn, warmup=2, iters=5)
    return dict(case, seconds=timing["median_s"], flops_per_s=2 * n**3 / timing["median_s"])


def cpu_nominal_peak_flops(dtype="f32"):
    """Nominal float32 peak of this host's CPU cores: cores x clock x 32 FLOP/cycle (AVX2, 2 FMA pipes).

    An assumption, not a measurement: the clock is the one /proc/cpuinfo reports (no turbo), and
    bf16 is counted at the float32 rate because AVX2 has no bf16 arithmetic.
    """
    del dtype
    return cpu_cores() * _cpu_mhz() * 1e6 * CPU_FLOPS_PER_CYCLE_F32


def device_peak_flops(device, dtype, device_kind=""):
    """Peak FLOP/s used for MFU, and a sentence saying where it comes from."""
    if device == "cpu":
        peak = cpu_nominal_peak_flops(dtype)
        return peak, (f"nominal: {cpu_cores()} cores x {_cpu_mhz():.0f} MHz x "
                      f"{CPU_FLOPS_PER_CYCLE_F32} float32 FLOP/cycle (AVX2, two 256-bit FMA pipes)")
    for (prefix, dt), peak in GPU_PEAK_FLOPS.items():
        if device_kind.startswith(prefix) and dt == dtype:
            return peak, f"data sheet: {prefix} dense {dtype}"
    return None, f"unknown peak for device kind {device_kind!r}"


def machine_info():
    """Platform, CPU and memory of this host, and its load average (other processes skew timings)."""
    info = dict(
        platform=platform.platform(),
        machine=platform.machine(),
        processor=platform.processor() or _cpu_model_name(),
        cpu_model=_cpu_model_name(),
        cpu_mhz=_cpu_mhz(),
        cpu_count=os.cpu_count(),
        cpu_cores_usable=cpu_cores(),
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        python=platform.python_version(),
        load_average_1_5_15_at_start=LOAD_AT_START,
        load_average_1_5_15_at_end=[round(x, 2) for x in os.getloadavg()],
    )
    return info


def versions():
    """Versions of the libraries under test (without importing them: importing jax fixes its flags)."""
    from importlib import metadata
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_case_subprocess(script, case, *, env=None, timeout=1800):
    """Runs ``python script --case JSON`` in a fresh process and returns the dict it printed.

    Args:
      script: path of the benchmark script.
      case: JSON-able dict of the case's settings (the script's ``run_case`` reads it).
      env: extra environment variables for the child.
      timeout: seconds before the child is killed.

    Returns:
      the child's result dict without the bulky ``layout`` entry (results files keep the layouts
      once, in their config); on failure ``dict(case, error=...)`` so one broken case does not stop
      the others.
    """
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(env or {})
    cmd = [sys.executable, script, "--case", json.dumps(case)]
    brief = {k: v for k, v in case.items() if k != "layout"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(brief, error=f"timed out after {timeout} s")
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result.pop("layout", None)
            result["process_wall_s"] = round(wall, 2)
            return result
    tail = (proc.stdout + proc.stderr)[-3000:]
    return dict(brief, error=f"exit code {proc.returncode}; output tail:\n{tail}")


def emit_result(result):
    """Prints a case's result for the parent process (see ``run_case_subprocess``)."""
    print("RESULT " + json.dumps(result), flush=True)


def write_results(name, payload):
    """Writes ``benchmarks/results/<name>.json`` with machine info, versions, date and command added."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = dict(
        benchmark=name,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([os.path.relpath(sys.executable, REPO_ROOT)] +
                         [os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        machine=machine_info(),
        versions=versions(),
        **payload,
    )
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return path


def layout(name):
    """UNet keyword arguments of a named layout, with ``in_channels`` and ``num_heads`` made explicit.

    Imports jax (through diffusion_jax); the parent process calls it and passes the dict to the
    child processes, so torch children do not load jax.
    """
    from diffusion_jax.models import unet
    return dict(dict(in_channels=3, num_heads=1), **unet.layout_kwargs(name))


def train_config(lay, *, batch_size, dtype="f32", mesh_data=-1, mesh_fsdp=1):
    """``configs/default.py`` with the UNet layout ``lay``, unconditional data of its size, a
    constant learning rate (no warm-up) and the given batch size, compute dtype and mesh.

    Everything else (Adam 2e-4, gradient clipping at norm 1, one EMA with decay 0.9999, linear
    betas, T = 1000, eps prediction) is the DDPM recipe of the default config.
    """
    from configs import default
    config = default.get_config()
    config.data.image_size = lay["image_size"]
    config.data.num_channels = lay["in_channels"]
    config.data.num_classes = 0
    for name, value in lay.items():
        if name not in ("image_size", "in_channels"):
            config.model[name] = tuple(value) if isinstance(value, list) else value
    config.model.dtype = "bfloat16" if dtype == "bf16" else "float32"
    config.optim.warmup_steps = 0
    config.train.batch_size = batch_size
    config.mesh.data = mesh_data
    config.mesh.fsdp = mesh_fsdp
    return config


def jax_train_setup(config):
    """The project's jitted train step, its initial state and a sharded random batch.

    Returns:
      (step, state, batch, mesh, num_params): ``step(state, batch) -> (state, metrics)`` is
      ``train.build(config).step_fn``, exactly what ``run_train.py`` runs.
    """
    import jax
    import numpy as np
    from diffusion_jax import sharding, train
    built = train.build(config)
    step, state, mesh, abstract = built.step_fn, built.init_state(config), built.mesh, built.abstract
    b, size, ch = config.train.batch_size, config.data.image_size, config.data.num_channels
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch(dict(
        image=rng.uniform(-1, 1, (b, size, size, ch)).astype(np.float32),
        label=np.zeros((b,), np.int32)), mesh)
    num_params = int(sum(x.size for x in jax.tree.leaves(abstract.params)))
    return step, state, batch, mesh, num_params


def diffusers_unet_config(lay):
    """The ``diffusers.UNet2DModel`` config of a UNet layout (keyword arguments of ``UNet``).

    Level i of the UNet works at resolution image_size / 2**i; it gets attention (AttnDownBlock2D /
    AttnUpBlock2D) when that resolution is in ``attn_resolutions``. Time embedding and padding follow
    google/ddpm-cifar10-32 (positional, no sin/cos flip, frequency shift 1, downsample padding 0),
    which are also the UNet's defaults.

    Raises:
      ValueError: for a layout with more than one attention head (diffusers sets heads through one
        ``attention_head_dim`` shared by all levels).
    """
    if lay.get("num_heads", 1) != 1 or lay.get("num_head_channels") is not None:
        raise ValueError(f"layout has num_heads={lay.get('num_heads')}; only 1 head is mapped")
    mult = lay["channel_mult"]
    attn = [lay["image_size"] // 2**i in lay["attn_resolutions"] for i in range(len(mult))]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]]
    return dict(
        sample_size=lay["image_size"], in_channels=lay["in_channels"], out_channels=lay["in_channels"],
        block_out_channels=tuple(lay["base_channels"] * m for m in mult),
        layers_per_block=lay["num_res_blocks"], down_block_types=tuple(down),
        up_block_types=tuple(up), norm_num_groups=lay["num_groups"], attention_head_dim=None,
        dropout=lay["dropout"], time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, norm_eps=1e-6, act_fn="silu",
    )


def torch_setup(device, threads):
    """Imports torch, sets its intra-op thread count (CPU) and returns (torch, torch.device)."""
    import torch
    if device == "cpu":
        torch.set_num_threads(threads or cpu_cores())
        return torch, torch.device("cpu")
    return torch, torch.device("cuda")


def torch_unet(lay, device, seed=0):
    """A freshly initialised ``diffusers.UNet2DModel`` with layout ``lay``, on ``device``."""
    import torch
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(**diffusers_unet_config(lay)).to(device)


def jax_unet(lay, dtype, seed=0):
    """A freshly initialised ``diffusion_jax`` UNet with layout ``lay`` (compute dtype f32 or bf16)."""
    import jax.numpy as jnp
    from flax import nnx
    from diffusion_jax.models.unet import UNet
    lay = {k: tuple(v) if isinstance(v, list) else v for k, v in lay.items()}
    return UNet(**lay, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32, rngs=nnx.Rngs(seed))


def _cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_mhz():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except OSError:
        pass
    return float("nan")
