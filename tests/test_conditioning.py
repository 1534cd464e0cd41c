"""The condition table of `diffusion_jax.conditioning`: builders, nulls, and a new kind."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from diffusion_jax import conditioning, denoisers, generate, samplers, schedules, sharding


def test_class_condition_repeats_one_label_or_gives_none():
    cond = conditioning.class_condition(3, 4)
    np.testing.assert_array_equal(cond["label"], [3, 3, 3, 3])
    assert cond["label"].dtype == jnp.int32
    assert conditioning.class_condition(None, 4) is None


def test_null_condition_refuses_an_unknown_null_argument():
    with pytest.raises(ValueError, match=r"Unknown null argument\(s\) \['num_class'\]"):
        conditioning.null_condition({"label": jnp.zeros(2, jnp.int32)}, num_class=10)


def test_make_condition_refuses_dropping_a_kind_without_null():
    with pytest.raises(ValueError, match='cond\\["image"\\] has no null'):
        conditioning.make_condition("image", jnp.zeros((2, 4, 4, 1)), drop_prob=0.5,
                                    key=jax.random.key(0))


class _ScaledIdentity(nnx.Module):
    """The model of the test's new kind: ``eps(x, t, {"strength": s}) = s x`` (per row)."""

    def __call__(self, x, t, cond=None):
        del t
        return cond["strength"][:, None, None, None] * x


def test_a_new_condition_kind_is_one_table_entry(monkeypatch):
    """A kind ``strength`` (float [B], null 0) added to the table alone -- no other library
    file edited -- is built and dropped in training, nulled for guidance and carried by the
    compiled sampling path to the model that reads it."""
    monkeypatch.setitem(conditioning._KINDS, "strength",  # pylint: disable=protected-access
                        (None, lambda value, _: jnp.zeros_like(value)))
    strength = jnp.array([0.5, 2.0])
    dropped = conditioning.make_condition("strength", strength, drop_prob=1.0,
                                          key=jax.random.key(0))
    np.testing.assert_array_equal(dropped["strength"], [0.0, 0.0])
    assert "strength" in conditioning.guided_kinds()

    # Guidance at s = 3 (w = 2): 3 * s x - 2 * 0 = 3 s x.
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    denoise = denoisers.build_denoiser(_ScaledIdentity(), {"strength": strength},
                                       guidance_scale=3.0, pred_type="eps")
    np.testing.assert_allclose(denoise(x, jnp.zeros(2, jnp.int32)),
                               3.0 * strength[:, None, None, None] * x, rtol=1e-6)

    config = tiny.get_config()
    config.data.image_size, config.data.num_channels = 4, 1
    schedule = schedules.schedule_from_config(config.diffusion)
    options = samplers.make_options(num_steps=3)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                              jax.devices()[:1])
    graphdef, params = nnx.split(_ScaledIdentity())
    sample_fn = generate.make_sample_fn(graphdef, schedule, config, mesh, num_samples=2,
                                        sampler="ddim", options=options)
    key = jax.random.key(2)
    images = sample_fn(params, key, {"strength": np.asarray(strength)}, guidance_scale=3.0)
    reference = denoisers.Denoiser(lambda x, t: 3.0 * strength[:, None, None, None] * x,
                                   pred_type=config.diffusion.pred_type, time="discrete")
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (2, 4, 4, 1))
    expected = samplers.run("ddim", reference, schedule, x_T, jax.random.fold_in(key, 1),
                            options)
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)
