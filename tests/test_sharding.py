"""Mesh, rules table and the sharded train step on 8 fake CPU devices (see conftest.py)."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from training_fixtures import micro_config

from diffusion_jax import data, sharding, train
from diffusion_jax.models import unet


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


@pytest.mark.parametrize("data_axis, fsdp, shape", [(-1, 1, (8, 1)), (8, 1, (8, 1)),
                                                    (4, 2, (4, 2)), (-1, 4, (2, 4))])
def test_make_mesh(data_axis, fsdp, shape):
    mesh = sharding.make_mesh(_cfg(data=data_axis, fsdp=fsdp))
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "fsdp")


@pytest.mark.parametrize("data_axis, fsdp, needle", [(3, 2, "must equal the number of devices"),
                                                     (-1, 3, "fsdp=3 does not divide"),
                                                     (0, 1, "data=0")])
def test_bad_mesh_shape_is_a_clear_error(data_axis, fsdp, needle):
    with pytest.raises(ValueError, match=needle):
        sharding.make_mesh(_cfg(data=data_axis, fsdp=fsdp))


def test_rules_cover_every_logical_axis_name():
    assert {name for name, _ in sharding.RULES} == set(unet.LOGICAL_AXIS_NAMES)


@pytest.mark.parametrize("names, shape, expected", [
    ((None, None, "conv_in", "conv_out"), (3, 3, 16, 32), P(None, None, None, "fsdp")),
    ((None, None, "conv_in", "conv_out"), (3, 3, 16, 6), P(None, None, None, None)),  # 6 % 4
    (("embed", "mlp"), (8, 12), P(None, "fsdp")),
    (("heads", "mlp"), (8, 12), P("fsdp", None)),  # a mesh axis is used once per array
    (("norm",), (16,), P(None)),
    (None, (4, 4), P()),
])
def test_logical_to_spec_with_divisibility_fallback(names, shape, expected):
    mesh = sharding.make_mesh(_cfg(data=2, fsdp=4))
    assert sharding.logical_to_spec(names, shape, mesh) == expected


def test_unknown_logical_name_is_an_error():
    mesh = sharding.make_mesh(_cfg(data=-1, fsdp=1))
    with pytest.raises(ValueError, match="'pixels'"):
        sharding.logical_to_spec(("pixels",), (4,), mesh)


def test_shard_batch_places_the_global_batch_over_all_devices():
    mesh = sharding.make_mesh(_cfg(data=4, fsdp=2))
    host = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
            "label": np.arange(16, dtype=np.int32)}
    batch = sharding.shard_batch(host, mesh)
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        sharding.shard_batch({"x": np.zeros((12, 2))}, mesh)


def test_parameters_and_moments_are_sharded_along_fsdp_by_the_rules():
    config = micro_config(4, 2)
    mesh = sharding.make_mesh(config.mesh)
    tx = train.make_optimizer(config)
    _, _, shardings = train.abstract_train_state(config, tx, mesh)
    state = train.create_train_state(config, tx, shardings)
    kernel = state.params["conv_in"]["kernel"]  # [3, 3, 1, C]: conv_out -> fsdp
    assert kernel.value.sharding.spec == P(None, None, None, "fsdp")
    c = kernel.value.shape[-1]
    assert {s.data.shape for s in kernel.value.addressable_shards} == {(3, 3, 1, c // 2)}
    mu = state.opt_state[1][0].mu["conv_in"]["kernel"]  # Adam moment follows its parameter
    assert mu.value.sharding.spec == P(None, None, None, "fsdp")
    norm_specs = [v.value.sharding.spec for path, v in nnx.to_flat_state(state.params)
                  if "norm" in "/".join(map(str, path))]
    assert norm_specs and all(spec == P(None) for spec in norm_specs)
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


def _run_three_steps(config, devices):
    built = train.build(config, devices=devices)
    mesh, state, step_fn = built.mesh, built.init_state(config), built.step_fn
    images, labels = data.load_eval_images(config.data, 48)
    for i in range(3):
        batch = {"image": images[16 * i:16 * (i + 1)], "label": labels[16 * i:16 * (i + 1)]}
        state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_sharded_steps_match_the_single_device_step():
    reference, ref_metrics = _run_three_steps(micro_config(1, 1), jax.devices()[:1])
    for data_axis, fsdp in [(8, 1), (4, 2)]:
        state, metrics = _run_three_steps(micro_config(data_axis, fsdp), jax.devices())
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     state, reference)
