"""Bits/dim of a model through the probability-flow ODE: the batched evaluator equals the library
called directly, and ``run_eval.py --metric=bpd_ode`` reports it for a workdir."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from training_fixtures import REPO, micro_config, subprocess_env

from diffusion_jax import data, denoisers, likelihood_eval, objectives, schedules, train
from diffusion_jax.sde.adapters import ddpm_score, sde_for_schedule
from diffusion_jax.sde.likelihood import dequantized_bits_per_dim, ode_log_likelihood


def _tiny_model():
    config = micro_config()
    graphdef, params = nnx.split(objectives.build_model(config, rngs=nnx.Rngs(0)))
    return config, graphdef, params, schedules.schedule_from_config(config.diffusion)


def test_ode_bits_per_dim_equals_the_library_called_directly():
    config, graphdef, params, sched = _tiny_model()
    images, _ = data.load_eval_images(config.data, 6)
    key = jax.random.key(3)
    got = likelihood_eval.ode_bits_per_dim(graphdef, params, config, sched, images, key,
                                           batch_size=3, num_steps=6)
    sde = sde_for_schedule(sched, "vp")
    score = ddpm_score(denoisers.build_denoiser(nnx.merge(graphdef, params)), sched, sde, "eps")
    log_lik = lambda y, k: ode_log_likelihood(score, sde, y, k, eps=1e-5, num_steps=6)[0]
    want = np.concatenate([
        np.asarray(jax.jit(lambda x, k: dequantized_bits_per_dim(log_lik, x, k))(
            images[3 * j:3 * j + 3], jax.random.fold_in(key, j))) for j in range(2)])
    assert got.shape == (6,) and np.all(np.isfinite(got)) and np.all(got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_vlb_bits_per_dim_rejects_continuous_models():
    config, graphdef, params, sched = _tiny_model()
    config.diffusion.kind = "vp"
    with pytest.raises(ValueError, match="discrete-time"):
        likelihood_eval.vlb_bits_per_dim(graphdef, params, config, sched,
                                         np.zeros((2, 8, 8, 1), np.float32), jax.random.key(0))


def test_run_eval_bpd_needs_a_workdir(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_eval.py"), "--metric=bpd_ode",
                           f"--workdir={tmp_path / 'missing'}"], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=subprocess_env())
    assert proc.returncode != 0
    assert "missing" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_run_eval_bpd_ode_on_a_trained_workdir(tmp_path):
    """Train tiny.py for 2 steps, then run_eval.py's number equals the evaluator's."""
    workdir = tmp_path / "w"
    train_proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.train.num_steps=2"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=subprocess_env())
    assert train_proc.returncode == 0, train_proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_eval.py"), "--metric=bpd_ode",
         f"--workdir={workdir}", "--num_examples=4", "--batch_size=4", "--ode_steps=4"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert np.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    from diffusion_jax import loading
    loaded = loading.load(workdir=str(workdir))
    images, _ = data.load_eval_images(loaded.config.data, 4)
    direct = likelihood_eval.ode_bits_per_dim(
        loaded.graphdef, loaded.params, loaded.config, loaded.schedule, images,
        jax.random.key(0), batch_size=4, num_steps=4)
    assert result["bits_per_dim"] == pytest.approx(float(direct.mean()), rel=1e-4)
