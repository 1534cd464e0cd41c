"""DiffusionCLIP with a tiny UNet and the tiny CLIP of clip_fixtures: the directional CLIP
similarity toward the target rises while the identity error stays bounded; gradients finite."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clip_fixtures as cf
from diffusion_jax import schedules
from diffusion_jax.applications import diffusionclip as dc
from diffusion_jax.models.unet import UNet


@pytest.fixture(scope="module")
def setup():
    clip_model = cf.trained_clip()
    unet = UNet(image_size=cf.SIDE, in_channels=1, base_channels=16, channel_mult=(1, 2),
                num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=8,
                rngs=nnx.Rngs(0))
    sched = schedules.make_schedule(schedules.linear_beta_schedule(100, 1e-4, 0.05))
    x0 = jnp.asarray(cf.images_for([0, 0], seed=7))                      # two "circle" images
    ids = jnp.asarray(cf.tokenize(["a photo of circle", "a photo of square"]))
    text = clip_model.encode_text(ids)
    return clip_model, unet, sched, x0, text


def _edit(setup, **kw):
    clip_model, unet, sched, x0, text = setup
    return dc.diffusionclip_edit(unet, sched, x0, clip_model.encode_image,
                                 dc.text_direction(text[0], text[1]), t0=0.4,
                                 num_inversion_steps=8, num_decode_steps=4, **kw)


def test_directional_similarity_rises_identity_bounded(setup):
    clip_model, unet, sched, x0, text = setup
    before = jax.tree.map(np.array, nnx.state(unet, nnx.Param))
    out = _edit(setup, finetune_steps=12, learning_rate=3e-3, id_weight=0.3)
    # the module itself is untouched
    after = nnx.state(unet, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    assert np.all(np.isfinite(np.asarray(out["loss"])))
    emb0 = clip_model.encode_image(x0)
    direction = dc.text_direction(text[0], text[1])
    final = dc.directional_similarity(clip_model.encode_image, out["output"], emb0, direction)
    recon = dc.directional_similarity(clip_model.encode_image, out["reconstruction"], emb0,
                                      direction)
    assert float(final.min()) > 0.5 and float(final.min()) > float(recon.max()) + 0.3, \
        (final, recon)
    assert float(out["loss"][-1]) < float(out["loss"][0])
    # the image moves toward the target caption and away from the source one
    cos = np.asarray(clip_model.encode_image(out["output"]) @ text.T)
    cos0 = np.asarray(emb0 @ text.T)
    assert np.all(cos[:, 1] > cos0[:, 1]) and np.all(cos[:, 0] < cos0[:, 0])
    identity = float(jnp.mean(jnp.abs(out["output"] - x0)))
    recon_err = float(jnp.mean(jnp.abs(out["reconstruction"] - x0)))
    assert identity < 0.5 and recon_err < 0.05, (identity, recon_err)


def test_identity_weight_keeps_image_closer(setup):
    _, _, _, x0, _ = setup
    loose = _edit(setup, finetune_steps=6, learning_rate=3e-3, id_weight=0.0)
    tight = _edit(setup, finetune_steps=6, learning_rate=3e-3, id_weight=5.0)
    err = lambda o: float(jnp.mean(jnp.abs(o["output"] - x0)))
    assert err(tight) < err(loose)


def test_loss_gradient_finite_and_nonzero(setup):
    clip_model, _, _, x0, text = setup
    emb0 = clip_model.encode_image(x0)
    direction = dc.text_direction(text[0], text[1])
    g = jax.grad(lambda x: jnp.sum(dc.directional_similarity(
        clip_model.encode_image, x, emb0, direction)))(x0 + 0.1)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_bad_arguments(setup):
    with pytest.raises(ValueError, match="t0"):
        dc.diffusionclip_edit(setup[1], setup[2], setup[3], setup[0].encode_image,
                              jnp.ones(16), t0=1.5)
    with pytest.raises(ValueError, match="finetune_steps"):
        dc.diffusionclip_edit(setup[1], setup[2], setup[3], setup[0].encode_image,
                              jnp.ones(16), finetune_steps=0)
