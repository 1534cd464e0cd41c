"""Runs a multi-host JAX program as several processes on this machine (CPU, gloo collectives).

    python scripts/multihost_local.py --num_processes=2 --devices_per_process=4 -- \\
        run_train.py --config=configs/tiny.py --workdir=/tmp/mh --config.mesh.data=4 \\
        --config.mesh.fsdp=2

starts ``num_processes`` copies of the script, each with ``devices_per_process`` fake CPU
devices (``--xla_force_host_platform_device_count``), and appends to each command line

    --config.distributed.initialize=True
    --config.distributed.coordinator_address=127.0.0.1:PORT   (a free port)
    --config.distributed.num_processes=N --config.distributed.process_id=i

so ``jax.distributed.initialize`` joins them into one job of ``N x devices_per_process``
global devices, with cross-process collectives over gloo (jax's CPU default), exactly as the
hosts of a TPU pod slice run the same command with their own process id. Output of process
``i`` goes to ``--log_dir/process_i.log`` (default: a temp directory). If any process fails
or the time limit passes, all are killed and the launcher exits non-zero.

It parses its flags with ``argparse``, not the project's absl preamble
(:mod:`diffusion_jax.cli.flags`): everything after ``--`` is another program's command line,
passed on untouched.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, *, num_processes=2, devices_per_process=4, timeout_s=300.0, log_dir=None,
           kill_when=None, poll_s=0.05, env=None):
    """Runs ``python argv...`` as ``num_processes`` cooperating jax processes and waits.

    Args:
        argv: the script and its arguments, e.g. ``["run_train.py", "--config=..."]``;
            the ``--config.distributed.*`` flags are appended per process.
        num_processes: number of processes (jax "hosts").
        devices_per_process: fake CPU devices in each process.
        timeout_s: wall-clock limit for the whole job; on expiry every process is killed.
        log_dir: where ``process_<i>.log`` files go (created); default a new temp directory.
        kill_when: optional callable polled every ``poll_s`` seconds; when it returns True
            every process gets SIGKILL (a simulated crash) and `launch` returns.
        poll_s: polling interval in seconds.
        env: environment of the processes (default this process's); jax and XLA variables
            are set on top of it.

    Returns:
        ``dict(returncodes=[...], logs=[paths], killed=bool, timed_out=bool, port=int)``.
        A process that failed makes the others be killed (their return codes are then < 0).
    """
    log_dir = log_dir or tempfile.mkdtemp(prefix="multihost_")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ) + f" --xla_force_host_platform_device_count={devices_per_process}"
    procs, logs = [], []
    for i in range(num_processes):
        logs.append(os.path.join(log_dir, f"process_{i}.log"))
        cmd = [sys.executable, *argv,
               "--config.distributed.initialize=True",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               f"--config.distributed.num_processes={num_processes}",
               f"--config.distributed.process_id={i}"]
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    killed = timed_out = False
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the others would wait for it forever
            if kill_when is not None and kill_when():
                killed = True
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(poll_s)
    finally:
        for p in procs:
            _kill(p)
    return dict(returncodes=[p.returncode for p in procs], logs=logs, killed=killed,
                timed_out=timed_out, port=port)


def _kill(proc):
    """SIGKILL to the process group of a still-running process, then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout_s", type=float, default=600.0)
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("argv", nargs=argparse.REMAINDER,
                        help="-- then the script and its arguments, e.g. -- run_train.py ...")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        parser.error("give the script to run after --, e.g. -- run_train.py --config=...")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    out = launch(argv, num_processes=args.num_processes,
                 devices_per_process=args.devices_per_process, timeout_s=args.timeout_s,
                 log_dir=args.log_dir)
    for i, (code, log) in enumerate(zip(out["returncodes"], out["logs"])):
        print(f"process {i}: exit {code}, log {log}")
    if out["timed_out"]:
        sys.exit(f"multihost_local: time limit {args.timeout_s} s passed; all processes killed")
    if any(out["returncodes"]):
        with open(out["logs"][0]) as f:
            tail = f.read()[-2000:]
        sys.exit(f"multihost_local: a process failed (exit codes {out['returncodes']}); "
                 f"process 0 log tail:\n{tail}")


if __name__ == "__main__":
    main()
