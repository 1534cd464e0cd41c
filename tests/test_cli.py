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

    bar = np.zeros((16, 16), np.uint8)  # a white vertical bar, resized to 8x8 when asked
    bar[:, 4:12] = 255
    image = str(tmp_path / "bar.png")
    Image.fromarray(bar).save(image)
    proc = _run("run_sample.py", f"--workdir={full}", "--task=sdedit", f"--input={image}",
                "--resize_input", "--t0=0.5", "--steps=3", "--num_samples=2", f"--out={out}")
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


def _flags(*argv):
    """run_sample.py's sampling and task flags (cli.define_flags) parsed from ``argv``."""
    from absl import flags

    from diffusion_jax.cli import sample as cli
    fv = flags.FlagValues()
    cli.define_flags(fv)
    fv(["run_sample.py", *argv])
    return fv


def _model_config(num_classes, sr=False):
    config = tiny.get_config()
    config.model.class_conditional = num_classes > 0
    config.data.num_classes = num_classes
    config.model.cond_image_channels = config.data.num_channels if sr else 0
    return config


@pytest.mark.parametrize("argv, num_classes, match", [
    (["--class_label=99"], 10, r"--class_label=99 is out of range: .* \[0, 9\]"),
    (["--task=invert", "--class_label=99"], 10, r"--class_label=99 is out of range"),
    (["--task=invert", "--source_label=-1"], 10, r"--source_label=-1 is out of range"),
    (["--class_label=0"], 0, r"none \(unconditional model\)"),
    (["--steps=0"], 10, r"--steps must be >= 1, got 0"),
    (["--num_samples=0"], 10, r"--num_samples must be >= 1, got 0"),
    (["--num_samples=-3"], 10, r"--num_samples must be >= 1, got -3"),
    (["--guidance_scale=-1"], 10, r"--guidance_scale must be finite and >= 0 \(Stable "
                                  r"Diffusion's scale s; 1 = no guidance\), got -1"),
    (["--guidance_scale=nan"], 10, r"--guidance_scale must be finite and >= 0"),
    (["--guidance_scale=2"], 0, r"--guidance_scale needs a class-conditional model"),
    (["--t0=0.3"], 10, r"--t0 is not used by --task=sample \(it applies to sdedit, "
                       r"diffusionclip\)"),
    (["--target_text=x"], 10, r"--target_text is not used by --task=sample"),
    (["--task=diffusionclip", "--source_text=a", "--target_text=b"], 10,
     r"--task=diffusionclip needs --clip_workdir"),
    (["--task=diffusionclip", "--source_text=a", "--clip_workdir=w"], 10,
     r"--task=diffusionclip needs --target_text"),
    (["--task=diffusionclip", "--source_text=a", "--target_text=b", "--clip_workdir=w",
      "--finetune_steps=0"], 10, r"--finetune_steps must be >= 1, got 0"),
    (["--task=diffusionclip", "--source_text=a", "--target_text=b", "--clip_workdir=w",
      "--clip_lr=0"], 10, r"--clip_lr must be > 0"),
    (["--task=ilvr", "--mask_region=top"], 10, r"--mask_region is not used by --task=ilvr"),
    (["--task=invert", "--eta=0.5"], 10, r"--eta is not used by --task=invert"),
    (["--task=sdedit", "--sampler=langevin"], 10, r"'langevin' cannot start part-way"),
    (["--task=inpaint", "--sampler=langevin"], 10, r"'langevin' has no per-step hook"),
    (["--task=sr"], 10, r"--task=sr needs a super-resolution model"),
    (["--num_samples=2"], -10, r"super-resolution model; it runs with --task=sr, not sample"),
    # These two used to say only "needs a Stable Diffusion --checkpoint".
    (["--prompt=a cat"], 10, r"--prompt needs a text-to-image model \(a Stable Diffusion "
                             r"--checkpoint .* or the --workdir of a latent_diffusion run\); "
                             r"this is a class-conditional pixel model \(--class_label"),
    (["--negative_prompt=x"], 0, r"this is an unconditional pixel model"),
])
def test_bad_sampling_flags_are_rejected_before_sampling(argv, num_classes, match):
    """(num_classes < 0 stands for an unconditional super-resolution model.)"""
    from diffusion_jax.cli import sample as cli
    config = _model_config(max(num_classes, 0), sr=num_classes < 0)
    with pytest.raises(ValueError, match=match):
        cli.check_flags(_flags(*argv), config)


def test_good_sampling_flags_pass_and_sr_flags_default_to_the_config():
    from diffusion_jax.cli import sample as cli
    for argv in (["--class_label=9", "--guidance_scale=0", "--steps=1"],
                 ["--task=sdedit", "--t0=0.3", "--sampler=ddpm", "--mask_region=top"],
                 ["--task=invert", "--source_label=0", "--class_label=9", "--steps=4"]):
        cli.check_flags(_flags(*argv), _model_config(10))
    for kind in ("vp", "edm"):          # every application runs on continuous-time models
        config = _model_config(10)
        config.diffusion.kind = kind
        for task in ("sdedit", "inpaint", "ilvr", "invert"):
            cli.check_flags(_flags(f"--task={task}"), config)
    fv = _flags("--task=sr")
    assert (fv.sr_factor, fv.sr_method, fv.sr_aug_t) == (None, None, None)  # config.sr decides
    options = cli.sampler_options(_flags("--steps=7"), _model_config(10))
    assert (options.num_steps, options.eta) == (7, tiny.get_config().sample.eta)


def test_task_table_is_the_one_list_of_tasks_and_their_flags():
    """Every task of run_sample.py comes from the library's one table (tasks.TASK_TABLE: the
    models each runs on, its sampler needs), and a task-specific flag passes the common checks
    exactly for the tasks that read it."""
    from diffusion_jax.applications import tasks
    from diffusion_jax.cli import sample as cli
    assert set(cli.PIXEL_TASKS) == {"sample", *tasks.TASKS}
    assert cli.SD_TASKS == ("sample", "inpaint", "diffusionclip", "img2img")
    assert all(cli.TASK_TABLE[name] is tasks.TASK_TABLE[name] for name in cli.TASKS)
    assert set(cli.TASKS) == set(cli.PIXEL_TASKS) | set(cli.SD_TASKS)
    values = {"mask_region": "top", "sr_method": "bicubic", "sampler": "ddim",
              "sampler_option": "eta=0", "resize_input": "true"}
    for flag in cli.TASK_FLAGS:
        for name in cli.TASKS:
            fv = _flags(f"--task={name}", f"--{flag}={values.get(flag, '1')}")
            try:
                cli._check_common(fv)  # pylint: disable=protected-access
                accepted = True
            except ValueError as err:
                accepted = f"--{flag} is not used by --task={name}" not in str(err)
            assert accepted == cli.reads(name, flag), (name, flag)


def test_out_dir_is_checked_before_any_work_and_nothing_is_created(tmp_path):
    from diffusion_jax.cli import sample as cli
    (tmp_path / "file").write_text("x")
    for out, match in ((tmp_path / "file", "is a file; it must be a directory"),
                       (tmp_path / "file" / "sub", "cannot be created: .*file is a file")):
        with pytest.raises(ValueError, match=match):
            cli.check_out_dir(str(out))
    cli.check_out_dir(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_run_sample_bad_input_exits_1_with_one_line(tmp_path):
    """On a 10-class model: an out-of-range label (sample and invert), a wrong-size input
    without --resize_input, and a flag the task does not use each end with exit status 1 and
    a one-line error naming the problem, and write nothing."""
    workdir = str(tmp_path / "cond")
    _train(workdir, "--config.model.class_conditional=True", "--config.train.num_steps=2")
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(tmp_path / "wide.png")
    out = str(tmp_path / "out")
    for argv, needle in (
            (["--class_label=99"], "--class_label=99 is out of range: this model's classes are "
                                   "[0, 9]"),
            (["--task=invert", "--class_label=99"], "--class_label=99 is out of range"),
            (["--task=sdedit", f"--input={tmp_path}/wide.png"],
             "is 12x16 (WxH) but the model takes 8x8 images"),
            (["--t0=0.3"], "--t0 is not used by --task=sample"),
            (["--steps=0"], "--steps must be >= 1")):
        proc = _run("run_sample.py", f"--workdir={workdir}", f"--out={out}", *argv)
        assert proc.returncode == 1, (argv, proc.stderr[-2000:])
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert not os.path.exists(out)
