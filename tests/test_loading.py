"""loading.load: parameters restored from the abstract model alone (no optimiser, no train
state), bit-identical to what training saved. (That loading imports neither train nor
objectives is checked by tests/test_layering.py.)"""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from training_fixtures import micro_config

from diffusion_jax import checkpoint, loading, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step micro run (one checkpoint, two EMAs) and its full restored state."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = micro_config()
    config.train.num_steps = 2
    train.train_and_evaluate(config, workdir)
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    stored = checkpoint.load_config(manager)
    built = train.build(stored)
    state, _ = checkpoint.restore(manager, built.abstract)
    return workdir, jax.device_get(state)


def _assert_same(params, expected):
    leaves, ref = jax.tree.leaves(params), jax.tree.leaves(expected)
    assert len(leaves) == len(ref)
    for a, b in zip(leaves, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_gives_the_saved_first_ema_bit_identical(trained):
    workdir, state = trained
    loaded = loading.load(workdir=workdir)
    _assert_same(loaded.params, state.ema_params[0])
    assert loaded.config.model.arch == "unet"
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(state.ema_params[0]), jax.tree.leaves(state.params)))


def test_load_builds_no_optimizer(trained, tmp_path):
    """A stored optimiser the code cannot build (here an unknown name) does not matter."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    (meta,) = glob.glob(os.path.join(workdir, "checkpoints", "*", "config", "metadata"))
    stored = json.load(open(meta))
    stored["optim"]["name"] = "lion"
    json.dump(stored, open(meta, "w"))
    with pytest.raises(ValueError, match="optim.name='lion'"):
        train.make_optimizer(checkpoint.load_config(
            checkpoint.make_manager(workdir, create=False, async_checkpointing=False)))
    _assert_same(loading.load(workdir=workdir).params, trained[1].ema_params[0])


class _ToyDenoiser(nnx.Module):
    """A new arch for the test: ``eps(x, t) = a x`` with one learned scalar ``a``."""

    def __init__(self, image_size, channels, *, rngs):
        del rngs
        self.image_size, self.channels = image_size, channels
        self.a = nnx.Param(jnp.ones(()))

    def __call__(self, x, t, cond=None):
        del t, cond
        return self.a.value * x


def _toy_sampled_config(config, kwargs):
    config.data.image_size, config.data.num_channels = kwargs["image_size"], kwargs["channels"]
    config.data.num_classes, config.model.class_conditional = 0, False


def test_a_new_arch_loads_through_checkpoint_by_its_table_row_alone(tmp_path, monkeypatch):
    """A toy arch added as one row of the model factory (monkeypatched; no loader edited): a
    directory converted in the shared format (config.json: format, arch) loads through the
    --checkpoint path (`loading.load`), sets the data shape its record implies, and samples."""
    from configs import tiny
    from diffusion_jax import denoisers, generate, samplers, sharding
    from diffusion_jax.convert import common
    from diffusion_jax.models import build
    monkeypatch.setitem(build.ARCHS, "toy", build.Arch(
        lambda config, rngs: _ToyDenoiser(4, 1, rngs=rngs), "model", None, "diffusion_jax.toy/1",
        from_kwargs=lambda kwargs, rngs: _ToyDenoiser(**kwargs, rngs=rngs),
        sampled_config=_toy_sampled_config))
    model = _ToyDenoiser(4, 1, rngs=nnx.Rngs(0))
    model.a.value = jnp.asarray(0.25)
    common.save_component(tmp_path / "toy", model, {"format": "diffusion_jax.toy/1",
                                                     "kwargs": {"image_size": 4, "channels": 1}})
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["arch"] == "toy"

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
    loaded = loading.load(checkpoint_path=str(tmp_path / "toy"), config=tiny.get_config(),
                          mesh=mesh)
    assert isinstance(loaded.model, _ToyDenoiser) and float(loaded.model.a.value) == 0.25
    assert loaded.config.model.arch == "toy"
    assert (loaded.config.data.image_size, loaded.config.data.num_channels) == (4, 1)

    options = samplers.make_options(num_steps=3)
    images = generate.make_sample_fn(loaded.graphdef, loaded.schedule, loaded.config, mesh,
                                     num_samples=2, sampler="ddim", options=options)(
                                         loaded.params, jax.random.key(0))
    reference = denoisers.Denoiser(lambda x, t: 0.25 * x,
                                   pred_type=loaded.config.diffusion.pred_type)
    x_T = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (2, 4, 4, 1))
    expected = samplers.run("ddim", reference, loaded.schedule, x_T,
                            jax.random.fold_in(jax.random.key(0), 1), options)
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_of_a_pipeline_component_is_a_clear_error(tmp_path):
    """A converted component that is not sampled on its own (here a CLIP text encoder) names
    itself and what --checkpoint takes."""
    from configs import tiny
    from diffusion_jax.convert import common
    from diffusion_jax.models import text_encoder
    encoder = text_encoder.CLIPTextModel(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_layers=1, num_heads=2, max_positions=4,
                                         rngs=nnx.Rngs(0))
    common.save_component(tmp_path / "te", encoder, {"format": "diffusion_jax.clip_text/1",
                                                      "kwargs": {}})
    with pytest.raises(ValueError, match=r"holds a converted 'clip_text' .*--checkpoint samples "
                                         r"a converted \['unet'\]"):
        loading.load(checkpoint_path=str(tmp_path / "te"), config=tiny.get_config())
