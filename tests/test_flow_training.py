"""Flow-matching models (diffusion.kind="flow") trained by the one train step and sampled
through the registry: in process, and through run_train.py / run_sample.py."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_fixtures import micro_config

from diffusion_jax import data, generate, samplers, schedules, sharding, train
from diffusion_jax.sde import flow, parameterization
from test_cli import _run


def _flow_config():
    config = micro_config()
    config.diffusion.kind, config.model.time_input = "flow", "continuous"
    config.model.dropout = 0.0
    return config


def test_training_loss_of_the_flow_kind_is_the_flow_matching_loss():
    """The train step's loss of a flow model is flow.flow_matching_loss of ``net(x, 1000 t)``
    with the config's settings, and its buckets are the sampled times' quantiles."""
    config = _flow_config().diffusion
    config.flow_time_sampling, config.flow_shift, config.flow_weighting = "mode", 2.0, "cosmap"
    net = lambda x, time: jnp.tanh(x) * time[:, None, None, None] / 1000.0 - 0.3 * x
    x0 = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 1))
    key = jax.random.PRNGKey(1)
    loss, per_example, t = parameterization.training_loss(net, config, x0, key, 100)
    velocity = lambda x, tt: net(x, 1000.0 * tt)
    ref, ref_per_example, quantile = flow.flow_matching_loss(
        velocity, x0, key, time_sampling="mode", mode_scale=1.29, shift=2.0, weighting="cosmap")
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(per_example, ref_per_example, rtol=1e-6)
    np.testing.assert_array_equal(t, np.floor(np.asarray(quantile) * 100).astype(np.int32))


@pytest.mark.parametrize("field,value,match", [
    ("kind", "rectified", r"Unknown diffusion.kind 'rectified'; expected one of \[.*'flow'\]"),
    ("flow_time_sampling", "lognorm", "Unknown diffusion.flow_time_sampling 'lognorm'; "
     r"expected one of \['uniform', 'logit_normal', 'mode', 'cosmap'\]"),
    ("flow_weighting", "snr", "Unknown diffusion.flow_weighting 'snr'; expected one of"),
    ("flow_shift", 0.0, "diffusion.flow_shift must be > 0"),
    ("flow_mode_scale", 2.0, r"diffusion.flow_mode_scale must lie in \[-1.0, 1.7519\]"),
])
def test_bad_flow_settings_are_named_before_compiling(field, value, match):
    config = _flow_config()
    config.diffusion[field] = value
    with pytest.raises(ValueError, match=match):
        train.make_train_step(None, schedules.schedule_from_config(config.diffusion),
                              train.make_optimizer(config), config)


def test_flow_model_trains_and_samples():
    """30 steps lower the loss; the flow samplers and DDIM (through the x0 view) sample it through
    generate.make_sample_fn (run_sample.py's path); one Euler step and one DPM-Solver++(2M)
    step are both ``x - v(x, 1)``."""
    config = _flow_config()
    built = train.build(config)
    state, step_fn = built.init_state(config), built.step_fn
    images, labels = data.load_eval_images(config.data, 16)
    batch = sharding.shard_batch({"image": images, "label": labels}, built.mesh)
    losses = []
    for _ in range(30):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    out = {}
    for name, steps in (("flow_euler", 1), ("flow_dpm_solver", 1), ("ddim", 2)):
        options = samplers.options_from_config(config, num_steps=steps)
        fn = generate.make_sample_fn(built.graphdef, built.schedule, config, built.mesh,
                                     num_samples=8, sampler=name,
                                     options=dataclasses.replace(options, clip_x0=None))
        out[name] = np.asarray(fn(state.params, jax.random.key(0)))
        assert out[name].shape == (8, 8, 8, 1) and np.all(np.isfinite(out[name])), name
    np.testing.assert_allclose(out["flow_euler"], out["flow_dpm_solver"], atol=1e-5)
    assert not np.allclose(out["ddim"], out["flow_euler"], atol=1e-3)


@pytest.mark.slow
def test_run_train_and_run_sample_on_a_flow_model(tmp_path):
    """run_train.py trains the tiny config as a flow model; run_sample.py samples it with a flow
    sampler (the other samplers' path, generate.make_sample_fn, is the test above); a bad flow
    setting is one line, exit 1; an SDEdit start part-way with a flow sampler is refused."""
    workdir, out = str(tmp_path / "flow"), str(tmp_path / "samples")
    flow_flags = ("--config.diffusion.kind=flow", "--config.model.time_input=continuous")
    proc = _run("run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flow_flags,
                "--config.train.num_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("run_sample.py", f"--workdir={workdir}", "--sampler=flow_heun", "--steps=3",
                "--num_samples=3", f"--out={out}", "--sampler_option=shift=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(os.path.join(out, "samples.npz"))["images"]
    assert images.shape == (3, 8, 8, 1) and images.std() > 0
    proc = _run("run_sample.py", f"--workdir={workdir}", "--sampler=flow_euler", "--task=sdedit",
                "--input=missing.png", f"--out={out}")
    assert proc.returncode == 1 and "sampler 'flow_euler' cannot start part-way" in proc.stderr
    proc = _run("run_train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'bad'}",
                *flow_flags, "--config.diffusion.flow_time_sampling=lognorm")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "Unknown diffusion.flow_time_sampling 'lognorm'" in last, proc.stderr[-2000:]
