"""Where a training step's time goes, per op kind: ours (XLA trace) vs diffusers (torch profiler).

    .venv/bin/python benchmarks/profile_step.py                       # tiny UNet, batch 16
    .venv/bin/python benchmarks/profile_step.py --model ddpm_cifar10 --batch 16 --steps 3

Ours: the jitted step of ``train.make_train_step`` (as ``run_train.py`` runs it) is traced with
``jax.profiler`` while XLA:CPU emits one trace event per executed HLO thunk
(``--xla_cpu_enable_xprof_traceme``). Each event is matched to its HLO instruction in the
compiled module and classified from what the instruction computes (a convolution or dot inside
it, its ``op_name`` path, the Python functions on its stack: flax's GroupNorm / Dropout, optax's
Adam / clipping, ``train.ema_update``, the loss). Durations are summed per kind and divided by
the number of traced steps. XLA:CPU may run independent thunks on several threads at once, so
the sum can exceed the wall time; shares are of the sum.

Theirs: diffusers ``UNet2DModel`` with ``torch.optim.Adam``, ``clip_grad_norm_`` and
``EMAModel(foreach=True)``. The forward + backward pass runs under ``torch.profiler`` and the
self CPU time of every aten op is classified by name; clipping, the Adam step and the EMA
update are timed as phases with ``time.perf_counter``.

Host-to-device: ``sharding.shard_batch`` of one host batch, timed on its own (it is outside the
jitted step).

Writes ``results/profile_breakdown.json`` and ``results/profile_breakdown.md`` (other models:
``profile_breakdown_<model>.*``); the 1-minute
load before and after is recorded and the run is marked "loaded host" above cores + 0.5.
"""
import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, interleave  # noqa: E402

KINDS = ("convolution", "matmul (attention, linear)", "GroupNorm", "SiLU", "attention softmax",
         "dropout / random bits", "loss and noising", "grad clipping", "Adam", "EMA",
         "copy / transpose / concat", "other elementwise", "host-to-device batch")
LEARNING_RATE, NUM_TIMESTEPS, GRAD_CLIP, EMA_DECAY = 2e-4, 1000, 1.0, 0.9999


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=common.MODELS, default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per framework")
    parser.add_argument("--case", default=None, help="internal: one framework's case as JSON")
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        common.emit_result((profile_jax if case["framework"] == "jax" else profile_torch)(case))
        return
    cores = common.cpu_cores()
    load_before = interleave.load_1min()
    results = {}
    for fw in ("jax", "torch"):
        case = dict(framework=fw, model=args.model, layout=common.layout(args.model),
                    batch_size=args.batch, steps=args.steps, threads=cores)
        env = {"XLA_FLAGS": "--xla_cpu_enable_xprof_traceme=true"} if fw == "jax" else \
            {"OMP_WAIT_POLICY": "PASSIVE"}
        results[fw] = common.run_case_subprocess(os.path.abspath(__file__), case, env=env)
        if "error" in results[fw]:
            sys.exit(f"profile_step: {fw} failed: {results[fw]['error']}")
    load_after = interleave.load_1min()
    loaded = interleave.is_loaded([load_before, load_after], cores)
    payload = dict(model=args.model, batch_size=args.batch, steps=args.steps,
                   load_1min_before=load_before, load_1min_after=load_after, loaded_host=loaded,
                   load_threshold=cores + interleave.LOAD_MARGIN, results=results)
    path = common.write_results(
        "profile_breakdown" + ("" if args.model == "tiny" else f"_{args.model}"), payload)
    suffix = "" if args.model == "tiny" else f"_{args.model}"
    md = os.path.join(common.RESULTS_DIR, f"profile_breakdown{suffix}.md")
    with open(md, "w") as f:
        f.write(render(payload, " ".join(["python", "benchmarks/profile_step.py"] + sys.argv[1:])))
    print("wrote", path, "and", md)


def render(p, command):
    """The breakdown as a markdown table (ms per step and share of each side's total)."""
    ours, theirs = p["results"]["jax"]["ms_per_step"], p["results"]["torch"]["ms_per_step"]
    tot_o, tot_t = sum(ours.values()), sum(theirs.values())
    flag = " **Loaded host: do not quote these numbers.**" if p["loaded_host"] else ""
    lines = [
        f"Produced by `{command}`: {p['model']} UNet, batch {p['batch_size']}, "
        f"{p['steps']} profiled steps per side. 1-minute load {p['load_1min_before']} before, "
        f"{p['load_1min_after']} after (threshold {p['load_threshold']}).{flag}", "",
        f"Wall time per step without the profiler: ours {p['results']['jax']['step_s'] * 1e3:.1f} ms, "
        f"diffusers {p['results']['torch']['step_s'] * 1e3:.1f} ms.", "",
        "| op kind | ours ms/step | ours share | diffusers ms/step | diffusers share |",
        "|---|---|---|---|---|"]
    for kind in KINDS:
        o, t = ours.get(kind, 0.0), theirs.get(kind, 0.0)
        lines.append(f"| {kind} | {o:.1f} | {100 * o / tot_o:.1f}% | {t:.1f} "
                     f"| {100 * t / tot_t:.1f}% |")
    lines.append(f"| **sum** | {tot_o:.1f} | | {tot_t:.1f} | |")
    lines += ["", "Ours: XLA:CPU thunk events of the traced step, classified per HLO instruction "
              "(see the script's docstring); a fused kernel counts once, under the kind of its "
              "most specific content (convolution > dot > named source). Theirs: self CPU time "
              "of aten ops in forward + backward, plus clipping / Adam / EMA timed as phases. "
              "The host-to-device row is `sharding.shard_batch` (ours) and is outside the "
              "jitted step; diffusers' batch already lives on the CPU. In ours, XLA fuses SiLU "
              "into the GroupNorm kernels (counted as GroupNorm) and the attention softmax into "
              "kernels with its matmuls; in theirs, the attention row is the fused "
              "`scaled_dot_product_attention` kernel, matmuls included. The two sides are "
              "profiled one after the other, not interleaved.", ""]
    top = p["results"]["jax"].get("top_instructions", [])
    if top:
        lines += ["Ours, the 10 most expensive HLO instructions:", "",
                  "| instruction | kind | ms/step |", "|---|---|---|"]
        lines += [f"| `{n}` | {k} | {ms:.1f} |" for n, k, ms in top[:10]]
    return "\n".join(lines) + "\n"


def profile_jax(case):
    """Per-kind milliseconds per step of the jitted train step, from an XLA:CPU trace."""
    common.setup_jax_env("cpu")
    import jax
    import numpy as np
    from diffusion_jax import sharding

    config = common.train_config(case["layout"], batch_size=case["batch_size"])
    step, state, batch, mesh, _ = common.jax_train_setup(config)
    compiled = step.lower(state, batch).compile()
    kinds = classify_hlo(compiled.as_text())
    box = dict(state=state)

    def one():
        box["state"], m = compiled(box["state"], batch)
        jax.block_until_ready(m["loss"])

    interleave.warm_up(one, 1)
    step_s = statistics.median(interleave.warm_up(one, case["steps"]))
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    jax.profiler.start_trace(trace_dir)
    interleave.warm_up(one, case["steps"])
    jax.profiler.stop_trace()
    per_instr = collections.Counter()
    data = jax.profiler.ProfileData.from_file(
        glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1])
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name in kinds:
                    per_instr[ev.name] += ev.duration_ns / 1e6 / case["steps"]
    ms = collections.Counter()
    for name, t in per_instr.items():
        ms[kinds[name]] += t
    host = dict(image=np.asarray(batch["image"]), label=np.asarray(batch["label"]))
    h2d = interleave.warm_up(lambda: jax.block_until_ready(sharding.shard_batch(host, mesh)), 5)
    ms["host-to-device batch"] = 1e3 * statistics.median(h2d)
    top = [(n, kinds[n], t) for n, t in per_instr.most_common(10)]
    return dict(case, layout=None, step_s=step_s, ms_per_step=dict(ms), top_instructions=top)


def classify_hlo(hlo_text):
    """``{instruction name: op kind}`` for every instruction of a compiled HLO module's text.

    A fusion is classified from everything inside its fused computation (recursively).
    """
    frames = _stack_frames(hlo_text)
    comps, current = collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            continue
        ins = re.match(r"^\s+(ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(", line)
        if ins and current:
            calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            comps[current].append(dict(
                name=ins.group(2), opcode=ins.group(3), calls=calls, root=bool(ins.group(1)),
                op_name=op_name.group(1) if op_name else "",
                frames=frames.get(int(frame.group(1)), ()) if frame else ()))
    roots = {c: next((i["opcode"] for i in instrs if i["root"]), None) for c, instrs in comps.items()}
    kinds = {}
    for instrs in comps.values():
        for ins in instrs:
            root = roots.get(ins["calls"][0]) if ins["opcode"] == "fusion" else ins["opcode"]
            kinds[ins["name"]] = _kind(_flatten(ins, comps), root)
    return kinds


def _flatten(ins, comps, depth=0):
    out = [ins]
    if depth < 4:
        for callee in ins["calls"]:
            for sub in comps.get(callee, ()):
                out += _flatten(sub, comps, depth + 1)
    return out


def _kind(instrs, root):
    opcodes = {i["opcode"] for i in instrs}
    names = " ".join(i["op_name"] for i in instrs).lower()
    where = " ".join(f"{f}:{fn}" for i in instrs for f, fn in i["frames"])
    if root in _MOVEMENT and "convolution" not in opcodes and "dot" not in opcodes:
        return "copy / transpose / concat"
    if "convolution" in opcodes:
        return "convolution"
    if "dot" in opcodes:
        return "matmul (attention, linear)"
    if "threefry" in names or "random_bits" in names or "stochastic.py" in where:
        return "dropout / random bits"
    if "normalization.py" in where:
        return "GroupNorm"
    if "clipping.py" in where or "global_norm" in where:
        return "grad clipping"
    if "optax" in where:
        return "Adam"
    if ":ema_update" in where:
        return "EMA"
    if "softmax" in names:
        return "attention softmax"
    if "silu" in names or "logistic" in opcodes:
        return "SiLU"
    if "losses.py" in where or "diffusion.py" in where or ":loss_fn" in where:
        return "loss and noising"
    return "other elementwise"


_MOVEMENT = {"copy", "transpose", "concatenate", "pad", "reverse", "slice", "dynamic-slice",
             "dynamic-update-slice", "bitcast", "reshape", "broadcast", "tuple",
             "get-tuple-element", "parameter"}


def _stack_frames(hlo_text):
    """``{stack frame id: ((file, function), ...)}`` from the module's frame tables."""
    tables, section = collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line.strip():
            section = None if section == "StackFrames" else section
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if section and m:
            tables[section][int(m.group(1))] = m.group(2)
    out = {}
    for fid in tables["StackFrames"]:
        chain, seen, cur = [], set(), fid
        while cur in tables["StackFrames"] and cur not in seen:
            seen.add(cur)
            entry = tables["StackFrames"][cur]
            loc = tables["FileLocations"].get(int(re.search(r"file_location_id=(\d+)", entry)[1]), "")
            f = re.search(r"file_name_id=(\d+)", loc)
            fn = re.search(r"function_name_id=(\d+)", loc)
            chain.append((tables["FileNames"].get(int(f[1]), "").strip('"') if f else "",
                          tables["FunctionNames"].get(int(fn[1]), "").strip('"') if fn else ""))
            cur = int(re.search(r"parent_frame_id=(\d+)", entry)[1])
        out[fid] = tuple(chain)
    return out


def profile_torch(case):
    """Per-kind milliseconds per step of the diffusers train step (torch profiler + phases)."""
    torch, device = common.torch_setup("cpu", case["threads"])
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    model = common.torch_unet(case["layout"], device).train()
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    ema = EMAModel(model.parameters(), decay=EMA_DECAY, foreach=True)
    sched = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
    lay, b = case["layout"], case["batch_size"]
    x0 = torch.rand((b, lay["in_channels"], lay["image_size"], lay["image_size"])) * 2 - 1
    phases = collections.defaultdict(list)

    def fwd_bwd():
        noise = torch.randn_like(x0)
        t = torch.randint(0, NUM_TIMESTEPS, (b,))
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()

    def one():
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        for name, fn in (("grad clipping", lambda: torch.nn.utils.clip_grad_norm_(
                model.parameters(), GRAD_CLIP)), ("Adam", opt.step),
                         ("EMA", lambda: ema.step(model.parameters()))):
            t0 = time.perf_counter()
            fn()
            phases[name].append(time.perf_counter() - t0)

    interleave.warm_up(one, 1)
    phases.clear()
    step_s = statistics.median(interleave.warm_up(one, case["steps"]))
    ms = collections.Counter({k: 1e3 * statistics.median(v) for k, v in phases.items()})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(case["steps"]):
            opt.zero_grad(set_to_none=True)
            fwd_bwd()
    for ev in prof.key_averages():
        ms[_torch_kind(ev.key)] += ev.self_cpu_time_total / 1e3 / case["steps"]
    ms.pop(None, None)
    return dict(case, layout=None, step_s=step_s, ms_per_step=dict(ms))


def _torch_kind(name):
    n = name.lower()
    rules = (("scaled_dot_product", "attention softmax"), ("conv", "convolution"), ("addmm", "matmul (attention, linear)"),
             ("bmm", "matmul (attention, linear)"), ("aten::mm", "matmul (attention, linear)"),
             ("group_norm", "GroupNorm"), ("silu", "SiLU"), ("softmax", "attention softmax"),
             ("bernoulli", "dropout / random bits"), ("dropout", "dropout / random bits"),
             ("randn", "loss and noising"), ("randint", "loss and noising"),
             ("mse", "loss and noising"), ("copy", "copy / transpose / concat"),
             ("contiguous", "copy / transpose / concat"), ("clone", "copy / transpose / concat"),
             ("cat", "copy / transpose / concat"), ("pad", "copy / transpose / concat"))
    for key, kind in rules:
        if key in n:
            return kind
    if n.startswith("aten::") or n.startswith("autograd") or "backward" in n:
        return "other elementwise"
    return None  # python-level scopes (their time is in the aten ops below them)


if __name__ == "__main__":
    main()
