"""run_train.py / run_sample.py as subprocesses: train, sample, exact resume, bad flags."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from training_fixtures import REPO, subprocess_env

from configs import tiny
from diffusion_jax import checkpoint, sharding, train


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


def _train(workdir, *args):
    proc = _run("run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _restore(workdir, step):
    config = tiny.get_config()
    _, abstract, _ = train.abstract_train_state(
        config, train.make_optimizer(config), sharding.make_mesh(config.mesh))
    manager = checkpoint.make_manager(workdir, create=False)
    state, data_state = checkpoint.restore(manager, abstract, step)
    return jax.device_get(state), data_state


@pytest.mark.slow
def test_train_sample_and_exact_resume(tmp_path):
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    proc = _train(full)  # 4 steps, checkpoints at 2 and 4
    assert "step 4: " in proc.stdout and os.listdir(os.path.join(full, "checkpoints"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(full))

    out = str(tmp_path / "samples")
    proc = _run("run_sample.py", f"--workdir={full}", "--sampler=ddim", "--steps=3",
                "--num_samples=5", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = np.load(os.path.join(out, "samples.npz"))
    assert npz["images"].shape == (5, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].shape == (5,) and npz["images"].std() > 0
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0

    bar = np.zeros((16, 16), np.uint8)  # a white vertical bar, resized to 8x8 by run_sample
    bar[:, 4:12] = 255
    image = str(tmp_path / "bar.png")
    Image.fromarray(bar).save(image)
    proc = _run("run_sample.py", f"--workdir={full}", "--task=sdedit", f"--input={image}",
                "--t0=0.5", "--steps=3", "--num_samples=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdedit = np.load(os.path.join(out, "sdedit.npz"))
    assert sdedit["input"].shape == sdedit["output"].shape == (2, 8, 8, 1)
    assert sdedit["input"].max() > 0.9 and sdedit["input"].min() < -0.9  # the bar, in [-1, 1]
    assert np.isfinite(sdedit["output"]).all() and not np.allclose(sdedit["output"],
                                                                    sdedit["input"])

    _train(half, "--config.train.num_steps=2")  # stop half way ...
    _train(half)  # ... and continue in a new process
    (a, data_a), (b, data_b) = _restore(full, 4), _restore(half, 4)
    assert data_a == data_b == {"next_index": 4}
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bit-exact


@pytest.mark.parametrize("arg, needle", [("--config.train.batch_sise=3", "batch_sise"),
                                         ("--config.train.batch_size=abc", "batch_size")])
def test_bad_config_override_fails_naming_the_key(tmp_path, arg, needle):
    proc = _run("run_train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", arg)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
    proc = _run("run_sample.py", f"--workdir={tmp_path}", f"--out={tmp_path}/out")
    assert proc.returncode != 0 and "no checkpoint directory" in proc.stderr
