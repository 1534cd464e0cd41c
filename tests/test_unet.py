"""Tests for diffusion_jax.models (UNet, layers): counts, conditioning, precision, remat, jit."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.unet import (LAYOUTS, LOGICAL_AXIS_NAMES, UNet, count_params,
                                       layout_kwargs, unet_from_config)

# A small model: two levels (8x8, 4x4), attention with two heads at 4x4.
SMALL = dict(image_size=8, in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attn_resolutions=(4,), num_heads=2, num_groups=4, dropout=0.1)
# One level (8x8) with attention: the cheapest model to compile gradients for.
ONE_LEVEL = {**SMALL, "channel_mult": (1,), "attn_resolutions": (8,)}
B = 2


def _random_params(model, seed):
    """Numpy-random parameters for every Param of ``model`` (kernels ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)); no output is zero-initialised."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.standard_normal(leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name == "embedding":
            value = rng.standard_normal(leaf.shape)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))


def _make(seed=1, **overrides):
    """A SMALL UNet (built abstractly, no random-init compiles) with numpy-random parameters."""
    model = nnx.eval_shape(lambda: UNet(**{**SMALL, **overrides}, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, _random_params(model, seed))
    return nnx.merge(graphdef, state)


# Tests only: XLA's CPU backend optimisations cost more compile time than these tiny
# models ever run; numerics are unaffected beyond float rounding.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _forward(graphdef, state, x, t, cond):
    return nnx.merge(graphdef, state)(x, t, cond)


def _apply(model, x, t, y=None, cond_image=None):
    """Deterministic forward pass, jitted the NNX functional way: ``nnx.split`` / ``nnx.merge``.

    ``y`` / ``cond_image`` go into the condition pytree as ``label`` / ``image`` when given."""
    cond = {k: v for k, v in (("label", y), ("image", cond_image)) if v is not None}
    return _forward(*nnx.split(model), x, t, cond)


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _loss_and_grad_fn(graphdef, state, x, t, target, key):
    def loss_fn(state):
        out = nnx.merge(graphdef, state)(x, t, deterministic=False, dropout_key=key)
        return jnp.mean((out - target) ** 2)
    return jax.value_and_grad(loss_fn)(state)


def _loss_and_grad(model, x, t, target, key):
    """Mean squared error of the dropout-active output and its gradient w.r.t. the state."""
    return _loss_and_grad_fn(*nnx.split(model), x, t, target, key)


def _inputs(seed=0, channels=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, 8, 8, channels)), jnp.float32)
    t = jnp.asarray([3, 700], jnp.int32)
    return x, t


@pytest.fixture(scope="module")
def plain():
    """Unconditional, discrete time, dropout 0.1, one level."""
    return _make(**ONE_LEVEL)


@pytest.fixture(scope="module")
def cond():
    """Class labels (3 + null), a 2-channel image condition, continuous time, 6 outputs,
    average-pool / nearest resampling."""
    return _make(num_classes=3, cond_image_channels=2, time_input="continuous", out_channels=6,
                 resample="pool")


@pytest.mark.parametrize("name,expected", [
    ("ddpm_cifar10", 35_746_307),  # = diffusers UNet2DModel in the google/ddpm-cifar10-32 layout
    ("ddpm_256", 113_673_219),     # = diffusers UNet2DModel in the google/ddpm-church-256 layout
    ("tiny", 1_113_955),
])
def test_layout_param_counts(name, expected):
    model = nnx.eval_shape(lambda: UNet(**layout_kwargs(name), rngs=nnx.Rngs(0)))
    assert count_params(model) == expected


def test_layout_kwargs_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown UNet layout 'ddpm_cifar100'"):
        layout_kwargs("ddpm_cifar100")
    assert layout_kwargs("tiny", dropout=0.0)["dropout"] == 0.0 and LAYOUTS["tiny"]["dropout"] == 0.1


def test_every_param_has_logical_axis_names():
    model = nnx.eval_shape(lambda: UNet(**SMALL, num_classes=2, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    used = set()
    for path, var in flat:
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape), path
        assert set(names) <= set(LOGICAL_AXIS_NAMES) | {None}, path
        used |= set(names) - {None}
    assert used == set(LOGICAL_AXIS_NAMES)
    rules = [("conv_out", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp")]
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["conv_in"]["kernel"].value) == (None, None, "conv_in", "fsdp")
    assert tuple(specs["time_embed"]["dense1"]["kernel"].value) == ("embed", "fsdp")


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 17.0, 999.0, 0.25])
    for flip, shift in [(False, 1.0), (True, 0.0)]:
        got = np.asarray(layers.timestep_embedding(jnp.asarray(t), 7, flip_sin_to_cos=flip,
                                                   freq_shift=shift))
        freqs = np.exp(-math.log(10000.0) * np.arange(3) / (3 - shift))
        sin, cos = np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)
        want = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
        want = np.pad(want, ((0, 0), (0, 1)))
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_unconditional_output_and_time_dependence(plain):
    x, t = _inputs()
    out = _apply(plain, x, t)
    assert out.shape == (B, 8, 8, 3) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 0.1
    other = _apply(plain, x, jnp.asarray([4, 700]))
    assert np.abs(other[0] - out[0]).max() > 1e-4  # t changed for example 0 only
    np.testing.assert_allclose(other[1], out[1], atol=1e-6)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, {"label": jnp.zeros((B,), jnp.int32)})
    with pytest.raises(ValueError, match="integer timesteps"):
        plain(x, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="cond_image_channels=0"):
        plain(x, t, {"image": x})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['text'\]"):
        plain(x, t, {"text": jnp.zeros((B, 4, 8))})
    with pytest.raises(ValueError, match="dropout_key"):
        plain(x, t, deterministic=False)


def test_jit_under_split_merge_equals_eager(plain):
    x, t = _inputs()
    eager = plain(x, t)
    np.testing.assert_allclose(_apply(plain, x, t), eager, atol=1e-5)
    # deterministic=True ignores a dropout key
    np.testing.assert_array_equal(plain(x, t, dropout_key=jax.random.key(0)), eager)


def test_conditioning_modes(cond):
    x, _ = _inputs()
    sigma = jnp.asarray([0.37, 12.5])  # continuous time: float noise levels
    image = jnp.asarray(np.random.default_rng(3).standard_normal((B, 8, 8, 2)), jnp.float32)
    null = jnp.full((B,), 3, jnp.int32)
    out_none = _apply(cond, x, sigma, None, image)
    assert out_none.shape == (B, 8, 8, 6) and out_none.dtype == jnp.float32
    # a missing label is the null label (row num_classes); real labels differ from it
    np.testing.assert_allclose(_apply(cond, x, sigma, null, image), out_none, atol=1e-6)
    out_real = _apply(cond, x, sigma, jnp.asarray([0, 2]), image)
    assert np.abs(out_real - out_none).max(axis=(1, 2, 3)).min() > 1e-4
    # the image condition and the (fractional) noise level reach the output, per example
    flipped = _apply(cond, x, sigma, None, image.at[0].multiply(-1.0))
    assert np.abs(flipped[0] - out_none[0]).max() > 1e-4
    np.testing.assert_allclose(flipped[1], out_none[1], atol=1e-6)
    shifted = _apply(cond, x, sigma.at[0].add(0.25), None, image)
    assert np.abs(shifted[0] - out_none[0]).max() > 1e-4
    np.testing.assert_allclose(shifted[1], out_none[1], atol=1e-6)
    with pytest.raises(ValueError, match=r'cond\["image"\] must have shape'):
        cond(x, sigma)
    with pytest.raises(ValueError, match=r'cond\["label"\] must be int'):
        cond(x, sigma, {"label": jnp.zeros((B + 1,), jnp.int32), "image": image})


def test_null_label_uses_row_num_classes(cond):
    x, _ = _inputs()
    sigma = jnp.asarray([0.37, 12.5])
    image = jnp.zeros((B, 8, 8, 2))
    y0 = jnp.zeros((B,), jnp.int32)
    table = cond.class_embed.embedding
    original = table.value
    before_none, before_0 = _apply(cond, x, sigma, None, image), _apply(cond, x, sigma, y0, image)
    table.value = original.at[3].add(1.0)
    try:
        assert np.abs(_apply(cond, x, sigma, None, image) - before_none).max() > 1e-4
        np.testing.assert_allclose(_apply(cond, x, sigma, y0, image), before_0, atol=1e-6)
    finally:
        table.value = original


def test_bfloat16_compute_close_to_float32(plain):
    """Tolerance: relative L2 error < 3e-2 (bfloat16 has an 8-bit mantissa, ~4e-3 per op)."""
    bf16 = _make(**ONE_LEVEL, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x, t = _inputs()
    ref, got = _apply(plain, x, t), _apply(bf16, x, t)
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert 0.0 < rel < 3e-2, rel  # > 0: the compute really ran in bfloat16


def test_remat_gives_identical_outputs_and_gradients(plain):
    x, t = _inputs()
    target = jnp.zeros_like(x)
    key = jax.random.key(5)
    l0, g0 = _loss_and_grad(plain, x, t, target, key)
    remat = _make(**ONE_LEVEL, remat=True)
    l1, g1 = _loss_and_grad(remat, x, t, target, key)
    # remat=True really wraps blocks in a checkpoint (one per ResBlock and attention block)
    graphdef, state = nnx.split(remat)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, t))(state)
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    assert sum(n in ("checkpoint", "remat2", "remat") for n in names) == 5 + 4, names
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 0
    # dropout is active and driven by the key
    np.testing.assert_array_equal(_loss_and_grad(plain, x, t, target, key)[0], l0)
    assert abs(float(_loss_and_grad(plain, x, t, target, jax.random.key(6))[0]) - float(l0)) > 1e-6


def test_adam_steps_reduce_mse():
    model = _make(**ONE_LEVEL)
    x, t = _inputs()
    target = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)
    opt = optax.adam(3e-3)
    params = nnx.state(model, nnx.Param)
    opt_state = opt.init(params)
    update = jax.jit(opt.update, compiler_options=_FAST_COMPILE)
    losses = []
    for i in range(8):
        loss, grads = _loss_and_grad(model, x, t, target, jax.random.key(i))
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        nnx.update(model, params)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_pool_resampling_has_no_params_and_averages():
    down = layers.Downsample(4, resample="pool", padding=0, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    up = layers.Upsample(4, resample="pool", dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(down, nnx.Param)) + jax.tree.leaves(nnx.state(up, nnx.Param))
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 4)).astype(np.float32)
    want = x.reshape(2, 3, 2, 2, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(down(jnp.asarray(x)), want, atol=1e-6)
    np.testing.assert_array_equal(up(jnp.asarray(want))[:, ::2, 1::2], want)
    count = lambda **kw: count_params(nnx.eval_shape(lambda: UNet(**SMALL, **kw, rngs=nnx.Rngs(0))))
    resample_convs = (9 * 16 * 16 + 16) + (9 * 32 * 32 + 32)  # stride-2 conv at 16, up conv at 32
    assert count(resample="pool") == count() - resample_convs


def test_downsample_padding_conventions():
    """padding=0 is TF "SAME" (pad after only), padding=1 pads both sides, as in diffusers."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 1)), jnp.float32)
    outs = []
    for padding in (0, 1):
        down = layers.Downsample(1, resample="conv", padding=padding, dtype=jnp.float32,
                                 param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        down.conv.kernel.value = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks top-left
        outs.append(np.asarray(down(x))[0, :, :, 0])
    np.testing.assert_array_equal(outs[0], np.asarray(x)[0, ::2, ::2, 0])
    np.testing.assert_array_equal(outs[1][1:, 1:], np.asarray(x)[0, 1:3:2, 1:3:2, 0])
    assert outs[1][0, 0] == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(resample="bilinear"), "resample"),
    (dict(time_input="log_snr"), "time_input"),
    (dict(attn_resolutions=(5,)), "attn_resolutions"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_groups=5), "num_groups"),
    (dict(time_conditioning="film"), "time_conditioning"),
])
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: UNet(**{**SMALL, **kwargs}, rngs=nnx.Rngs(0)))


def test_unet_from_config():
    cfg = ml_collections.ConfigDict(dict(
        base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
        num_heads=2, dropout=0.1, num_groups=4, resample="conv", class_conditional=True,
        cond_drop_prob=0.1, cond_image_channels=0, time_input="discrete", dtype="bfloat16",
        param_dtype="float32", remat=True))
    model = nnx.eval_shape(lambda: unet_from_config(cfg, image_size=8, in_channels=3,
                                                    num_classes=10, rngs=nnx.Rngs(0)))
    assert model.dtype == jnp.bfloat16 and model.remat and model.num_classes == 10
    direct = nnx.eval_shape(lambda: UNet(**SMALL, num_classes=10, rngs=nnx.Rngs(0)))
    assert count_params(model) == count_params(direct)
    with pytest.raises(ValueError, match="num_classes > 0"):
        unet_from_config(cfg, image_size=8, in_channels=3, rngs=nnx.Rngs(0))
    bad = ml_collections.ConfigDict({**cfg.to_dict(), "dtype": "float64"})
    with pytest.raises(ValueError, match="model.dtype='float64'"):
        unet_from_config(bad, image_size=8, in_channels=3, num_classes=10, rngs=nnx.Rngs(0))
    bad = ml_collections.ConfigDict({**cfg.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="widht"):
        unet_from_config(bad, image_size=8, in_channels=3, num_classes=10, rngs=nnx.Rngs(0))
