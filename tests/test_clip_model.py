"""CLIPModel: unit embeddings, logits against numpy, gradients, axis names, clip_loss training."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffusion_jax import contrastive, sharding
from diffusion_jax.models import clip

TINY = dict(text=dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, max_positions=8, eos_token_id=39),
            image=dict(in_channels=1, embed_dim=24, base_channels=8, channel_mult=(1, 2),
                       num_groups=4),
            projection_dim=16)


def _batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 38, size=(b, 8))
    ids[:, -1] = 39                                          # end-of-text at the last position
    images = rng.uniform(-1, 1, size=(b, 12, 12, 1)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(images)


def test_embeddings_unit_norm_and_logits_match_numpy():
    model = clip.clip_from_kwargs(TINY)
    ids, images = _batch()
    out = nnx.jit(lambda m, i, x: m(i, x))(model, ids, images[:4])
    np.testing.assert_allclose(np.linalg.norm(out.text_embeds, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.image_embeds, axis=1), 1.0, atol=1e-5)
    assert float(out.logit_scale) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    # independent numpy path from the towers' raw outputs and the projection kernels
    pooled = np.asarray(nnx.jit(lambda m, i: m.text_model(i).pooler_output)(model, ids),
                        np.float64)
    img = np.asarray(nnx.jit(lambda m, x: m.image_encoder(x))(model, images[:4]), np.float64)
    t = pooled @ np.asarray(model.text_projection.kernel.value, np.float64)
    v = img @ np.asarray(model.visual_projection.kernel.value, np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(out.logits_per_image, (1 / 0.07) * v @ t.T, rtol=1e-4, atol=1e-4)
    assert out.logits_per_image.shape == (4, 6)
    np.testing.assert_allclose(out.text_embeds, t, atol=1e-5)
    np.testing.assert_allclose(out.image_embeds, v, atol=1e-5)


def test_pooling_uses_end_of_text_token():
    model = clip.clip_from_kwargs(TINY)
    ids, _ = _batch(2)
    # tokens after the end-of-text cannot change the embedding (causal attention)
    ids2 = ids.at[:, -1].set(5).at[:, 3].set(39)
    ids3 = ids2.at[:, 5:].set(7)
    enc = nnx.jit(lambda m, i: m.encode_text(i))
    np.testing.assert_allclose(enc(model, ids2), enc(model, ids3), atol=1e-6)
    assert float(jnp.abs(enc(model, ids) - enc(model, ids2)).max()) > 1e-3


def test_gradients_flow_to_every_parameter_through_clip_loss():
    model = clip.clip_from_kwargs(TINY)
    ids, images = _batch()

    def loss_fn(m):
        out = m(ids, images)
        return contrastive.clip_loss(out.image_embeds, out.text_embeds, m.logit_scale.value)

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert leaves
    for path, g in leaves:
        assert np.all(np.isfinite(g)), path
    no_grad = [jax.tree_util.keystr(p) for p, g in leaves if float(jnp.abs(g).max()) == 0.0]
    assert no_grad == []


VIT = dict(TINY, image=None, vision=dict(image_size=16, patch_size=4, hidden_size=24,
                                          intermediate_size=32, num_layers=1, num_heads=4))


@pytest.mark.parametrize("kwargs", [TINY, VIT], ids=["cnn", "vit"])
def test_parameters_carry_logical_axis_names_covered_by_rules(kwargs):
    model = clip.clip_from_kwargs({k: v for k, v in kwargs.items() if v is not None})
    rules = dict(sharding.RULES)
    params = nnx.state(model, nnx.Param)
    named = 0
    for path, var in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding")
        if var.value.ndim == 0:
            continue
        assert names is not None, jax.tree_util.keystr(path)
        assert len(names) == var.value.ndim
        assert all(n is None or n in rules for n in names)
        named += 1
    assert named > 20


def test_training_with_clip_loss_aligns_pairs():
    # 4 separable pairs: a fixed random pattern per image, a distinct token per text
    model = clip.clip_from_kwargs(TINY, seed=1)
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 12, 12, 1)), jnp.float32)
    ids = jnp.tile(jnp.array([[1, 2, 3, 4, 5, 6, 0, 39]]), (4, 1)).at[:, 6].set(
        jnp.arange(10, 14))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, o):
        def loss_fn(m):
            out = m(ids, images)
            return contrastive.clip_loss(out.image_embeds, out.text_embeds, m.logit_scale.value)
        loss, g = nnx.value_and_grad(loss_fn)(m)
        o.update(m, g)
        return loss

    first = float(step(model, opt))
    for _ in range(60):
        last = float(step(model, opt))
    assert last < 0.25 * first
    out = model(ids, images)
    assert np.array_equal(np.argmax(out.logits_per_image, axis=1), np.arange(4))


def test_bad_kwargs_raise():
    with pytest.raises(ValueError, match="'image'"):
        clip.clip_from_kwargs({"text": TINY["text"]})
    with pytest.raises(ValueError, match="unknown fields"):
        clip.clip_from_kwargs({**TINY, "bogus": 1})
    with pytest.raises(ValueError, match="exactly one"):
        clip.clip_from_kwargs({**TINY, "vision": VIT["vision"]})
