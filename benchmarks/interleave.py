"""Side-by-side timing with the two frameworks interleaved: ours, theirs, ours, theirs, ...

Each side lives in its own long-running worker process (so its peak memory, XLA flags and
thread pools are its own). A worker builds its model once -- compilation and warm-up included --
then waits on stdin; the parent asks the sides in turn for one timed call at a time, so both see
the same host conditions within seconds of each other. While one side runs, the other is blocked
on a pipe read and uses no CPU.

Per pair ``i`` the parent forms ``ratio_i = theirs_time_i / ours_time_i`` (ours / theirs
throughput; > 1 means ours is faster) and reports the median ratio with its interquartile range
and min / max. The 1-minute load average is recorded before and after every case; a case is
flagged ``loaded_host`` when either reading exceeds ``usable cores + LOAD_MARGIN``. A benchmark
that saturates every core itself raises the 1-minute load to about the core count, so the
margin is what other processes add: flagged results are kept in ``results/`` but must not be
quoted as this project's performance.

Worker protocol (one JSON line per message on the worker's stdout)::

    worker -> READY {info}      after set-up, compilation and warm-up
    parent -> "time N"          worker -> TIMES [t_1, ..., t_N]  (seconds per call)
    parent -> "done"            worker -> RESULT {info + peak memory}; the worker exits
"""
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LOAD_MARGIN = 0.5  # a case is "loaded host" when the 1-min load > usable cores + LOAD_MARGIN


def load_1min():
    """The host's 1-minute load average, rounded to 0.01."""
    return round(os.getloadavg()[0], 2)


def is_loaded(loads, cores):
    """Whether any 1-minute load reading in ``loads`` exceeds ``cores + LOAD_MARGIN``."""
    return max(loads) > cores + LOAD_MARGIN


def warm_up(call, n):
    """Calls ``call()`` ``n`` times; returns the seconds each took (the first includes any
    lazy compilation or allocation)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def serve(setup):
    """Worker side: ``setup() -> (call, info)``, then answers the parent's commands on stdin.

    Args:
      setup: builds the model, compiles and warms up; returns ``call`` (one timed unit of
        work that blocks until its result is ready) and a JSON-able ``info`` dict.
    """
    import resource
    call, info = setup()
    _send("READY", info)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "time":
            _send("TIMES", warm_up(call, int(arg)))
        elif cmd == "done":
            info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            _send("RESULT", info)
            return


def run_pair(script, ours_case, theirs_case, *, rounds, calls_per_round=1, env_ours=None,
             env_theirs=None, cores, timeout_s=3600):
    """Runs ``rounds`` interleaved (ours, theirs) rounds of two worker processes.

    Args:
      script: the benchmark script; run as ``script --case JSON``.
      ours_case, theirs_case: the two workers' case dicts.
      rounds: number of (ours, theirs) pairs.
      calls_per_round: timed calls per side per round; the pair uses their medians.
      env_ours, env_theirs: extra environment variables of each worker.
      cores: usable cores, for the loaded-host flag.
      timeout_s: limit for any one message from a worker.

    Returns:
      dict with ``ours`` / ``theirs`` (the workers' info, ``times_s`` per round), ``pairs``
      (per-round times and loads), the ratio statistics (see `ratio_stats`), loads before /
      after, ``loaded_host`` and ``load_threshold``; or the same keys plus ``error`` when a
      worker failed.
    """
    load_before = [round(x, 2) for x in os.getloadavg()]
    out = dict(load_avg_before=load_before, load_threshold=cores + LOAD_MARGIN,
               load_margin=LOAD_MARGIN, rounds=rounds, calls_per_round=calls_per_round)
    workers = []
    try:
        for case, env in ((ours_case, env_ours), (theirs_case, env_theirs)):
            workers.append(_Worker(script, case, env, timeout_s))  # one set-up at a time
        pairs = []
        for _ in range(rounds):
            load0 = load_1min()
            times = [statistics.median(w.time(calls_per_round)) for w in workers]
            pairs.append(dict(ours_s=times[0], theirs_s=times[1], load_1min_before=load0,
                              load_1min_after=load_1min()))
        infos = [w.finish() for w in workers]
    except RuntimeError as e:
        out["error"] = str(e)
        return out
    finally:
        for w in workers:
            w.close()
    out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    for name, info in zip(("ours", "theirs"), infos):
        info.pop("layout", None)
        info["times_s"] = [p[f"{name}_s"] for p in pairs]
        info["median_s"] = statistics.median(info["times_s"])
        out[name] = info
    out["pairs"] = pairs
    out.update(ratio_stats([p["theirs_s"] / p["ours_s"] for p in pairs]))
    loads = [load_before[0], out["load_avg_after"][0]] + [p["load_1min_after"] for p in pairs]
    out["loaded_host"] = is_loaded(loads, cores)
    return out


def ratio_stats(ratios):
    """Median, quartiles and range of per-pair ratios (``theirs_time / ours_time``).

    Returns:
      dict(pair_ratios, ratio_median, ratio_q1, ratio_q3, ratio_min, ratio_max); quartiles by
      ``statistics.quantiles(method="inclusive")`` (equal to the median for one pair).
    """
    q1, _, q3 = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                 else (ratios[0],) * 3)
    return dict(pair_ratios=[round(r, 4) for r in ratios],
                ratio_median=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3,
                ratio_min=min(ratios), ratio_max=max(ratios))


class _Worker:
    """One side's worker process and a thread that queues its stdout lines."""

    def __init__(self, script, case, env, timeout_s):
        child_env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child_env["PYTHONPATH"] = root + os.pathsep + child_env.get("PYTHONPATH", "")
        child_env.update(env or {})
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._timeout = timeout_s
        self._proc = subprocess.Popen(
            [sys.executable, script, "--case", json.dumps(case)], env=child_env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.perf_counter()
        self.info = self._expect("READY")
        self.info["setup_wall_s"] = round(time.perf_counter() - t0, 2)

    def time(self, n):
        self._proc.stdin.write(f"time {n}\n")
        self._proc.stdin.flush()
        return self._expect("TIMES")

    def finish(self):
        self._proc.stdin.write("done\n")
        self._proc.stdin.flush()
        return dict(self.info, **self._expect("RESULT"))

    def close(self):
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=60)
        self._stderr.close()

    def _read(self):
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _expect(self, tag):
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise RuntimeError(f"worker sent no {tag} within {self._timeout} s") from None
            if line is None:
                self._stderr.seek(0)
                raise RuntimeError(f"worker exited (code {self._proc.wait()}) before {tag}; "
                                   f"stderr tail:\n{self._stderr.read()[-3000:]}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])


def _send(tag, payload):
    print(f"{tag} {json.dumps(payload)}", flush=True)
