"""The three text-to-image training stages: caption tokenizer, objectives, cross-attention, CFG.

The end-to-end CLI test (three stages on tiny IDX data, then a prompt grid) is marked slow.
"""
import gzip
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from training_fixtures import REPO, subprocess_env

from configs import fashion_autoencoder, fashion_clip, fashion_t2i  # noqa: E402
from diffusion_jax import (caption_tokenizer, captions, clip_tokenizer, conditioning,  # noqa: E402
                           denoisers, objectives, train)
from diffusion_jax.models import autoencoder, cond_unet, text_encoder  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    caption_tokenizer.save_caption_tokenizer(caption_tokenizer.build_caption_tokenizer(),
                                             str(directory))
    return str(directory)


def test_caption_tokenizer_matches_transformers_and_keeps_words_whole(tok_dir):
    transformers = pytest.importorskip("transformers")
    tok = clip_tokenizer.load_tokenizer(tok_dir)
    ref = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    texts = caption_tokenizer.caption_corpus() + ["zebra!", "", "A  Photo of X-ray's 42"]
    expected = ref(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    np.testing.assert_array_equal(tok(texts), np.asarray(expected))
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json")))
    assert "</w>" in vocab and vocab["<|startoftext|>"] == 0 and vocab["<|endoftext|>"] == 1
    assert all(c in vocab and c + "</w>" in vocab for c in
               __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    # every caption word is one token: BOS + one id per word piece + EOS
    for text in texts[:-3]:
        pieces = ref.tokenize(text)
        assert all(p.endswith("</w>") for p in pieces), (text, pieces)
        assert len(pieces) == len(text.replace("-", " - ").split())


def _toy_images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    x = -np.ones((n, size, size, 1), np.float32)
    for i in range(n):
        r, c = rng.integers(2, size - 12, size=2)
        x[i, r:r + 10, c:c + 10] = rng.uniform(0.0, 1.0)
    return jnp.asarray(x)


def test_autoencoder_loss_is_the_stated_formula_and_kl_the_closed_form():
    config = fashion_autoencoder.get_config("tiny")
    model = objectives.build_model(config, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x, key = _toy_images(4), jax.random.key(3)
    loss, aux = objectives.get("autoencoder").make_loss_fn(graphdef, None, config)(
        params, {"image": x}, key)
    post = model.encode(x)
    mean, logvar = np.asarray(post.mean, np.float64), np.asarray(post.logvar, np.float64)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2, summed over latent dims
    s = np.exp(0.5 * logvar)
    np.testing.assert_allclose(kl, np.sum(np.log(1 / s) + (s ** 2 + mean ** 2) / 2 - 0.5,
                                          axis=(1, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(post.kl()), kl, rtol=1e-5)
    err = np.asarray(model.decode(post.sample(key)), np.float64) - np.asarray(x)
    w = config.autoencoder
    expected = np.mean(w.l1_weight * np.abs(err).mean(axis=(1, 2, 3))
                       + w.l2_weight * (err ** 2).mean(axis=(1, 2, 3))
                       + w.kl_weight * kl / (32 * 32))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    np.testing.assert_allclose(float(aux["psnr"]),
                               np.mean(10 * np.log10(4 / (err ** 2).mean(axis=(1, 2, 3)))),
                               rtol=1e-4)


def test_autoencoder_round_trip_improves_through_the_train_step():
    config = fashion_autoencoder.get_config("tiny")
    config.autoencoder.block_out_channels = (16, 16, 16)
    config.optim.learning_rate = 3e-3
    tx = train.make_optimizer(config)
    state = train.init_train_state(config, tx)
    graphdef = nnx.graphdef(objectives.build_model(config, rngs=nnx.Rngs(0)))
    step = jax.jit(train.make_train_step(graphdef, None, tx, config))
    batch = {"image": _toy_images(8, seed=1), "label": jnp.zeros(8, jnp.int32)}
    _, first = step(state, batch)
    for _ in range(60):
        state, metrics = step(state, batch)
    assert set(metrics) >= {"loss", "l1", "l2", "kl", "psnr", "grad_norm"}
    assert "loss_q0" not in metrics  # quartiles belong to diffusion objectives only
    assert float(metrics["psnr"]) > float(first["psnr"]) + 5.0, (first, metrics)


def _tiny_text_model(seed=0):
    return text_encoder.CLIPTextModel(vocab_size=700, hidden_size=16, intermediate_size=32,
                                      num_layers=2, num_heads=2, max_positions=16,
                                      eos_token_id=1, rngs=nnx.Rngs(seed))


def _tiny_unet(seed=0):
    return cond_unet.CondUNet(in_channels=4, out_channels=4, block_out_channels=(16, 16),
                              cross_attn=(True, True), layers_per_block=1, num_heads=(2, 2),
                              cross_attention_dim=16, norm_num_groups=4, rngs=nnx.Rngs(seed))


def _jitted(te, unet):
    """Compiled calls (eager op-by-op dispatch of the UNet is slow on CPU)."""
    encode = nnx.jit(lambda m, ids, mask=None: m(ids, mask))
    denoise = nnx.jit(lambda m, x, t, states: m(x, t, {"text": states}))
    return (lambda ids, attention_mask=None: encode(te, ids, attention_mask),
            lambda x, t, cond: denoise(unet, x, t, cond["text"]))


def test_cross_attention_sees_the_text_and_causal_states_ignore_later_padding(tok_dir):
    tok = clip_tokenizer.load_tokenizer(tok_dir)
    te, unet = _jitted(_tiny_text_model(), _tiny_unet())
    ids = jnp.asarray(tok(["a photo of a sandal", "a photo of a sneaker"]))
    eos = int(np.argmax(np.asarray(ids[0]) == tok.eos_token_id))
    repadded = ids.at[:, eos + 1:].set(tok(["!"])[0, 1])   # pad with "!" (SD 2.x style)
    out, out_pad = te(ids), te(repadded)
    # causal attention: states up to the end-of-text token, and the pooled output, do not
    # depend on the tokens after it; the padding positions' own states do.
    np.testing.assert_allclose(out.last_hidden_state[0, :eos + 1],
                               out_pad.last_hidden_state[0, :eos + 1], atol=1e-6)
    np.testing.assert_allclose(out.pooler_output, out_pad.pooler_output, atol=1e-6)
    with_mask = te(ids, attention_mask=jnp.asarray(tok.attention_mask(["a photo of a sandal"] * 2)))
    np.testing.assert_allclose(out.pooler_output, with_mask.pooler_output, atol=1e-6)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t = jnp.array([10, 500])
    eps = unet(x, t, {"text": out.last_hidden_state})
    flipped = unet(x[::-1], t[::-1], {"text": out.last_hidden_state[::-1]})
    np.testing.assert_allclose(flipped[::-1], eps, atol=1e-5)  # per-example conditioning
    swapped = unet(x, t, {"text": out.last_hidden_state[::-1]})
    assert float(jnp.max(jnp.abs(eps - swapped))) > 1e-3  # the text changes the output
    # SD passes no mask to cross-attention, so the padding states are part of the condition:
    padded = unet(x, t, {"text": out_pad.last_hidden_state})
    assert float(jnp.max(jnp.abs(eps - padded))) > 1e-4


def test_text_cfg_with_the_empty_prompt(tok_dir):
    tok = clip_tokenizer.load_tokenizer(tok_dir)
    te, unet = _jitted(_tiny_text_model(1), _tiny_unet(1))
    text = te(jnp.asarray(tok(["a dark coat", "a bag"]))).last_hidden_state
    null = te(jnp.asarray(tok([""]))).last_hidden_state                    # [1, L, D]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t = jnp.array([100, 900])
    w = 2.5                                                                # s = w + 1
    guided = denoisers.build_denoiser(unet, {"text": text}, guidance_scale=w + 1,
                                      null_text=null)(x, t)
    cond = unet(x, t, {"text": text})
    uncond = unet(x, t, {"text": jnp.broadcast_to(null, text.shape)})
    np.testing.assert_allclose(guided, (1 + w) * cond - w * uncond, atol=2e-5)
    assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3


def test_caption_dropout_is_on_device_like_label_dropout(tok_dir):
    """conditioning.text_condition replaces whole rows by the empty prompt's states, as
    label_condition replaces labels by the null label; host caption batches drop nothing."""
    tok = clip_tokenizer.load_tokenizer(tok_dir)
    te = _tiny_text_model(1)
    states = te(jnp.asarray(tok(["a dark coat", "a bag"] * 32))).last_hidden_state  # [64, L, D]
    null = te(jnp.asarray(tok([""]))).last_hidden_state                              # [1, L, D]
    key = jax.random.key(3)
    text = jax.jit(lambda s, k: conditioning.text_condition(
        s, null_text=null, drop_prob=0.5, key=k)["text"])(states, key)
    dropped = np.all(np.asarray(text) == np.asarray(null), axis=(1, 2))
    kept = np.all(np.asarray(text) == np.asarray(states), axis=(1, 2))
    assert np.all(dropped ^ kept) and 16 < dropped.sum() < 48          # Binomial(64, 0.5)
    labels = conditioning.label_condition(jnp.arange(64) % 10, num_classes=10, drop_prob=0.5,
                                          key=key)["label"]
    np.testing.assert_array_equal(np.asarray(labels) == 10, dropped)   # one dropout rule
    assert conditioning.text_condition(states)["text"] is states       # no dropout: unchanged
    with pytest.raises(ValueError, match=r'cond\["text"\] needs null_text'):
        conditioning.text_condition(states, drop_prob=0.5, key=key)


def test_caption_batches_use_training_templates(tok_dir):
    config = fashion_t2i.get_config("tiny")
    fn = objectives._caption_batch_fn(config, tokenizer_dir=tok_dir)
    tok = clip_tokenizer.load_tokenizer(tok_dir)
    images, labels = np.asarray(_toy_images(64) * 0.0 - 1.0), np.arange(64) % 10
    ids = fn({"image": images, "label": labels}, 5)["input_ids"]
    assert not np.any(np.all(ids == tok([""])[0], axis=1))       # dropout is on device now
    np.testing.assert_array_equal(fn({"image": images, "label": labels}, 5)["input_ids"], ids)
    assert not np.array_equal(fn({"image": images, "label": labels}, 6)["input_ids"], ids)
    _, heldout = captions.split_templates(seed=config.captions.template_seed)
    heldout_ids = {tuple(tok([h.format(captions.object_phrase(k))])[0]) for h in heldout
                   for k in range(10)}
    assert not heldout_ids & {tuple(row) for row in ids}


def test_unknown_objective_and_unresolved_fields_are_named():
    config = fashion_clip.get_config("tiny")
    with pytest.raises(ValueError, match="clip.vocab_size"):
        objectives.build_model(config, rngs=nnx.Rngs(0))
    config.train.objective = "gan"
    with pytest.raises(ValueError, match="train.objective='gan'"):
        objectives.prepare_config(config, "/nonexistent")
    t2i = fashion_t2i.get_config("tiny")
    t2i.latent.autoencoder_workdir = "/nonexistent/ae"
    with pytest.raises(FileNotFoundError, match="/nonexistent/ae"):
        objectives.prepare_config(t2i, "/nonexistent/t2i")


def test_scale_factor_is_one_over_the_latent_std():
    vae = autoencoder.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                                    block_out_channels=(8, 8), layers_per_block=1,
                                    norm_num_groups=4, rngs=nnx.Rngs(0))
    images = np.asarray(_toy_images(24, seed=2))
    key = jax.random.key(5)
    factor, std = objectives.measure_scale_factor(vae, images, key, batch_size=10)
    encode = nnx.jit(lambda m, x, k: m.encode(x).sample(k))
    z = np.concatenate([np.asarray(encode(vae, images[i:i + 10], jax.random.fold_in(key, i)))
                        for i in range(0, 24, 10)])
    np.testing.assert_allclose(std, z.std(), rtol=1e-5)
    np.testing.assert_allclose(factor * std, 1.0, rtol=1e-6)


def _write_idx(path, array):
    raw = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                 *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(raw + array.astype(np.uint8).tobytes())


def _fake_fashion(folder):
    """Ten classes drawn as bars at class-dependent heights (28x28 uint8)."""
    os.makedirs(folder)
    for stem, n in (("train", 48), ("t10k", 16)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k:2 * k + 8, 4:24] = 90 + 16 * k
        _write_idx(os.path.join(folder, f"{stem}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte.gz"), labels)


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_three_stages_through_the_cli_then_a_prompt_grid(tmp_path):
    data_dir, runs = str(tmp_path / "fashion"), tmp_path / "runs"
    _fake_fashion(data_dir)
    common = [f"--config.data.folder={data_dir}"]
    _run("run_train.py", "--config=configs/fashion_autoencoder.py:tiny",
         f"--workdir={runs / 'ae'}", *common)
    _run("run_train.py", "--config=configs/fashion_clip.py:tiny", f"--workdir={runs / 'clip'}",
         *common)
    t2i = [f"--workdir={runs / 't2i'}", "--config=configs/fashion_t2i.py:tiny", *common,
           f"--config.latent.autoencoder_workdir={runs / 'ae'}",
           f"--config.latent.clip_workdir={runs / 'clip'}"]
    _run("run_train.py", *t2i)
    ae_eval = json.load(open(runs / "ae" / "eval.json"))
    assert ae_eval["num_images"] == 16 and 0 < ae_eval["psnr"] < 60
    np.testing.assert_allclose(ae_eval["psnr"], 10 * np.log10(4 / ae_eval["mse"]), atol=3.0)
    clip_eval = json.load(open(runs / "clip" / "eval.json"))
    assert all(0 <= clip_eval[k] <= 1 for k in ("zero_shot_acc", "recall1_i2t_class"))
    assert clip_eval["recall1_i2t_class"] >= clip_eval["recall1_i2t_pair"]  # pair => class
    assert (runs / "clip" / "tokenizer" / "merges.txt").exists()
    scale = json.load(open(runs / "t2i" / "latent_scale.json"))
    np.testing.assert_allclose(scale["scale_factor"] * scale["latent_std"], 1.0, rtol=1e-6)
    _run("scripts/t2i_grid.py", f"--workdir={runs / 't2i'}", f"--out={tmp_path / 'grid'}",
         "--num_seeds=2", "--steps=2")
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "grid" / "t2i_grid.png"))
    assert grid.shape[:2] == (11 * 129 + 1, 2 * 129 + 1) and grid.std() > 0
    _run("run_sample.py", f"--workdir={runs / 't2i'}", f"--out={tmp_path / 'prompt'}",
         "--prompt=an ankle boot", "--guidance_scale=3", "--steps=2", "--num_samples=2")
    images = np.load(tmp_path / "prompt" / "samples.npz")["images"]
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    _run("scripts/t2i_guidance_sweep.py", f"--workdir={runs / 't2i'}",
         f"--out={tmp_path / 'sweep'}", "--scales=1,3", "--per_class=1", "--steps=2",
         "--batch=10", f"--fashion_dir={data_dir}")
    sweep = json.load(open(tmp_path / "sweep" / "t2i_guidance.json"))
    assert list(sweep["scales"]) == ["1.0", "3.0"] and sweep["num_images"] == 10
    for cell in [*sweep["scales"].values(), sweep["real"]]:
        assert 0 <= cell["faithfulness"] <= 1 and 0 <= cell["clip_score"] <= 100
        assert cell["fashion_fd"] >= 0
    assert (tmp_path / "sweep" / "t2i_guidance.png").exists()
    _run("scripts/t2i_quality_vs_nfe.py", f"--workdir={runs / 't2i'}",
         f"--out={tmp_path / 'nfe'}", "--samplers=ddim,edm_heun", "--nfe=2,3", "--per_class=1",
         "--batch=10", f"--fashion_dir={data_dir}")
    nfe = json.load(open(tmp_path / "nfe" / "t2i_quality_vs_nfe.json"))
    assert [(c["steps"], c["nfe"]) for c in nfe["solvers"]["ddim"]] == [(2, 2), (3, 3)]
    assert [(c["steps"], c["nfe"]) for c in nfe["solvers"]["edm_heun"]] == [(1, 1), (2, 3)]
    for cell in nfe["solvers"]["ddim"] + nfe["solvers"]["edm_heun"]:
        assert 0 <= cell["faithfulness"] <= 1 and 0 <= cell["clip_score"] <= 100
        assert cell["fashion_fd"] >= 0
    bad = subprocess.run([sys.executable, "scripts/t2i_quality_vs_nfe.py",
                          f"--workdir={runs / 't2i'}", f"--out={tmp_path / 'nfe'}",
                          "--samplers=rk45", "--per_class=1", "--batch=10",
                          f"--fashion_dir={data_dir}"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=900)
    assert bad.returncode != 0 and "unknown 'rk45'" in bad.stderr
    item = np.zeros((32, 32), np.uint8)
    item[6:26, 8:24] = 200
    Image.fromarray(item).save(tmp_path / "item.png")
    _run("run_sample.py", f"--workdir={runs / 't2i'}", f"--out={tmp_path / 'edit'}",
         "--task=diffusionclip", f"--input={tmp_path / 'item.png'}", "--steps=2",
         "--num_samples=1",
         "--source_text=a photo of a shirt", "--target_text=a photo of a t-shirt",
         f"--clip_workdir={runs / 'clip'}", "--finetune_steps=1", "--clip_decode_steps=1")
    edit = np.load(tmp_path / "edit" / "diffusionclip.npz")
    assert edit["output"].shape == edit["reconstruction"].shape == (1, 32, 32, 1)
    np.testing.assert_allclose(edit["identity_l1"],
                               np.abs(edit["output"] - edit["input"]).mean(axis=(1, 2, 3)),
                               rtol=1e-5)


def test_pool_recall_counts_own_pairs_and_same_class_partners():
    img = np.eye(4)
    txt = img[[1, 0, 2, 3]]          # texts 0 and 1 swapped; both describe class 0
    out = objectives._pool_recall(img, txt, np.array([0, 0, 1, 2]), pool=1000)
    assert out == dict(recall1_i2t_pair=0.5, recall1_t2i_pair=0.5, recall1_i2t_class=1.0,
                       recall1_t2i_class=1.0)
    two_pools = objectives._pool_recall(np.eye(4), np.eye(4)[[1, 0, 3, 2]],
                                        np.array([0, 1, 2, 2]), pool=2)
    assert two_pools["recall1_i2t_pair"] == 0.0 and two_pools["recall1_i2t_class"] == 0.5


def test_configs_stored_before_the_objective_field_still_build_the_unet():
    import ml_collections
    from configs import tiny
    from diffusion_jax import config_utils
    from diffusion_jax.models import unet
    stored = config_utils.config_to_dict(tiny.get_config())
    del stored["train"]["objective"]
    old = ml_collections.ConfigDict(stored)
    assert objectives.objective_of(old) == "diffusion"
    assert isinstance(objectives.build_model(old, rngs=nnx.Rngs(0)), unet.UNet)
