"""Resuming a workdir: meaning-changing config fields are refused, safe ones reported, broken
checkpoints named together with the newest intact step, and ``resume_step`` gets past them."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from training_fixtures import REPO, micro_config, subprocess_env

from diffusion_jax import checkpoint, objectives, resume, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step micro run (checkpoints 2 and 4) and its final state."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    state = jax.device_get(train.train_and_evaluate(micro_config(), workdir))
    return workdir, state


def _copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    return workdir


@pytest.mark.parametrize("field, value", [
    ("diffusion.pred_type", "v"),
    ("diffusion.num_timesteps", 50),
    ("model.base_channels", 32),  # a different width: shapes no longer match
    ("data.image_size", 16),
    ("optim.ema_decays", (0.9,)),
    ("seed", 1),
])
def test_changed_meaning_is_refused_and_workdir_untouched(trained, tmp_path, field, value):
    workdir = _copy(trained, tmp_path)
    config = micro_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    config.train.num_steps = 6  # a safe change beside it is not what is reported
    with pytest.raises(resume.ResumeError, match=rf"refusing to resume checkpoint 4 .*\({field}: "
                                                 rf"[^;]* -> [^;]*\)"):
        train.train_and_evaluate(config, workdir)
    manager = checkpoint.make_manager(workdir, create=False)
    assert manager.all_steps() == [2, 4]
    assert (checkpoint.load_config(manager).to_dict()
            == objectives.with_arch(micro_config()).to_dict())


def test_fields_added_after_a_run_was_made_do_not_block_its_resume():
    """A run made before optim.ema_warmup / diffusion.kind existed used to be refused
    ('<absent>' -> value); now they are reported like safe changes."""
    stored_dict, new = micro_config().to_dict(), micro_config()
    del stored_dict["optim"]["ema_warmup"], stored_dict["diffusion"]["kind"]
    stored = ml_collections.ConfigDict(stored_dict)
    new.optim.ema_warmup = True
    safe = resume.check_config(stored, new, "DIR", 4)
    assert safe == {"diffusion.kind": ("<absent>", "discrete"),
                    "optim.ema_warmup": ("<absent>", True)}
    # A field the new config lacks (one removed since) is still refused.
    with pytest.raises(resume.ResumeError, match=r"diffusion.kind: 'discrete' -> '<absent>'"):
        resume.check_config(new, stored, "DIR", 4)


def test_every_differing_field_is_listed():
    stored, new = micro_config(), micro_config()
    new.diffusion.pred_type, new.model.num_res_blocks = "x0", 2
    new.optim.learning_rate, new.train.log_every, new.sample.num_steps = 5e-4, 7, 9
    unsafe, safe = resume.config_changes(stored, new)
    assert unsafe == {"diffusion.pred_type": ("eps", "x0"), "model.num_res_blocks": (1, 2)}
    assert safe == {"optim.learning_rate": (1e-3, 5e-4), "train.log_every": (2, 7),
                    "sample.num_steps": (5, 9)}
    with pytest.raises(resume.ResumeError, match=r"diffusion.pred_type: 'eps' -> 'x0'; "
                                                 r"model.num_res_blocks: 1 -> 2"):
        resume.check_config(stored, new, "DIR", 4)


def test_safe_changes_are_allowed_and_printed(trained, tmp_path, capsys):
    workdir = _copy(trained, tmp_path)
    config = micro_config()
    config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 6, 3, 0
    state = train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "Restored step 4" in out
    assert ("Changed config fields: train.checkpoint_every: 2 -> 0, train.log_every: 2 -> 3, "
            "train.num_steps: 4 -> 6") in out
    assert int(state.step) == 6
    # checkpoint_every = 0: only the final checkpoint is written (keep_checkpoints = 2)
    assert checkpoint.make_manager(workdir, create=False).all_steps() == [4, 6]


def _truncate_tensors(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.getsize(f) > 1000]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


@pytest.mark.parametrize("damage", ["truncated_tensors", "missing_state_metadata",
                                    "missing_data_item", "missing_config_item"])
def test_broken_latest_checkpoint_names_steps_and_step_flag_recovers(trained, tmp_path, damage):
    workdir = _copy(trained, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    if damage == "truncated_tensors":
        _truncate_tensors(step_dir)
    elif damage == "missing_state_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    else:
        shutil.rmtree(os.path.join(step_dir, damage.split("_")[1]))
    with pytest.raises(resume.ResumeError, match=r"checkpoint 4 in .* is broken .*newest intact "
                                                 r"checkpoint is step 2: resume from it with "
                                                 r"--step=2"):
        train.train_and_evaluate(micro_config(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    state = jax.device_get(train.train_and_evaluate(micro_config(), workdir, resume_step=2))
    jax.tree.map(np.testing.assert_array_equal, state, trained[1])  # steps 3, 4 again, exactly
    assert os.listdir(os.path.join(workdir, resume.SET_ASIDE_SUBDIR)) == ["4"]
    assert checkpoint.make_manager(workdir, create=False).all_steps() == [2, 4]


def test_no_intact_checkpoint_and_unknown_step(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for step in ("2", "4"):
        os.remove(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"))
    with pytest.raises(resume.ResumeError, match="checkpoint 4 .* no earlier checkpoint is intact; "
                                                 "move .* aside"):
        train.train_and_evaluate(micro_config(), workdir)
    with pytest.raises(resume.ResumeError, match=r"--step=3: no checkpoint 3 .* \[2, 4\]"):
        train.train_and_evaluate(micro_config(), workdir, resume_step=3)


def test_run_train_refusal_is_one_line_with_exit_1(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.model.base_channels=32"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("FATAL ResumeError: refusing to resume checkpoint 4 "), lines[-5:]
    assert "model.base_channels: 16 -> 32" in lines[-1] and "Traceback" not in proc.stderr


def test_a_run_stored_before_later_config_fields_resumes(trained, tmp_path, capsys):
    """Stored configs get values for fields added later (optim.ema_warmup, diffusion.kind,
    model.arch: their old meaning; others: the new config's) instead of a refusal."""
    workdir = _copy(trained, tmp_path)
    meta = os.path.join(workdir, "checkpoints", "4", "config", "metadata")
    stored = json.load(open(meta))
    del stored["optim"]["ema_warmup"], stored["diffusion"]["kind"], stored["model"]["arch"]
    del stored["diffusion"]["sde_beta_min"]
    json.dump(stored, open(meta, "w"))
    config = micro_config()
    config.train.num_steps = 6
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 6
    assert "diffusion.sde_beta_min: '<absent>' -> 0.1" in capsys.readouterr().out
    resumed = checkpoint.load_config(checkpoint.make_manager(workdir, create=False))
    assert resumed.optim.ema_warmup is False and resumed.diffusion.sde_beta_min == 0.1
