"""Parity of the converted NNX UNet with PyTorch diffusers' UNet2DModel (random weights)."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from training_fixtures import REPO, subprocess_env

from diffusion_jax.cli import convert as cli_convert
from diffusion_jax.convert import unet2d as cd
from diffusion_jax.models.unet import count_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

# ddpm-cifar10-32 family: DDPM time embedding, asymmetric downsample padding, one attention head.
DDPM_SMALL = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
# diffusers defaults (symmetric padding, cos-first embedding, head_dim 16 -> 2 and 4 heads),
# ADM scale-shift conditioning and a class embedding.
CLASS_SMALL = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=16,
    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, num_class_embeds=4,
    in_channels=2, out_channels=4)
CIFAR10 = dict(
    sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, dropout=0.1)


@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={"xla_backend_optimization_level": 0})  # fast CPU compile
def _forward(graphdef, state, x, t, y):
    return nnx.merge(graphdef, state)(x, t, None if y is None else {"label": y})


def _save_random(config, path, *, seed=0, safe=True, perturb=True):
    """Saves a diffusers UNet2DModel with random (perturbed) weights; returns the torch model."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    if perturb:  # move norms off (1, 0) so a scale/bias swap would show
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=safe)
    return model


def _compare(torch_model, jax_model, *, batch, size, channels, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x), torch.from_numpy(t),
                          None if labels is None else torch.from_numpy(labels)).sample.numpy()
    got = _forward(*nnx.split(jax_model), jnp.asarray(x.transpose(0, 2, 3, 1)),
                   jnp.asarray(t, jnp.int32), None if labels is None else jnp.asarray(labels, jnp.int32))
    got = np.asarray(got).transpose(0, 3, 1, 2)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def test_cli_roundtrip_matches_diffusers(tmp_path, capsys):
    torch_model = _save_random(DDPM_SMALL, tmp_path / "src")
    cli_convert.unet2d(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert "wrote" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (record["format"], record["arch"]) == ("diffusion_jax.unet/1", "unet")
    assert not (tmp_path / "out" / "unet.json").exists()
    kwargs = record["kwargs"]
    assert kwargs["attn_resolutions"] == [8] and kwargs["downsample_padding"] == 0
    model = cd.load_converted(tmp_path / "out")
    assert count_params(model) == sum(p.numel() for p in torch_model.parameters())
    err, scale = _compare(torch_model, model, batch=2, size=16, channels=3)
    assert err <= 1e-4 and scale > 0.1, (err, scale)
    # a directory converted before the shared format (record in unet.json) still loads
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "out", legacy)
    (legacy / "config.json").unlink()
    (legacy / "unet.json").write_text(json.dumps({"format": "diffusion_jax.unet/1",
                                                  "source": record["source"], "kwargs": kwargs}))
    again = cd.load_converted(legacy)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(model))


def test_class_conditional_scale_shift_bin_checkpoint(tmp_path):
    torch_model = _save_random(CLASS_SMALL, tmp_path / "src", safe=False)
    assert (tmp_path / "src" / "diffusion_pytorch_model.bin").exists()
    model, kwargs = cd.load_diffusers_unet(tmp_path / "src" / "diffusion_pytorch_model.bin")
    assert kwargs["num_classes"] == 4 and kwargs["time_conditioning"] == "scale_shift"
    assert kwargs["num_head_channels"] == 16 and kwargs["attn_resolutions"] == [16]
    # the extra null-label row is the only parameter diffusers lacks
    assert count_params(model) == sum(p.numel() for p in torch_model.parameters()) + 128
    labels = np.array([0, 3, 1])
    err, scale = _compare(torch_model, model, batch=3, size=16, channels=2, labels=labels)
    assert err <= 1e-4 and scale > 0.1, (err, scale)
    np.testing.assert_array_equal(np.asarray(model.class_embed.embedding.value[4]), 0.0)


def test_ddpm_cifar10_layout_parity(tmp_path):
    """The full 35.7M-parameter layout: same parameter count and forward pass as diffusers."""
    torch_model = _save_random(CIFAR10, tmp_path / "src", perturb=False)
    n_torch = sum(p.numel() for p in torch_model.parameters())
    assert n_torch == 35_746_307
    model, kwargs = cd.load_diffusers_unet(tmp_path / "src")
    assert count_params(model) == n_torch
    assert kwargs["channel_mult"] == [1, 2, 2, 2] and kwargs["attn_resolutions"] == [16]
    err, scale = _compare(torch_model, model, batch=1, size=32, channels=3)
    assert err <= 1e-4 and scale > 0.1, (err, scale)


def test_run_sample_on_converted_checkpoint_matches_torch_ddim(tmp_path):
    """run_sample.py --checkpoint: DDPM defaults (linear betas 1e-4..0.02, T=1000, eps, clip),
    5 DDIM steps, against the same deterministic DDIM loop run on the torch model."""
    config = {**DDPM_SMALL, "sample_size": 8, "in_channels": 1, "out_channels": 1,
              "block_out_channels": (16, 32), "layers_per_block": 1}
    torch_model = _save_random(config, tmp_path / "src")
    cli_convert.unet2d(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")])
    out, n, seed = tmp_path / "samples", 4, 3
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_sample.py"), f"--checkpoint={tmp_path / 'ckpt'}",
         "--sampler=ddim", "--steps=5", f"--num_samples={n}", f"--seed={seed}", f"--out={out}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out / "samples.npz")["images"]  # uint8 [n, 8, 8, 1]

    n_pad = -(-n // jax.device_count()) * jax.device_count()  # run_sample pads to the devices
    x_t = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 0), (n_pad, 8, 8, 1))
    x = np.asarray(x_t, np.float64)[:n].transpose(0, 3, 1, 2)
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    steps = [999, 749, 500, 250, 0]  # round(linspace(999, 0, 5))
    for t, t_prev in zip(steps, steps[1:] + [None]):
        a, a_prev = alpha_bar[t], 1.0 if t_prev is None else alpha_bar[t_prev]
        with torch.no_grad():
            eps = torch_model(torch.from_numpy(x).float(), torch.full((n,), t)).sample.double().numpy()
        x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    want = np.clip(np.round((x.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255)
    assert got.shape == (n, 8, 8, 1) and want.std() > 10
    assert np.abs(got.astype(np.int64) - want).max() <= 1


@pytest.mark.parametrize("field,value,match", [
    ("resnet_time_scale_shift", "ada_group", "resnet_time_scale_shift='ada_group'"),
    ("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"), "CrossAttnDownBlock2D"),
    ("up_block_types", ("UpBlock2D", "UpBlock2D"), "disagree on attention"),
    ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
    ("cross_attention_dim", 64, "cross_attention_dim"),
    ("sample_size", (16, 32), "only square"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
])
def test_unsupported_config_raises(field, value, match):
    config = {**DDPM_SMALL, "_class_name": "UNet2DModel", field: value}
    with pytest.raises(ValueError, match=match):
        cd.config_to_kwargs(config)


def test_missing_files_and_extra_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cd.load_diffusers_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json with format 'diffusion_jax.unet/1'"):
        cd.load_converted(tmp_path)
    config = {**DDPM_SMALL, "block_out_channels": (8, 8), "norm_num_groups": 4}
    _save_random(config, tmp_path / "src")
    from safetensors.numpy import load_file, save_file
    path = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "extra.weight": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match="extra.weight"):
        cd.load_diffusers_unet(tmp_path / "src")
    del tensors["conv_out.bias"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="conv_out.bias"):
        cd.load_diffusers_unet(tmp_path / "src")


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


@pytest.mark.parametrize("safe", [True, False])
def test_corrupt_weights_and_config_name_the_file(tmp_path, safe):
    config = {**DDPM_SMALL, "block_out_channels": (8, 8), "norm_num_groups": 4}
    src = tmp_path / "src"
    _save_random(config, src, safe=safe)
    weights = src / ("diffusion_pytorch_model." + ("safetensors" if safe else "bin"))
    _truncate(weights)
    with pytest.raises(ValueError, match=rf"weights file {weights} is unreadable .*truncated"):
        cd.load_diffusers_unet(src)
    _save_random(config, src, safe=safe)
    _truncate(src / "config.json")
    with pytest.raises(ValueError, match=rf"{src / 'config.json'} is not valid JSON"):
        cd.load_diffusers_unet(src)
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        cd.load_diffusers_unet(src)


def test_checkpoint_of_the_wrong_kind_says_what_it_looks_like(tmp_path):
    """``run_sample.py --checkpoint=DIR`` for a directory that is not a converted UNet."""
    from configs import default
    from diffusion_jax import loading
    for parts, match in ((("unet", "vae"), "looks like a Stable Diffusion pipeline directory"),
                         (("config.json",), "unconverted diffusers UNet2DModel"),
                         ((), "takes a Stable Diffusion pipeline directory")):
        path = tmp_path / "_".join(parts or ("empty",))
        path.mkdir()
        for part in parts:
            if part.endswith(".json"):
                (path / part).write_text("{}")
            else:
                (path / part).mkdir()
        with pytest.raises(FileNotFoundError, match=match):
            loading.load(checkpoint_path=str(path), config=default.get_config())


def test_cli_bad_source_is_a_one_line_error(tmp_path):
    """A missing source: one line naming it and exit 1 (it used to end in a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "diffusion_jax.convert.unet2d", "--src",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.unet2d: error: ")
    assert "missing" in lines[0] and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="convert.unet2d: error: .*--out"):
        cli_convert.unet2d(["--src", str(tmp_path)])
