"""A trained text-to-image run pins the steps and contents of its frozen stages: training a
stage further changes nothing; a pinned step that is gone or changed is refused, by name.

Stage checkpoints are written directly (fresh states, no compiled train step) to stay fast;
pinning only depends on what the stage workdirs hold.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_t2i_stages import _fake_fashion
from training_fixtures import REPO, subprocess_env

from configs import fashion_autoencoder, fashion_clip, fashion_t2i
from diffusion_jax import (checkpoint, clip_tokenizer, latent_generate, loading, objectives,
                           pipelines, resume, schedules, stage_pipeline, train)
from diffusion_jax.sde import parameterization


def _config(module, data_dir, **latent):
    config = module.get_config("tiny")
    config.data.folder = data_dir
    for name, value in latent.items():
        config.latent[name] = value
    return config


def _fresh_state(config, seed):
    """A train state of ``config`` with N(0, 0.1^2) numpy floats (integers 0): no compiling."""
    shapes = jax.eval_shape(lambda: train.init_train_state(config, train.make_optimizer(config)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
                        if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
                        shapes)


def _save(config, workdir, step, state=None):
    """Checkpoint ``step`` of ``state`` (default: a fresh one) in ``workdir``; returns
    ``(resolved config, state)``."""
    config = objectives.prepare_config(config, workdir)
    state = _fresh_state(config, step) if state is None else state
    manager = checkpoint.make_manager(workdir, max_to_keep=3, async_checkpointing=False)
    checkpoint.save(manager, state, step=step, data_state={}, config=config)
    checkpoint.close(manager, 60)
    return config, state


def _ckpt(workdir, step):
    return os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR, str(step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Autoencoder (step 2), CLIP (step 1), a t2i run (step 1) on them, then the autoencoder
    trained on (step 4)."""
    root = tmp_path_factory.mktemp("pin")
    data_dir = str(root / "fashion")
    _fake_fashion(data_dir)
    dirs = {name: str(root / name) for name in ("ae", "clip", "t2i")}
    ae_config, ae_state = _save(_config(fashion_autoencoder, data_dir), dirs["ae"], 2)
    _save(_config(fashion_clip, data_dir), dirs["clip"], 1)
    t2i = _config(fashion_t2i, data_dir, autoencoder_workdir=dirs["ae"],
                  clip_workdir=dirs["clip"], scale_factor=1.0)  # 1.0: not measured
    _save(t2i, dirs["t2i"], 1)
    further = jax.tree.map(lambda x: x + np.asarray(0.01, x.dtype), ae_state)
    _save(ae_config, dirs["ae"], 4, further)                     # the stage trained on
    return dict(dirs, t2i_config=t2i, pinned=loading.params_digest(ae_state.ema_params[0]),
                trained_with=ae_state.ema_params[0],
                latest=loading.params_digest(further.ema_params[0]))


def test_training_a_stage_further_keeps_the_model_and_a_changed_step_is_refused(runs):
    ae, t2i, config = runs["ae"], runs["t2i"], runs["t2i_config"]
    pinned, found = runs["pinned"], runs["latest"]
    record = json.load(open(os.path.join(t2i, objectives.STAGES_FILE)))
    assert (record["autoencoder"]["step"], record["clip"]["step"]) == (2, 1)
    assert record["autoencoder"]["sha256"] == pinned and found != pinned
    vae = stage_pipeline.load_pipeline(t2i).vae                   # sampling: still step 2
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(vae, nnx.Param)),
                 nnx.to_pure_dict(runs["trained_with"]))
    resumed = objectives.prepare_config(config, t2i)             # resuming: pinned to step 2
    assert (resumed.latent.autoencoder_step, resumed.latent.autoencoder_sha256) == (2, pinned)
    assert json.load(open(os.path.join(t2i, objectives.STAGES_FILE))) == record

    # step 2 now holds other parameters (step 4's): refused, naming both hashes
    shutil.move(_ckpt(ae, 2), _ckpt(ae, 2) + "_orig")
    shutil.copytree(_ckpt(ae, 4), _ckpt(ae, 2))
    changed = rf"trained with step 2 of {ae} \(sha256 {pinned}\), but step 2 there now has " \
              rf"sha256 {found}"
    with pytest.raises(ValueError, match=changed):
        objectives.load_frozen_stage(resumed, "autoencoder")     # what sampling loads
    with pytest.raises(ValueError, match=changed):
        train.train_and_evaluate(config, t2i)
    # step 2 gone: refused, naming it and the steps there are
    shutil.rmtree(_ckpt(ae, 2))
    gone = rf"step 2 of {ae} \(sha256 {pinned}\), is gone \(steps found: \[4\]\)"
    with pytest.raises(FileNotFoundError, match=gone):
        objectives.load_frozen_stage(resumed, "autoencoder")
    with pytest.raises(FileNotFoundError, match=gone):
        train.train_and_evaluate(config, t2i)
    shutil.move(_ckpt(ae, 2) + "_orig", _ckpt(ae, 2))


def test_resuming_a_run_with_a_measured_scale_resolves_the_same_config(runs, tmp_path):
    """A t2i run whose latent scale was measured (0 in its config) resolves, when resumed, to
    the config stored with its checkpoint: nothing for `resume.check_config` to refuse."""
    config = copy.deepcopy(runs["t2i_config"])
    config.latent.scale_factor = 0.0
    workdir = str(tmp_path / "t2i")
    _save(config, workdir, 1)
    assert os.path.exists(os.path.join(workdir, objectives.SCALE_FILE))
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    stored = checkpoint.load_config(manager)
    assert stored.latent.scale_factor > 0
    unsafe, _ = resume.config_changes(stored, objectives.prepare_config(config, workdir))
    assert not unsafe


def test_runs_from_before_pinning_load_the_latest_stage_with_a_warning(runs, capsys):
    old = objectives.prepare_config(runs["t2i_config"], runs["t2i"]).to_dict()
    for name in ("autoencoder_step", "autoencoder_sha256", "clip_step", "clip_sha256"):
        del old["latent"][name]
    loaded = objectives.load_frozen_stage(ml_collections.ConfigDict(old), "autoencoder")
    assert "records no step of its autoencoder stage" in capsys.readouterr().err
    assert loading.params_digest(loaded.params) == runs["latest"]  # step 4


def test_a_workdir_of_the_wrong_kind_names_the_kind_found_and_expected(runs, tmp_path):
    for stage, kind in (("ae", "autoencoder"), ("clip", "clip")):
        with pytest.raises(ValueError, match=rf"{runs[stage]} holds a '{kind}' run "
                                             r"\(config.train.objective\) \(a stage of a "
                                             r"text-to-image model.*expected 'diffusion' or "
                                             r"'latent_diffusion'"):
            loading.load(workdir=runs[stage])
    with pytest.raises(ValueError, match=r"holds a 'autoencoder' run .*expected 'clip'"):
        objectives.load_stage(runs["ae"], "clip")
    with pytest.raises(ValueError, match=r"holds a 'clip' run .*expected 'latent_diffusion'"):
        stage_pipeline.load_pipeline(runs["clip"])
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is a Stable Diffusion pipeline "
                                                r"directory \(model_index.json\), not a "
                                                r"training workdir: pass it as --checkpoint"):
        loading.load(workdir=str(tmp_path))


def test_run_train_reports_a_wrong_stage_workdir_in_one_line(runs, tmp_path):
    """configs/fashion_t2i.py with the CLIP workdir as its autoencoder: one FATAL line."""
    proc = subprocess.run(
        [sys.executable, "run_train.py", "--config=configs/fashion_t2i.py:tiny",
         f"--workdir={tmp_path / 't2i'}", f"--config.latent.autoencoder_workdir={runs['clip']}",
         f"--config.latent.clip_workdir={runs['clip']}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert fatal == [f"FATAL ValueError: {runs['clip']} holds a 'clip' run; expected "
                     "train.objective='autoencoder'."], proc.stderr


def _continuous(runs, kind, workdir):
    """The t2i config of ``runs`` trained with ``diffusion.kind = kind``, resolved for
    ``workdir``; captions never dropped."""
    config = copy.deepcopy(runs["t2i_config"])
    config.diffusion.kind, config.model.time_input = kind, "continuous"
    config.latent.caption_drop_prob = 0.0
    return config, objectives.prepare_config(config, workdir)


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_latent_diffusion_trains_the_loss_of_its_diffusion_kind(runs, tmp_path, kind):
    """The latent loss is `parameterization.training_loss` of the kind on the frozen stages'
    latents and text states (it was DDPM's discrete loss whatever the kind)."""
    _, config = _continuous(runs, kind, str(tmp_path / kind))
    model = objectives.build_model(config, nnx.Rngs(0))
    schedule = schedules.schedule_from_config(config.diffusion)
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param)
    loss_fn = objectives.get("latent_diffusion").make_loss_fn(graphdef, schedule, config)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 1)), jnp.float32)
    tok = clip_tokenizer.load_tokenizer(os.path.join(runs["clip"], objectives.TOKENIZER_SUBDIR))
    ids = jnp.asarray(tok(["an ankle boot", "a shirt", "a bag", ""]))
    key = jax.random.key(3)
    loss, _ = loss_fn(params, {"image": images, "input_ids": ids}, key)
    vae = objectives.load_frozen_stage(config, "autoencoder").model
    states = objectives.load_frozen_stage(config, "clip").model.text_model(ids).last_hidden_state
    latent_key, loss_key = jax.random.split(key)
    z = vae.encode(images).sample(latent_key) * config.latent.scale_factor
    expected, _, _ = parameterization.training_loss(
        lambda x, t: model(x, t, {"text": states}), config.diffusion, z, loss_key,
        schedule.num_timesteps)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    config = copy.deepcopy(config)
    config.model.time_input = "discrete"
    with pytest.raises(ValueError, match=rf"diffusion.kind='{kind}' needs "
                                         r"model.time_input='continuous'"):
        objectives.get("latent_diffusion").make_loss_fn(graphdef, schedule, config)


def test_an_edm_latent_workdir_samples_through_the_t2i_pipeline(runs, tmp_path):
    """An EDM latent run (a checkpoint written directly: its loss is checked above, and a
    compiled train step would add a minute) loads as EDM's denoiser and samples."""
    workdir = str(tmp_path / "edm")
    config, resolved = _continuous(runs, "edm", workdir)
    _save(config, workdir, 1)
    pipe = stage_pipeline.load_pipeline(workdir)
    assert isinstance(pipe.unet, latent_generate.ContinuousTimeUNet)
    # the pipeline's UNet is EDM's D(y, sigma) = c_skip y + c_out net(c_in y, 250 ln sigma) at
    # y = z_t / sqrt(ab_t), sigma = sqrt((1 - ab_t) / ab_t): an x0-predictor of discrete t
    z_t = jax.random.normal(jax.random.key(1), pipelines.latent_shape(pipe, 2))
    t = jnp.array([10, 90])
    text_shape = (2, resolved.captions.max_length, resolved.latent.cross_attention_dim)
    cond = {"text": jax.random.normal(jax.random.key(2), text_shape)}
    ab = pipe.schedule.alphas_cumprod[t][:, None, None, None]
    sigma, sd = jnp.sqrt((1 - ab) / ab), resolved.diffusion.edm_sigma_data
    y = z_t / jnp.sqrt(ab)
    net = pipe.unet.net(y / jnp.sqrt(sigma**2 + sd**2), 250 * jnp.log(sigma[:, 0, 0, 0]), cond)
    expected = sd**2 / (sigma**2 + sd**2) * y + sigma * sd / jnp.sqrt(sigma**2 + sd**2) * net
    np.testing.assert_allclose(pipe.unet(z_t, t, cond), expected, rtol=1e-4, atol=1e-5)
    assert pipe.options.pred_type == "x0"
    images = pipelines.text_to_image(pipe, ["an ankle boot", "a shirt"], jax.random.key(0),
                                     guidance_scale=3.0, num_steps=3, output="float")
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()
