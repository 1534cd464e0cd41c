"""diffusers ``AutoencoderKL`` (``vae/`` of an SD pipeline) -> `AutoencoderKL`."""
from __future__ import annotations

import os
from typing import Any

from flax import nnx

from diffusion_jax.convert import common
from diffusion_jax.models import build
from diffusion_jax.models.autoencoder import AutoencoderKL

FORMAT = build.ARCHS["autoencoder_kl"].checkpoint_format

_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast"}
_READ = {"in_channels", "out_channels", "block_out_channels", "layers_per_block",
         "latent_channels", "norm_num_groups", "scaling_factor", "use_quant_conv",
         "use_post_quant_conv", "mid_block_add_attention", "down_block_types", "up_block_types"}
_FIXED = {"act_fn": ("silu", "swish"), "shift_factor": (None, 0, 0.0),
          "latents_mean": (None,), "latents_std": (None,)}
_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Attention names of checkpoints saved before diffusers 0.14.
_LEGACY = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
           ".proj_attn.": ".to_out.0."}


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``AutoencoderKL`` config to `AutoencoderKL` keyword arguments.

    Raises:
        ValueError: naming the first field or value that cannot be represented.
    """
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"vae: _class_name={config['_class_name']!r}; expected 'AutoencoderKL'")
    common.check_fields(config, component="vae", known=_IGNORED | _READ, fixed=_FIXED)
    get = config.get
    channels = list(get("block_out_channels", (64,)))
    for field, kind in (("down_block_types", "DownEncoderBlock2D"),
                        ("up_block_types", "UpDecoderBlock2D")):
        types = list(get(field, (kind,) * len(channels)))
        if types != [kind] * len(channels):
            raise ValueError(f"vae: {field}={types}; expected {len(channels)} x {kind!r}")
    return dict(
        in_channels=get("in_channels", 3), out_channels=get("out_channels", 3),
        latent_channels=get("latent_channels", 4), block_out_channels=channels,
        layers_per_block=get("layers_per_block", 1), norm_num_groups=get("norm_num_groups", 32),
        scaling_factor=float(get("scaling_factor", 0.18215)),
        mid_block_attention=bool(get("mid_block_add_attention", True)),
        use_quant_conv=bool(get("use_quant_conv", True)),
        use_post_quant_conv=bool(get("use_post_quant_conv", True)))


def build(kwargs: dict[str, Any], **overrides) -> AutoencoderKL:
    """An `AutoencoderKL` from (JSON) keyword arguments, e.g. ``dtype=jnp.bfloat16``."""
    return AutoencoderKL(**common.tuples({**kwargs, **overrides}), rngs=nnx.Rngs(0))


def load_diffusers(directory: str | os.PathLike,
                   **overrides) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Reads ``directory/config.json`` and its weights into a float32-parameter `AutoencoderKL`.

    Returns:
        ``(model, record)``; ``record = {"format", "kwargs", "sample_size"}``.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: an unmappable config field, or a missing / unused / misshapen weight.
    """
    config = common.read_json(os.path.join(directory, common.CONFIG_FILE), "vae config")
    kwargs = config_to_kwargs(config)
    source = common.load_state_dict(common.find_weights(directory, ("diffusion_pytorch_model",)))
    source = {_modern_key(k): v for k, v in source.items()}
    model = common.build_loaded(lambda: build(kwargs, **overrides), source,
                                lambda path: common.torch_key(path, _RENAMES), component="vae")
    return model, {"format": FORMAT, "kwargs": kwargs, "sample_size": config.get("sample_size")}


def load_converted(directory: str | os.PathLike,
                   **overrides) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Loads an `AutoencoderKL` written by ``common.save_component``."""
    return common.load_component(directory, FORMAT, lambda kw: build(kw, **overrides))


def _modern_key(key: str) -> str:
    for old, new in _LEGACY.items():
        key = key.replace(old, new)
    return key
