"""Stable Diffusion components against their PyTorch references (random weights, small configs).

Each torch model is perturbed off its initialisation (so e.g. a swapped norm scale/bias shows),
saved with ``save_pretrained``, converted by ``diffusion_jax.convert`` and compared in float32:
max |ours - theirs| <= 1e-4.
"""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sd_fixtures import (CLIP_SMALL, TOL, UNET_CONV, UNET_LINEAR, VAE_SMALL, nchw,
                         numpy_init, perturb, run, write_vocab)

from diffusion_jax import sharding
from diffusion_jax.convert import common, text_encoder, unet_cond, vae
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.clip_tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

# Published configs (the fields that differ from diffusers' defaults).
SD15_UNET_CONFIG = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4,
    sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21_UNET_CONFIG = dict(
    SD15_UNET_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
    resnet_time_scale_shift="default", sample_size=96, upcast_attention=True,
    use_linear_projection=True)
SD_VAE_CONFIG = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L14_CONFIG = dict(
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0,
    eos_token_id=2, hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0,
    initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05,
    max_position_embeddings=77, model_type="clip_text_model", num_attention_heads=12,
    num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype="float32",
    vocab_size=49408)


@pytest.mark.parametrize("config", [UNET_LINEAR, UNET_CONV], ids=["linear_proj", "conv_proj"])
def test_cond_unet_matches_diffusers(config, tmp_path):
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**config), 1)
    ref.save_pretrained(tmp_path)
    ours, record = unet_cond.load_diffusers(tmp_path)
    assert record["sample_size"] == 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, config["in_channels"], 16, 16)).astype(np.float32)
    t = np.array([3, 871])
    text = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
    got = run(lambda m, x, t, c: m(x, t, {"text": c}), ours, x.transpose(0, 2, 3, 1),
               jnp.asarray(t), jnp.asarray(text))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(nchw(got), want, atol=TOL, rtol=0)


def test_cond_unet_needs_text_of_the_right_width():
    # The checks run before any parameter is read, so an abstract model suffices.
    model = nnx.eval_shape(lambda: unet_cond.build(unet_cond.config_to_kwargs(UNET_LINEAR)))
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="cond\\['text'\\]"):
        model(x, jnp.zeros((1,), jnp.int32), {"label": jnp.zeros((1,), jnp.int32)})
    with pytest.raises(ValueError, match="cond\\['text'\\]"):
        model(x, jnp.zeros((1,), jnp.int32), {"text": jnp.zeros((1, 5, 16))})


def test_autoencoder_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderKL(**VAE_SMALL), 2)
    ref.save_pretrained(tmp_path)
    ours, record = vae.load_diffusers(tmp_path)
    assert ours.scaling_factor == 0.3
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        decoded = ref.decode(post.mean).sample.numpy()
        kl = post.kl().numpy()
    mean, logvar, kl_ours, dec = run(
        lambda m, x: (lambda p: (p.mean, p.logvar, p.kl(), m.decode(p.mode())))(m.encode(x)),
        ours, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nchw(mean), post.mean.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(nchw(logvar), post.logvar.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(kl_ours), kl, rtol=1e-5)
    assert np.abs(decoded).max() > 0.1
    np.testing.assert_allclose(nchw(dec), decoded, atol=TOL, rtol=0)


def test_posterior_logvar_is_clipped_and_sampled_with_the_key():
    model = numpy_init(lambda: AutoencoderKL(block_out_channels=(8,), layers_per_block=1,
                                              norm_num_groups=4, rngs=nnx.Rngs(0)))
    bias = model.quant_conv.bias
    bias[...] = bias[...].at[4:].set(1e4)  # log-variance channels far above the clip
    post = run(lambda m, x: m.encode(x), model, jnp.zeros((1, 8, 8, 3)))
    np.testing.assert_array_equal(np.asarray(post.logvar), 20.0)
    key = jax.random.key(3)
    z = jax.jit(post.sample)(key)
    eps = (z - post.mean) / jnp.exp(10.0)
    np.testing.assert_allclose(eps, jax.random.normal(key, post.mean.shape), rtol=1e-5, atol=1e-5)
    assert not np.allclose(z, post.sample(jax.random.key(4)))


@pytest.mark.parametrize("act, eos", [("quick_gelu", 2), ("gelu", 7)])
def test_text_encoder_matches_transformers(act, eos, tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**CLIP_SMALL, hidden_act=act, eos_token_id=eos,
                                         bos_token_id=0, pad_token_id=1)
    ref = perturb(transformers.CLIPTextModel(config), 3)
    ref.save_pretrained(tmp_path)
    ours, _ = text_encoder.load_transformers(tmp_path)
    ids = np.random.default_rng(2).integers(8, 990, (3, 16))
    ids[:, 0] = 0
    ids[0, 9], ids[1, 15], ids[2, 4] = eos, eos, eos  # end-of-text positions (pooled output)
    ids[2, 10] = 999  # the largest id is not at the eos for eos_token_id != 2
    mask = np.ones_like(ids)
    mask[0, 10:] = 0
    with torch.no_grad():
        plain = ref(torch.from_numpy(ids), output_hidden_states=True)
        masked = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        skip = ref.final_layer_norm(plain.hidden_states[-2]).numpy()
    out = run(lambda m, i: m(i, clip_skip=1), ours, jnp.asarray(ids))
    out_masked = run(lambda m, i, k: m(i, k), ours, jnp.asarray(ids), jnp.asarray(mask))
    for got, want in ((out.last_hidden_state, plain.last_hidden_state),
                      (out.pooler_output, plain.pooler_output), (out.hidden_state, skip),
                      (out_masked.last_hidden_state, masked.last_hidden_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)


PROMPTS = ["Hello  cat", "a photo of a CAT!", "héllo wörld 123 <|endoftext|> x", "",
           "hello " * 30 + "cat"]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1_pad", "sd2_pad"])
def test_tokenizer_matches_transformers(pad, tmp_path):
    write_vocab(tmp_path / "vm", {"model_max_length": 12, "pad_token": pad})
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "vm")
    want = np.asarray(ref(PROMPTS, padding="max_length", max_length=12,
                          truncation=True).input_ids)
    ours = load_tokenizer(tmp_path / "vm")
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) longer than the text encoder's 12 "
                                         r"tokens were truncated to fit: prompt 2 .*, 4 \('hello"):
        np.testing.assert_array_equal(ours(PROMPTS), want)
    assert ours.pad_token_id == ref.pad_token_id and ours.eos_token_id == ref.eos_token_id
    assert want[-1, -1] == ref.eos_token_id  # truncation keeps the end-of-text token
    ref.save_pretrained(tmp_path / "json")  # transformers writes tokenizer.json only
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "json")(PROMPTS), want)
    ours.save(tmp_path / "ours")
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "ours")(PROMPTS), want)


def test_tokenizer_warns_only_when_it_truncates(tmp_path):
    write_vocab(tmp_path / "vm", {"model_max_length": 12})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(tmp_path / "vm")(PROMPTS[:2] + PROMPTS[3:4])  # these fit: no warning


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "tokenizer_config.json").write_text('{"model_max_length": 8}')
        load_tokenizer(tmp_path / "empty")
    write_vocab(tmp_path / "nolen", {})
    with pytest.raises(ValueError, match="model_max_length"):
        load_tokenizer(tmp_path / "nolen")
    # Each of these used to be a bare Exception, a JSONDecodeError without the file's name or
    # a complaint about model_max_length for a directory that is not there.
    with pytest.raises(FileNotFoundError, match="tokenizer: directory .*/absent not found"):
        load_tokenizer(tmp_path / "absent")
    write_vocab(tmp_path / "badcfg", {})
    (tmp_path / "badcfg" / "tokenizer_config.json").write_text('{"model_max_length": 8')
    with pytest.raises(ValueError, match="badcfg/tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path / "badcfg")
    write_vocab(tmp_path / "badvocab", {"model_max_length": 8})
    (tmp_path / "badvocab" / "vocab.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="tokenizer: cannot read .*badvocab/vocab.json"):
        load_tokenizer(tmp_path / "badvocab")
    (tmp_path / "badvocab" / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match="tokenizer: cannot read .*badvocab/tokenizer.json"):
        load_tokenizer(tmp_path / "badvocab")


@pytest.mark.parametrize("config, build, expected", [
    pytest.param(SD15_UNET_CONFIG, unet_cond, 859_520_964, marks=pytest.mark.slow),
    pytest.param(SD21_UNET_CONFIG, unet_cond, 865_910_724, marks=pytest.mark.slow),
    (SD_VAE_CONFIG, vae, 83_653_863),
    (CLIP_L14_CONFIG, text_encoder, 123_060_480),
], ids=["sd15_unet", "sd21_unet", "sd_vae", "clip_l14_text"])
def test_published_configs_have_diffusers_parameter_counts(config, build, expected):
    kwargs = build.config_to_kwargs(config)
    assert common.abstract_count(lambda: build.build(kwargs)) == expected


@pytest.mark.parametrize("change, message", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(some_future_field=1), "some_future_field"),
    (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), "mirror"),
    (dict(attention_head_dim=(2, 4, 8)), "attention_head_dim"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "down_block_types"),
])
def test_unet_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        unet_cond.config_to_kwargs({**UNET_LINEAR, **change})


def test_weight_errors_name_the_weight(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE_SMALL)
    state = ref.state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "encoder.conv_in.bias"},
                    "'encoder.conv_in.bias'.*missing"),
        "unused": ({**state, "encoder.extra.weight": torch.zeros(3)}, "encoder.extra.weight"),
        "shape": ({**state, "decoder.conv_in.weight": torch.zeros(64, 4, 1, 1)},
                  "'decoder.conv_in.weight' has shape"),
        "nan": ({**state, "decoder.conv_in.bias": torch.full_like(state["decoder.conv_in.bias"],
                                                                  float("nan"))},
                "'decoder.conv_in.bias' holds 64 non-finite value"),  # converted before
    }
    from safetensors.torch import save_file
    for name, (sd, message) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(VAE_SMALL))
        save_file({k: v.contiguous() for k, v in sd.items()},
                  directory / "diffusion_pytorch_model.safetensors")
        with pytest.raises(ValueError, match=message):
            vae.load_diffusers(directory)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        (tmp_path / "noweights").mkdir()
        (tmp_path / "noweights" / "config.json").write_text(json.dumps(VAE_SMALL))
        vae.load_diffusers(tmp_path / "noweights")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors_are_read(dtype, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderKL(**VAE_SMALL), 5).to(getattr(torch, dtype))
    (tmp_path / "config.json").write_text(json.dumps(VAE_SMALL))
    save_file(ref.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    ours, _ = vae.load_diffusers(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(ours.encoder.conv_in.kernel[...]),
        ref.encoder.conv_in.weight.detach().float().numpy().transpose(2, 3, 1, 0))


def test_fp16_bin_weights_are_read(tmp_path):
    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderKL(**VAE_SMALL), 5).half()
    ref.save_pretrained(tmp_path, safe_serialization=False, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.bin").exists()
    ours, _ = vae.load_diffusers(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(ours.decoder.conv_in.kernel.value),
        ref.decoder.conv_in.weight.detach().float().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("build", [
    lambda: unet_cond.build(unet_cond.config_to_kwargs(UNET_CONV)),
    lambda: vae.build(vae.config_to_kwargs(VAE_SMALL)),
    lambda: text_encoder.build(text_encoder.config_to_kwargs(CLIP_SMALL)),
], ids=["cond_unet", "vae", "text_encoder"])
def test_every_parameter_has_logical_axes_covered_by_the_rules(build):
    model = nnx.eval_shape(build)
    mesh = jax.make_mesh((1, 1), sharding.MESH_AXES)
    params = jax.tree.leaves(nnx.state(model, nnx.Param),
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert params
    for var in params:
        names = sharding._logical_names(var)
        assert names is not None and len(names) == var.ndim, (var, names)
        sharding.logical_to_spec(names, var.shape, mesh)  # raises for a name without a rule


def test_bfloat16_compute_is_close_to_float32():
    kwargs = unet_cond.config_to_kwargs({**UNET_LINEAR, "layers_per_block": 1})
    f32 = numpy_init(lambda: unet_cond.build(kwargs), seed=1)
    bf16 = numpy_init(lambda: unet_cond.build(kwargs, dtype=jnp.bfloat16), seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    text = rng.standard_normal((2, 5, 32)).astype(np.float32)
    call = lambda m, x, c: m(x, jnp.array([5, 500]), {"text": c})
    want, got = (np.asarray(run(call, m, x, text)) for m in (f32, bf16))
    assert got.dtype == np.float32
    # bf16 keeps 8 mantissa bits: ~0.4% per rounding; a few percent after the whole network.
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert np.abs(got - want).max() > 0  # the computation really ran in bf16
