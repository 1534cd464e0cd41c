"""loading.load: parameters restored from the abstract model alone (no optimiser, no train
state), bit-identical to what training saved. (That loading imports neither train nor
objectives is checked by tests/test_layering.py.)"""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
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
