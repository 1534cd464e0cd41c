"""Stop signals during training save a checkpoint and resume exactly; failing or stuck
checkpoint writes are errors, never hangs."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from training_fixtures import REPO, micro_config, subprocess_env

from diffusion_jax import checkpoint, data, train


class _SignalAt:
    """Wraps a data iterator; sends ``signum`` to this process while loading batch ``n``."""

    def __init__(self, it, n, signum):
        self.it, self.n, self.signum = it, n, signum

    def __next__(self):
        batch = next(self.it)
        if self.it.get_state()["next_index"] == self.n:
            os.kill(os.getpid(), self.signum)
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def _config(num_steps):
    """Checkpoints only at the end (or on a signal); log_every = 0: metrics only at saves."""
    config = micro_config()
    config.train.num_steps, config.train.checkpoint_every = num_steps, 100
    config.train.log_every = 0
    return config


@pytest.mark.parametrize("field", ["log_every", "checkpoint_every", "eval_every", "num_steps"])
def test_negative_intervals_are_refused_up_front(tmp_path, field):
    config = micro_config()
    config.train[field] = -1
    with pytest.raises(ValueError, match=rf"train.{field}=-1 must be >= 0 \(0 = never\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before anything is created


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final state of an uninterrupted 6-step run."""
    return jax.device_get(train.train_and_evaluate(
        _config(6), str(tmp_path_factory.mktemp("reference"))))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_and_resume_is_exact(tmp_path, monkeypatch, reference, signum):
    workdir = str(tmp_path)
    handlers = [signal.getsignal(s) for s in train.STOP_SIGNALS]
    make_iterator = data.make_train_iterator
    with monkeypatch.context() as m:
        m.setattr(train.data, "make_train_iterator",
                  lambda *a, **kw: _SignalAt(make_iterator(*a, **kw), 3, signum))
        with pytest.raises(train.TrainingInterrupted, match=rf"{signum.name} received: saved "
                                                            rf"checkpoint 3") as info:
            train.train_and_evaluate(_config(6), workdir)
    assert info.value.exit_code == 128 + signum and info.value.step == 3
    assert not os.path.exists(os.path.join(workdir, "train.lock"))  # released by the stop
    assert [signal.getsignal(s) for s in train.STOP_SIGNALS] == handlers  # restored
    manager = checkpoint.make_manager(workdir, create=False)
    assert manager.all_steps() == [3]  # checkpoint_every = 100: only the signalled step
    _, abstract, _ = train.abstract_train_state(
        _config(6), train.make_optimizer(_config(6)), train.sharding.make_mesh(_config(6).mesh))
    assert checkpoint.restore(manager, abstract)[1] == {"next_index": 3}  # the data position
    state = jax.device_get(train.train_and_evaluate(_config(6), workdir))
    assert not os.path.exists(os.path.join(workdir, "train.lock"))  # released at the end
    jax.tree.map(np.testing.assert_array_equal, state, reference)


def test_second_signal_aborts_at_once():
    code = ("import sys, time\nfrom diffusion_jax import train\n"
            "with train._StopSignals() as stop:\n"
            "    print('ready', flush=True)\n"
            "    while True:\n        time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert "SIGINT received: finishing this step" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "SIGINT received again: aborting" in proc.stderr.read()
    finally:
        proc.kill()


def test_failing_async_save_is_a_clear_error(tmp_path, monkeypatch):
    """After checkpoint 2, ``checkpoints/`` becomes a plain file, so writing checkpoint 4
    fails even for root (unlike a read-only directory)."""
    workdir = str(tmp_path)
    config = micro_config()
    config.train.async_checkpointing = True
    save = checkpoint.save

    def save_then_break(manager, state, *, step, **kw):
        if step == 4:
            manager.wait_until_finished()
            directory = os.path.join(workdir, "checkpoints")
            shutil.move(directory, directory + "_moved")
            open(directory, "w").close()
        return save(manager, state, step=step, **kw)

    monkeypatch.setattr(train.checkpoint, "save", save_then_break)
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"checkpoint 4 (to commit )?in .*checkpoints failed: "
                             r"NotADirectoryError"):
        train.train_and_evaluate(config, workdir)


def test_stuck_save_times_out_instead_of_hanging(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                        lambda self: release.wait())
    config = micro_config()
    config.train.checkpoint_timeout_s = 1.0
    try:
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"did not finish within 1 s \(train.checkpoint_timeout_s\)"):
            train.train_and_evaluate(config, str(tmp_path))
    finally:
        release.set()


@pytest.mark.slow
def test_sigterm_mid_run_then_rerun_is_bit_identical(tmp_path):
    """run_train.py with a huge num_steps / checkpoint_every, SIGTERM once it is training:
    exit 143 with one line, a checkpoint at the signalled step S, and resuming to S + 2 gives
    exactly the state of an uninterrupted (S + 2)-step run (constant lr: num_steps does not
    enter the step)."""
    workdir = str(tmp_path / "run")
    env = dict(subprocess_env(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "run_train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.train.num_steps=1000000",
         "--config.train.checkpoint_every=1000000", "--config.train.log_every=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step 3:") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Stopped: SIGTERM received: saved checkpoint "), last
    steps = checkpoint.make_manager(workdir, create=False).all_steps()
    assert len(steps) == 1 and steps[0] >= 3 and f"checkpoint {steps[0]} " in last
    config = micro_config()
    config.train.num_steps = steps[0] + 2
    resumed = jax.device_get(train.train_and_evaluate(config, workdir))
    fresh = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "fresh")))
    assert int(resumed.step) == steps[0] + 2
    jax.tree.map(np.testing.assert_array_equal, resumed, fresh)


_AGREE = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
from diffusion_jax import train
stop = train._StopSignals()  # not entered: the flag is set by hand on process 1 only
seen = []
for step in range(3):
    if pid == 1 and step == 1:
        stop.signum = 15
    seen.append(train._agreed_signal(stop))
print("seen", seen, flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_agree_on_the_stop_step():
    """Only process 1 is signalled (before step 1); both see the signal at step 1."""
    import socket  # pylint: disable=g-import-not-at-top
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE, str(port), str(i)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "seen [0, 15, 15]" in out, out
