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
from diffusion_jax.applications import tasks
from diffusion_jax.models.unet import UNet


@pytest.fixture(scope="module")
def setup():
    clip_model = cf.trained_clip()
    unet = UNet(image_size=cf.SIDE, in_channels=1, base_channels=8, channel_mult=(1, 2),
                num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4,
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_task_layer_reports_scores(setup):
    clip_model, unet, sched, x0, _ = setup
    options = tasks.TaskOptions(
        sampler_options=tasks.samplers.make_options(num_steps=8), t0=0.4,
        clip=(clip_model, cf.tokenize), source_text="a photo of circle",
        target_text="a photo of square", finetune_steps=12, clip_lr=3e-3, clip_decode_steps=4)
    res = tasks.run_task("diffusionclip", unet, sched, np.asarray(x0), options,
                         jax.random.key(0))
    assert set(res) >= {"input", "output", "reconstruction", "directional", "identity_l1",
                        "target_score_input", "target_score_output"}
    assert res["directional"].shape == (2,) and np.all(res["directional"] > 0.5)
    assert np.all(res["target_score_output"] > res["target_score_input"])
    np.testing.assert_allclose(res["identity_l1"],
                               np.abs(res["output"] - res["input"]).mean(axis=(1, 2, 3)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="target_text"):
        tasks.run_task("diffusionclip", unet, sched, np.asarray(x0),
                       tasks.TaskOptions(clip=(clip_model, cf.tokenize), source_text="a"),
                       jax.random.key(0))


@pytest.mark.slow
def test_run_sample_diffusionclip_cli(tmp_path):
    """run_sample.py --task=diffusionclip end to end: a tiny trained workdir, a random
    transformers CLIP saved to disk (ViT tower + tiny BPE tokenizer) as --clip_workdir."""
    import os
    import subprocess
    import sys

    import torch
    import transformers
    from PIL import Image
    from sd_fixtures import write_vocab
    from training_fixtures import REPO, subprocess_env

    def run(script, *args):
        return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                              env=subprocess_env(), capture_output=True, text=True, timeout=600)

    workdir = str(tmp_path / "w")
    proc = run("run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=526, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=524, eos_token_id=525, pad_token_id=525),
        vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    clip_dir = tmp_path / "clip"
    transformers.CLIPModel(config).save_pretrained(clip_dir)
    write_vocab(clip_dir / "tokenizer", {"model_max_length": 16})
    image = str(tmp_path / "bar.png")
    bar = np.zeros((8, 8), np.uint8)
    bar[:, 2:6] = 255
    Image.fromarray(bar).save(image)
    out = str(tmp_path / "out")
    args = [f"--workdir={workdir}", "--task=diffusionclip", f"--input={image}", "--steps=3",
            "--num_samples=1", "--source_text=hello", "--target_text=cat", "--t0=0.3",
            "--finetune_steps=2", "--clip_decode_steps=2", "--clip_lr=1e-3", f"--out={out}"]
    proc = run("run_sample.py", *args, f"--clip_workdir={clip_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diffusionclip directional=" in proc.stdout
    res = np.load(os.path.join(out, "diffusionclip.npz"))
    assert res["output"].shape == res["reconstruction"].shape == (1, 8, 8, 1)
    assert np.isfinite(res["output"]).all() and res["directional"].shape == (1,)
    proc = run("run_sample.py", *args, f"--clip_workdir={tmp_path / 'missing'}")
    assert proc.returncode == 1 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_latent_model_with_decode_fn(setup):
    """A latent denoiser: x0 are 8x8 "latents", decode_fn a fixed 2x nearest upsampling into
    CLIP's 16x16 image space; the identity and CLIP terms are measured on decoded images."""
    clip_model, _, sched, x0, text = setup
    latent_unet = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                       num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4,
                       rngs=nnx.Rngs(1))
    z0 = x0[:, ::2, ::2]
    decode = lambda z: jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)
    out = dc.diffusionclip_edit(latent_unet, sched, z0, clip_model.encode_image,
                                dc.text_direction(text[0], text[1]), t0=0.4,
                                num_inversion_steps=8, num_decode_steps=4, finetune_steps=12,
                                learning_rate=3e-3, decode_fn=decode)
    assert out["output"].shape == x0.shape and out["latent"].shape == z0.shape
    emb0 = clip_model.encode_image(decode(z0))
    final = dc.directional_similarity(clip_model.encode_image, out["output"], emb0,
                                      dc.text_direction(text[0], text[1]))
    assert float(final.min()) > 0.5
    assert float(jnp.mean(jnp.abs(out["output"] - decode(z0)))) < 0.5


def test_edit_scores_match_a_numpy_hand_computation(setup):
    clip_model, _, _, x0, text = setup
    edited = np.asarray(x0)[::-1] * 0.5                      # any other pair of images
    res = dc.edit_scores(clip_model, cf.tokenize, x0, edited, "a photo of circle",
                         "a photo of square")
    e0, e1 = np.asarray(clip_model.encode_image(x0)), np.asarray(clip_model.encode_image(edited))
    t = np.asarray(text, np.float64)
    d_img = (e1 - e0) / np.linalg.norm(e1 - e0, axis=1, keepdims=True)
    d_txt = (t[1] - t[0]) / np.linalg.norm(t[1] - t[0])
    np.testing.assert_allclose(res["directional"], d_img @ d_txt, atol=1e-5)
    np.testing.assert_allclose(res["identity_l1"], np.abs(edited - np.asarray(x0)).mean((1, 2, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(res["target_score_input"], 100 * np.maximum(e0 @ t[1], 0),
                               atol=1e-3)
    np.testing.assert_allclose(res["target_score_output"], 100 * np.maximum(e1 @ t[1], 0),
                               atol=1e-3)


@pytest.mark.slow
def test_latent_pipeline_edit_moves_toward_the_target(setup):
    """pipelines.diffusionclip on a tiny latent pipeline (random autoencoder with f = 2, a
    cross-attention UNet on the tiny CLIP's text states): the loss falls, the directional
    similarity of the decoded edit toward the target is positive."""
    from diffusion_jax import pipelines, samplers
    from diffusion_jax.models import autoencoder, cond_unet

    clip_model, _, sched, x0, _ = setup
    vae = autoencoder.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2,
                                    block_out_channels=(8, 8), layers_per_block=1,
                                    norm_num_groups=4, scaling_factor=1.0, rngs=nnx.Rngs(2))
    unet = cond_unet.CondUNet(in_channels=2, out_channels=2, block_out_channels=(16, 16),
                              cross_attn=(True, True), layers_per_block=1, num_heads=(2, 2),
                              cross_attention_dim=32, norm_num_groups=4, rngs=nnx.Rngs(3))
    pipe = pipelines.Pipeline(unet, vae, clip_model.text_model, cf.tokenize, sched,
                              samplers.make_options(), None, cf.SIDE)
    out = pipelines.diffusionclip(pipe, x0, (clip_model, cf.tokenize), "a photo of circle",
                                  "a photo of square", t0=0.4, num_inversion_steps=4,
                                  num_decode_steps=2, finetune_steps=8, learning_rate=3e-3,
                                  id_weight=0.3)
    assert out["output"].shape == x0.shape and out["latent"].shape == (2, 8, 8, 2)
    assert float(out["loss"][-1]) < float(out["loss"][0])
    scores = dc.edit_scores(clip_model, cf.tokenize, out["reconstruction"], out["output"],
                            "a photo of circle", "a photo of square")
    assert float(scores["directional"].min()) > 0.3, scores["directional"]


class _OracleModule(nnx.Module):
    """The exact continuous-time / EDM network of continuous_oracle with one trainable gain."""

    num_classes = 0

    def __init__(self, oracle):
        self.gain = nnx.Param(jnp.ones(()))
        self.oracle = oracle

    def __call__(self, x, time, cond=None):
        return self.gain * self.oracle(x, time, cond)


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_continuous_time_and_edm_models_are_edited_through_their_denoiser(kind):
    """diffusionclip_edit on a continuous-time / EDM model: the denoiser of ``make_denoiser``
    carries the parameterisation, so the reconstruction is the DDIM round trip of that
    denoiser (computed independently here) and, the network being exact, close to the input;
    a zero learning rate leaves the output equal to it."""
    import continuous_oracle as co
    from diffusion_jax import denoisers
    from diffusion_jax.applications import inversion
    cfg = co.diffusion_config(kind)
    sched = schedules.make_schedule(schedules.linear_beta_schedule(50, 1e-4, 0.3))
    model = _OracleModule(co.ContinuousOracle(cfg))
    make = lambda m: denoisers.build_denoiser(m, diffusion=cfg, schedule=sched)
    x0 = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    proj = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    embed = lambda images: images.reshape(images.shape[0], -1) @ proj
    out = dc.diffusionclip_edit(model, sched, x0, embed, dc.text_direction(proj[0], proj[1]),
                                make_denoiser=make, t0=0.6, num_inversion_steps=30,
                                num_decode_steps=30, finetune_steps=1, learning_rate=0.0)
    denoise = make(model)
    t_start = int(round(0.6 * 50)) - 1
    latent = inversion.ddim_invert(denoise, sched, x0, num_steps=30, t_start=t_start)
    want = inversion.ddim_decode(denoise, sched, latent, num_steps=30, t_start=t_start)
    np.testing.assert_allclose(out["latent"], latent, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["reconstruction"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["reconstruction"], x0, rtol=0.1, atol=0.02)
    np.testing.assert_array_equal(out["output"], out["reconstruction"])
