"""CLIP loss against numpy, closed forms and finite differences; a tiny CLIP learns to align."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffusion_jax import contrastive
from diffusion_jax.models import layers
from diffusion_jax.models.image_encoder import ImageEncoder
from diffusion_jax.models.unet import count_params


def _np_clip_loss(a, b, s, mask=None, s_max=math.log(100.0)):
    """Hand computation in float64: normalise, scale, two log-softmaxes, average."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = np.exp(min(s, s_max)) * a @ b.T
    n = logits.shape[0]
    mask = np.eye(n, dtype=bool) if mask is None else mask
    total_rows = total_cols = 0.0
    for i in range(n):
        log_p = logits[i] - np.log(np.exp(logits[i]).sum())          # image i over texts
        total_rows -= log_p[mask[i]].mean()
        log_q = logits[:, i] - np.log(np.exp(logits[:, i]).sum())    # text i over images
        total_cols -= log_q[mask[:, i]].mean()
    return 0.5 * (total_rows + total_cols) / n


def _embeddings(b=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)), rng.normal(size=(b, d))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("log_scale", [0.0, 1.7, contrastive.INIT_LOG_SCALE])
def test_clip_loss_matches_hand_computation(jit, log_scale):
    a, b = _embeddings()
    fn = jax.jit(contrastive.clip_loss) if jit else contrastive.clip_loss
    got = fn(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.float32(log_scale))
    np.testing.assert_allclose(float(got), _np_clip_loss(a, b, log_scale), rtol=2e-5)


def test_clip_loss_with_positive_mask_matches_hand_computation():
    a, b = _embeddings(seed=1)
    labels = np.array([0, 1, 0, 2, 1, 0])
    mask = labels[:, None] == labels[None, :]
    got = contrastive.clip_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                jnp.float32(2.0), positive_mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(got), _np_clip_loss(a, b, 2.0, mask), rtol=2e-5)
    plain = _np_clip_loss(a, b, 2.0)
    assert abs(float(got) - plain) > 0.05  # the mask changes the targets


def test_closed_forms():
    # Aligned orthonormal pairs: diagonal logits e^s, off-diagonal 0, so each cross-entropy is
    # log(1 + (B - 1) exp(-e^s)).
    b, s = 5, 1.2
    eye = jnp.eye(b)
    expected = math.log(1.0 + (b - 1) * math.exp(-math.exp(s)))
    np.testing.assert_allclose(float(contrastive.clip_loss(3.0 * eye, eye, s)), expected,
                               rtol=1e-5)
    # Identical embeddings everywhere: every softmax is uniform, loss = log B at any scale.
    same = jnp.ones((b, 4))
    np.testing.assert_allclose(float(contrastive.clip_loss(same, same, 3.0)), math.log(b),
                               rtol=1e-6)


def test_log_scale_gradient_and_cap():
    a, b = _embeddings(seed=2)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    grad = jax.grad(contrastive.clip_loss, argnums=2)(a32, b32, jnp.float32(1.5))
    h = 1e-4
    fd = (_np_clip_loss(a, b, 1.5 + h) - _np_clip_loss(a, b, 1.5 - h)) / (2 * h)
    np.testing.assert_allclose(float(grad), fd, rtol=1e-3)
    # Beyond log 100 the scale is clamped: same loss as at the cap, and no gradient.
    capped = contrastive.clip_loss(a32, b32, jnp.float32(6.0))
    np.testing.assert_allclose(float(capped), _np_clip_loss(a, b, math.log(100.0)), rtol=2e-5)
    assert float(jax.grad(contrastive.clip_loss, argnums=2)(a32, b32, jnp.float32(6.0))) == 0.0


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="both be"):
        contrastive.clip_loss(jnp.ones((3, 4)), jnp.ones((2, 4)), 0.0)
    with pytest.raises(ValueError, match="positive_mask"):
        contrastive.clip_loss(jnp.ones((3, 4)), jnp.ones((3, 4)), 0.0,
                              positive_mask=jnp.ones((2, 2), bool))


def test_retrieval_accuracy_by_hand():
    eye = jnp.eye(4)
    texts = eye[jnp.array([0, 1, 3, 2])]  # pairs 2 and 3 swapped
    assert [float(v) for v in contrastive.retrieval_accuracy(eye, texts)] == [0.5, 0.5]
    # An image that matches every text is retrieved by all of them (column argmax), but
    # retrieves only one (row argmax = first).
    imgs = jnp.concatenate([jnp.ones((1, 4)), eye[1:]], axis=0) + 1e-3 * eye
    assert float(contrastive.retrieval_accuracy(imgs, eye)[0]) == 1.0


def test_image_encoder_shapes_axes_and_size():
    kwargs = dict(embed_dim=24, base_channels=8, channel_mult=(1, 2), num_groups=4)
    abstract = nnx.eval_shape(lambda: ImageEncoder(**kwargs, rngs=nnx.Rngs(0)))
    # conv_in 1->8, conv 8->8, down 8->8, conv 8->16, 2 norms + norm_out, proj 16->24.
    expected = (9 * 1 * 8 + 8) + (9 * 8 * 8 + 8) + 2 * 8 + (9 * 8 * 8 + 8) + \
        (9 * 8 * 16 + 16) + 2 * 16 + 2 * 16 + (16 * 24 + 24)
    assert count_params(abstract) == expected
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape), path
        assert set(names) <= set(layers.LOGICAL_AXIS_NAMES) | {None}, path
    enc = ImageEncoder(**kwargs, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    assert forward(enc, jnp.zeros((3, 32, 32, 1))).shape == (3, 24)
    # Each image is encoded on its own: changing image 0 leaves embedding 1 unchanged.
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    e1, e2 = forward(enc, x), forward(enc, x.at[0].multiply(-1.0))
    assert e1.shape == (2, 24)
    np.testing.assert_allclose(e1[1], e2[1], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(e1[0] - e2[0]).max()) > 1e-3


def _patterns(n):
    """Texture k of ``n``: stripes of period ``2 + 2 (k // 2)`` pixels, horizontal for even k and
    vertical for odd k, on 28x28 images in [-1, 1]; [n, 28, 28, 1]. (A pooled CNN sees
    textures, not positions, so the pairs differ in texture.)"""
    coords = np.arange(28)
    x = np.empty((n, 28, 28, 1), np.float32)
    for k in range(n):
        period = 2 + 2 * (k // 2)
        stripe = np.where(coords % period < period // 2, 1.0, -1.0)
        x[k, ..., 0] = stripe[:, None] if k % 2 == 0 else stripe[None, :]
    return jnp.asarray(x)


class _TinyClip(nnx.Module):
    """An image encoder, a class-id embedding as the text tower, and the learned log-scale."""

    def __init__(self, num_pairs, rngs):
        self.image = ImageEncoder(embed_dim=16, base_channels=8, channel_mult=(1, 2),
                                  num_groups=4, rngs=rngs)
        self.text = nnx.Embed(num_pairs, 16, rngs=rngs)
        self.log_scale = nnx.Param(jnp.float32(contrastive.INIT_LOG_SCALE))


def test_tiny_clip_aligns_separable_pairs():
    n, noise = 8, 0.3
    patterns, ids = _patterns(n), jnp.arange(n)
    model = _TinyClip(n, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    key = jax.random.key(1)

    def loss_fn(m, images):
        return contrastive.clip_loss(m.image(images), m.text(ids), m.log_scale[...])

    @nnx.jit
    def step(m, opt, i):
        # Fresh pixel noise every step, so the encoder learns the textures, not one draw.
        images = patterns + noise * jax.random.normal(jax.random.fold_in(key, i), patterns.shape)
        loss, grads = nnx.value_and_grad(loss_fn)(m, images)
        opt.update(m, grads)
        return loss

    @nnx.jit
    def evaluate(m, images):
        img, txt = m.image(images), m.text(ids)
        scale_grad = jax.grad(contrastive.clip_loss, argnums=2)(img, txt, m.log_scale[...])
        return (loss_fn(m, images), contrastive.retrieval_accuracy(img, txt),
                contrastive.zero_shot_logits(img, txt, m.log_scale[...]), scale_grad)

    fresh = patterns + noise * jax.random.normal(jax.random.key(2), patterns.shape)
    first, before, _, _ = evaluate(model, fresh)
    for i in range(40):
        step(model, optimizer, i)
    last, after, logits, scale_grad = evaluate(model, fresh)
    assert max(float(v) for v in before) < 1.0
    assert [float(v) for v in after] == [1.0, 1.0]  # on held-out noise draws
    assert float(last) < 0.05 * float(first)
    # The temperature is a trained parameter; once pairs align, a sharper softmax lowers the loss.
    assert abs(float(model.log_scale[...]) - contrastive.INIT_LOG_SCALE) > 1e-3
    assert float(scale_grad) < 0.0
    # Zero-shot: held-out noisy images classified by their "class prompt" embeddings.
    np.testing.assert_array_equal(np.asarray(logits.argmax(-1)), np.arange(n))
