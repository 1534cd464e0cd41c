"""Checkpoint manager: round trip of state + data position + config, retention, atomicity,
sharded restore and clear errors."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from training_fixtures import micro_config

from diffusion_jax import checkpoint, sharding, train


def _fresh(config):
    mesh = sharding.make_mesh(config.mesh)
    tx = train.make_optimizer(config)
    _, abstract, shardings = train.abstract_train_state(config, tx, mesh)
    return train.create_train_state(config, tx, shardings), abstract


def test_round_trip_retention_and_config(tmp_path):
    config = micro_config()
    state, abstract = _fresh(config)
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_checkpointing=False)
    for step in (1, 2, 3):
        bumped = state._replace(step=state.step + step)
        assert checkpoint.save(manager, bumped, step=step, data_state={"next_index": 10 * step},
                               config=config)
    assert not checkpoint.save(manager, state, step=3, data_state={}, config=config)
    assert manager.all_steps() == [2, 3]  # max_to_keep
    restored, data_state = checkpoint.restore(manager, abstract)
    assert data_state == {"next_index": 30} and int(restored.step) == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(state.params))
    _, data_state = checkpoint.restore(manager, abstract, step=2)
    assert data_state == {"next_index": 20}
    assert checkpoint.load_config(manager).to_dict() == config.to_dict()


def test_restore_onto_an_fsdp_mesh(tmp_path):
    state, _ = _fresh(micro_config())
    manager = checkpoint.make_manager(str(tmp_path), async_checkpointing=False)
    checkpoint.save(manager, state, step=1, data_state={}, config=micro_config())
    config = micro_config(4, 2)
    _, abstract, _ = train.abstract_train_state(
        config, train.make_optimizer(config), sharding.make_mesh(config.mesh))
    restored, _ = checkpoint.restore(manager, abstract)
    kernel = restored.params["conv_in"]["kernel"].value
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    np.testing.assert_array_equal(kernel, state.params["conv_in"]["kernel"].value)


def test_unfinished_save_is_ignored(tmp_path):
    config = micro_config()
    state, abstract = _fresh(config)
    manager = checkpoint.make_manager(str(tmp_path), async_checkpointing=False)
    checkpoint.save(manager, state, step=1, data_state={"next_index": 1}, config=config)
    # A save interrupted before orbax's final rename leaves only a temporary directory.
    os.makedirs(os.path.join(manager.directory, "2.orbax-checkpoint-tmp-123", "state"))
    manager = checkpoint.make_manager(str(tmp_path), async_checkpointing=False)
    assert manager.all_steps() == [1]
    assert checkpoint.restore(manager, abstract)[1] == {"next_index": 1}


def test_a_workdir_given_as_a_converted_checkpoint_is_named(tmp_path):
    """Used to say only "has no unet.json" (run_sample.py --checkpoint=WORKDIR)."""
    from diffusion_jax import loading
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    for path, match in ((tmp_path / "run", r"/run is a training workdir \(checkpoints/\), not "
                                            r"a converted checkpoint: pass it as --workdir"),
                        (tmp_path / "run" / "checkpoints",
                         r"/run/checkpoints is the checkpoints/ folder of a training workdir: "
                         r"pass .*/run as --workdir")):
        with pytest.raises(FileNotFoundError, match=match):
            loading.load(checkpoint_path=str(path), config=micro_config())


def test_missing_checkpoints_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.make_manager(str(tmp_path / "nope"), create=False)
    manager = checkpoint.make_manager(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        checkpoint.load_config(manager)
    state, abstract = _fresh(micro_config())
    checkpoint.save(manager, state, step=1, data_state={}, config=micro_config())
    manager.wait_until_finished()
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        checkpoint.restore(manager, abstract, step=7)
