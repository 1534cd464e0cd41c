"""Multi-host training run for real: 2 jax processes x 4 fake CPU devices on 127.0.0.1.

``scripts/multihost_local.py`` starts ``run_train.py`` (tiny.py) twice with
``--config.distributed.*`` flags; the processes join one 8-device job through
``jax.distributed.initialize`` and gloo collectives. Checked here:

* each process reads its own disjoint host slice of the data (``jax.process_index()``);
* training on a data=4 x fsdp=2 mesh, SIGKILLed after its first checkpoint (written by both
  processes: one orbax OCDBT shard file each) and resumed by both processes, ends with the
  parameters of one process with 8 devices fed the same global batches (host 0's examples
  then host 1's). A plain data=8 two-process run is not repeated here: it is the fsdp=1 case
  of the same code path, and costs a third of this test's time.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from training_fixtures import REPO, micro_config
from diffusion_jax import checkpoint, data, train

_spec = importlib.util.spec_from_file_location(
    "multihost_local", os.path.join(REPO, "scripts", "multihost_local.py"))
multihost_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multihost_local)

NUM_PROCESSES = 2


def _launch(argv, log_dir, kill_when=None):
    """Runs the job; again (up to 3 times) if gloo failed to connect the two processes.

    gloo connects the processes at their first collective and gives up after 30 s; on a host
    overloaded by other jobs one process can reach it that much later than the other, and the
    survivor then blocks. Such an attempt is stopped as soon as its log shows the failure. A
    rerun resumes from the latest checkpoint, which the final comparison covers anyway.
    """
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices; the launcher sets 4 per process
    for attempt in range(3):
        attempt_dir = f"{log_dir}_{attempt}"

        def stop():
            return _gloo_failed(attempt_dir) or (kill_when is not None and kill_when())

        out = multihost_local.launch(argv, num_processes=NUM_PROCESSES, devices_per_process=4,
                                     timeout_s=240, log_dir=attempt_dir, env=env, kill_when=stop,
                                     poll_s=0.1)
        logs = "\n".join(_read(p) for p in out["logs"])
        if _GLOO_FAILURE not in logs:
            assert not out["timed_out"], logs[-4000:]
            return out, logs
    pytest.fail(f"gloo failed to connect the processes 3 times:\n{logs[-4000:]}")


_GLOO_FAILURE = "Gloo context initialization failed"


def _gloo_failed(log_dir):
    paths = [os.path.join(log_dir, f"process_{p}.log") for p in range(NUM_PROCESSES)]
    return any(os.path.exists(p) and _GLOO_FAILURE in _read(p) for p in paths)


def _read(path):
    with open(path) as f:
        return f.read()


def _train_argv(workdir, num_steps, data_axis, fsdp):
    """run_train.py on tiny.py; the persistent compilation cache is off: with a cache filled
    by an earlier run (only process 0 writes entries), one process could load a program while
    the other compiles it, and the first to arrive at a gloo collective waits only 30 s."""
    return ["run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.train.num_steps={num_steps}", f"--config.mesh.data={data_axis}",
            f"--config.mesh.fsdp={fsdp}", "--compilation_cache_dir="]


def _finished_steps(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _restore_params(workdir):
    """(params, first EMA) of the latest checkpoint in ``workdir``, on this process's mesh."""
    manager = checkpoint.make_manager(str(workdir), create=False, async_checkpointing=False)
    config = checkpoint.load_config(manager)
    config.mesh.data, config.mesh.fsdp = -1, 1
    _, abstract, _ = train.abstract_train_state(
        config, train.make_optimizer(config), jax.sharding.Mesh(
            np.array(jax.devices()).reshape(-1, 1), ("data", "fsdp")))
    state, _ = checkpoint.restore(manager, abstract)
    manager.close()
    return int(state.step), state.params, state.ema_params[0]


class _GlobalBatches:
    """One process's view of what N hosts read together: host 0's batch, then host 1's..."""

    def __init__(self, iterators):
        self._its = iterators

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self._its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return self._its[0].get_state()

    def set_state(self, state):
        for it in self._its:
            it.set_state(state)


@pytest.mark.slow
def test_each_process_reads_its_own_disjoint_host_slice(tmp_path):
    out, logs = _launch([os.path.join("tests", "multihost_data_worker.py"),
                         "--config=configs/tiny.py", f"--out={tmp_path}"], tmp_path / "logs")
    assert out["returncodes"] == [0] * NUM_PROCESSES, logs[-4000:]
    cfg = micro_config()
    seen = []
    for p in range(NUM_PROCESSES):
        with np.load(tmp_path / f"process_{p}.npz") as f:
            assert int(f["process_count"]) == NUM_PROCESSES
            host = f["images"]
        expected = data.make_train_iterator(cfg.data, batch_size=cfg.train.batch_size,
                                            seed=cfg.seed, process_index=p,
                                            process_count=NUM_PROCESSES)
        np.testing.assert_array_equal(host, np.stack([next(expected)["image"] for _ in range(3)]))
        assert host.shape[1] == cfg.train.batch_size // NUM_PROCESSES
        seen.append({img.tobytes() for img in host.reshape(-1, *host.shape[2:])})
    assert len(seen[0]) == len(seen[1]) == 3 * cfg.train.batch_size // NUM_PROCESSES
    assert not seen[0] & seen[1]  # sklearn digits has no duplicate images


@pytest.mark.slow
def test_two_processes_train_resume_and_match_one_process(tmp_path, monkeypatch):
    fsdp_dir, ref_dir = tmp_path / "fsdp", tmp_path / "ref"
    # data=4 x fsdp=2, killed (SIGKILL, both processes) once its first checkpoint is final.
    out, logs = _launch(_train_argv(fsdp_dir, 10**6, 4, 2), tmp_path / "logs_a",
                        kill_when=lambda: bool(_finished_steps(fsdp_dir)))
    assert out["killed"], logs[-4000:]
    last = _finished_steps(fsdp_dir)[-1]
    state_dir = os.path.join(fsdp_dir, "checkpoints", str(last), "state")
    assert {f"ocdbt.process_{p}" for p in range(NUM_PROCESSES)} <= set(os.listdir(state_dir))
    total = last + 2
    out, logs = _launch(_train_argv(fsdp_dir, total, 4, 2), tmp_path / "logs_b")
    assert out["returncodes"] == [0] * NUM_PROCESSES, logs[-4000:]
    assert f"Restored step {last}" in logs

    make_iterator = data.make_train_iterator

    def global_batches(data_cfg, *, batch_size, seed):
        return _GlobalBatches([make_iterator(data_cfg, batch_size=batch_size, seed=seed,
                                             process_index=p, process_count=NUM_PROCESSES)
                               for p in range(NUM_PROCESSES)])

    monkeypatch.setattr(data, "make_train_iterator", global_batches)
    config = micro_config(data_axis=8)
    config.train.num_steps = total
    ref = train.train_and_evaluate(config, str(ref_dir))
    step, params, ema = _restore_params(fsdp_dir)
    assert step == total
    for got, want in ((params, ref.params), (ema, ref.ema_params[0])):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5), got, want)
