"""Configs: every file overrides default.py's schema only; overrides and errors via config_flags."""

import os
import sys

import jax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from training_fixtures import REPO

from configs import fashion_autoencoder, fashion_clip, fashion_t2i  # noqa: E402
from configs import (celeba64, cifar10, cifar10_ve_sde, cifar10_vp_sde, classifier_digits, ddpm256,
                     default, digits, digits_dit, digits_edm, digits_vp, sr_digits, tiny)
from diffusion_jax import config_utils, objectives, resume, train

ALL = {"default": default, "cifar10": cifar10, "celeba64": celeba64, "ddpm256": ddpm256,
       "digits": digits, "digits_dit": digits_dit, "tiny": tiny, "sr_digits": sr_digits,
       "classifier_digits": classifier_digits, "digits_vp": digits_vp, "digits_edm": digits_edm,
       "cifar10_vp_sde": cifar10_vp_sde, "cifar10_ve_sde": cifar10_ve_sde}


def _flat_keys(d, prefix=""):
    keys = set()
    for k, v in d.items():
        keys |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return keys


@pytest.mark.parametrize("name", sorted(ALL))
def test_configs_override_the_default_schema_only(name):
    config = ALL[name].get_config()
    assert _flat_keys(config.to_dict()) == _flat_keys(default.get_config().to_dict())
    with pytest.raises(AttributeError):
        config.train.batch_sise = 3  # locked: a misspelt key is an error


def test_default_fields_are_all_commented():
    lines = open(os.path.join(REPO, "configs", "default.py")).read().splitlines()
    assignments = [l for l in lines if l.strip().startswith(("config.", "data.", "model.",
                   "diffusion.", "optim.", "train.", "sample.", "sr.", "classifier.", "mesh.",
                   "distributed.", "captions.", "ae.", "clip.", "latent.", "final_eval."))
                   and " = " in l and "ConfigDict()" not in l]
    assert len(assignments) == len(_flat_keys(default.get_config().to_dict()))
    assert all("  # " in l for l in assignments), [l for l in assignments if "  # " not in l]


def test_cifar10_is_the_ddpm_recipe():
    c = cifar10.get_config()
    assert (c.train.batch_size, c.optim.learning_rate, c.optim.warmup_steps) == (128, 2e-4, 5000)
    assert (c.optim.ema_decays, c.train.num_steps, c.optim.grad_clip) == ((0.9999,), 800_000, 1.0)
    assert (c.model.base_channels, c.model.channel_mult, c.model.attn_resolutions) == (
        128, (1, 2, 2, 2), (16,))
    assert c.data.random_flip and c.model.dropout == 0.1


@pytest.mark.parametrize("name, max_params", [("tiny", 1_000_000), ("digits", 3_000_000),
                                              ("digits_dit", 3_000_000),
                                              ("cifar10", 35_746_307)])
def test_models_build_with_expected_size(name, max_params):
    config = ALL[name].get_config()
    model = nnx.eval_shape(lambda: objectives.build_model(config, rngs=nnx.Rngs(0)))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n <= max_params
    if name == "cifar10":  # the diffusers google/ddpm-cifar10-32 count
        assert n == 35_746_307


def _parse(*args):
    """Parses like run_train.py (config_flags reads the overrides from sys.argv)."""
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    old_argv, sys.argv = sys.argv, argv
    try:
        fv(argv)
    finally:
        sys.argv = old_argv
    return fv.config


def test_command_line_overrides():
    config = _parse("--config.train.batch_size=64", "--config.model.channel_mult=(1,2,4)",
                    "--config.data.data_dir=/data")
    assert config.train.batch_size == 64
    assert config.model.channel_mult == (1, 2, 4)
    assert config.data.data_dir == "/data"


@pytest.mark.parametrize("arg, needle", [("--config.train.batch_sise=3", "batch_sise"),
                                         ("--config.train.batch_size=abc", "batch_size")])
def test_bad_override_names_the_key(arg, needle):
    with pytest.raises((flags.Error, AttributeError), match=needle):
        _parse(arg)


@pytest.mark.parametrize("name", sorted(ALL))
def test_config_json_round_trip(name):
    config = objectives.with_arch(ALL[name].get_config())  # as training stores it
    restored = config_utils.config_from_dict(config_utils.config_to_dict(config))
    assert restored.to_dict() == config.to_dict()
    assert restored.is_locked


@pytest.mark.parametrize("module, arch", [(tiny, "unet"), (fashion_t2i, "cond_unet"),
                                          (fashion_autoencoder, "autoencoder_kl"),
                                          (fashion_clip, "clip")])
def test_each_objective_gets_its_arch_and_a_mismatch_names_both(module, arch):
    config = module.get_config("tiny") if module is not tiny else module.get_config()
    assert config.model.arch == ""
    assert objectives.with_arch(config).model.arch == arch
    config.model.arch = "clip" if arch != "clip" else "unet"
    objective = config.train.objective
    with pytest.raises(ValueError, match=rf"model.arch='{config.model.arch}' is not trained by "
                                         rf"train.objective='{objective}', which trains '{arch}'"):
        objectives.with_arch(config)
    config.model.arch = "mmdit"
    with pytest.raises(ValueError, match=r"model.arch='mmdit' must be one of \('unet'"):
        objectives.with_arch(config)


def test_a_latent_config_stored_the_old_way_is_migrated_to_the_model_section():
    """Before model.arch, the latent UNet's settings lived in config.latent (and its
    config.model held the unused pixel UNet's defaults)."""
    new = fashion_t2i.get_config("tiny")
    stored = config_utils.config_to_dict(new)
    model, latent = stored["model"], stored["latent"]
    latent.update(block_out_channels=model.pop("block_out_channels"),
                  cross_attn=model.pop("cross_attn"), num_heads=model.pop("heads_per_level"),
                  layers_per_block=model["num_res_blocks"], norm_num_groups=model["num_groups"])
    model.update(num_res_blocks=2, num_groups=32)
    del model["arch"]
    migrated = config_utils.config_from_dict(stored)
    assert migrated.model.arch == "cond_unet"
    assert (migrated.model.block_out_channels, migrated.model.heads_per_level,
            migrated.model.num_res_blocks, migrated.model.num_groups) == ((16, 16), (2, 2), 1, 4)
    assert "block_out_channels" not in migrated.latent and "num_heads" not in migrated.latent
    unsafe, _ = resume.config_changes(migrated, objectives.with_arch(new))
    assert unsafe == {}


def test_a_pixel_config_stored_before_later_fields_gets_their_old_meaning():
    stored = config_utils.config_to_dict(tiny.get_config())
    del stored["train"]["objective"], stored["diffusion"]["kind"], stored["model"]["arch"]
    del stored["optim"]["ema_warmup"], stored["model"]["time_input"]
    for field in ("block_out_channels", "cross_attn", "heads_per_level"):
        del stored["model"][field]
    stored["latent"].update(block_out_channels=[64, 128], num_heads=[4, 4])
    migrated = config_utils.config_from_dict(stored)
    assert (migrated.train.objective, migrated.diffusion.kind, migrated.model.arch,
            migrated.optim.ema_warmup, migrated.model.time_input) == (
                "diffusion", "discrete", "unet", False, "discrete")
    assert "block_out_channels" not in migrated.latent
    new = objectives.with_arch(tiny.get_config())
    unsafe, safe = resume.config_changes(migrated, new)
    assert unsafe == {}
    assert set(safe) == {"model.block_out_channels", "model.cross_attn", "model.heads_per_level"}
    new.diffusion.kind = "edm"  # a field filled with its old meaning still guards the weights
    assert set(resume.config_changes(migrated, new)[0]) == {"diffusion.kind"}
