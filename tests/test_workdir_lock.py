"""One training run per workdir: a second run_train.py exits 1 naming the holder; stale locks
are taken over; the lock goes away however the run ends."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from training_fixtures import REPO, subprocess_env

from diffusion_jax import workdir_lock


def _train_cmd(workdir, *extra):
    return [sys.executable, "run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            *extra]


def test_second_run_train_on_a_busy_workdir_exits_1_naming_the_holder(tmp_path, capsys):
    workdir, lock = tmp_path / "run", tmp_path / "run" / workdir_lock.LOCK_FILE
    first = subprocess.Popen(_train_cmd(workdir, "--config.train.num_steps=100000"), cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not workdir_lock.holder(str(lock)) and first.poll() is None:
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        record = workdir_lock.holder(str(lock))
        assert record["pid"] == first.pid and record["host"] == socket.gethostname()
        second = subprocess.run(_train_cmd(workdir), cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        fatal = [line for line in second.stderr.splitlines() if line.startswith("FATAL")]
        assert fatal == [f"FATAL WorkdirLockedError: workdir {workdir} is in use by another "
                         f"training run: pid {first.pid} on host {record['host']} since "
                         f"{record['since']} (lock file {lock})"], second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # SIGKILL left the file behind; its holder is gone, so the next run takes it over
    with workdir_lock.hold(str(workdir)) as path:
        assert workdir_lock.holder(path)["pid"] == os.getpid()
    assert f"taking over the stale lock {lock} of pid {first.pid}" in capsys.readouterr().err
    assert not lock.exists()


def test_lock_is_exclusive_in_process_and_released_on_exceptions(tmp_path):
    with pytest.raises(KeyError):
        with workdir_lock.hold(str(tmp_path)):
            with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on"):
                with workdir_lock.hold(str(tmp_path)):
                    pass
            raise KeyError("training failed")
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
    with workdir_lock.hold(str(tmp_path)):  # free again
        pass


def test_a_lock_of_another_host_is_refused_and_gs_paths_are_not_locked(tmp_path, capsys):
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
        dict(pid=1, host="other-host", since="2026-01-01T00:00:00Z")))
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match="pid 1 on host other-host since 2026-01-01T00:00:00Z"):
        with workdir_lock.hold(str(tmp_path)):
            pass
    assert (tmp_path / workdir_lock.LOCK_FILE).exists()  # not ours to remove
    with workdir_lock.hold("gs://bucket/run") as path:
        assert path is None
    assert "gs://bucket/run is not a local path" in capsys.readouterr().err
