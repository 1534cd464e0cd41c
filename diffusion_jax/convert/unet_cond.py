"""diffusers ``UNet2DConditionModel`` (``unet/`` of an SD pipeline) -> `CondUNet`."""
from __future__ import annotations

import os
from typing import Any

from flax import nnx

from diffusion_jax.convert import common
from diffusion_jax.models import build
from diffusion_jax.models.cond_unet import CondUNet

FORMAT = build.ARCHS["cond_unet"].checkpoint_format

_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout",
            "addition_embed_type_num_heads"}
_READ = {"in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
         "up_block_types", "block_out_channels", "layers_per_block", "downsample_padding",
         "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
         "use_linear_projection", "upcast_attention", "transformer_layers_per_block"}
# Fields whose other values need parts this model does not have.
_FIXED = {
    "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1, 1.0), "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_RENAMES = {"dense1": "linear_1", "dense2": "linear_2", "emb_proj": "time_emb_proj",
            "skip": "conv_shortcut"}


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``UNet2DConditionModel`` config to `CondUNet` keyword arguments.

    ``attention_head_dim`` holds the number of heads per level (diffusers' naming quirk: SD 1.x
    says 8, SD 2.x says [5, 10, 20, 20]); an int applies to every level.

    Raises:
        ValueError: naming the first field or value that cannot be represented.
    """
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"unet: _class_name={config['_class_name']!r}; expected "
                         "'UNet2DConditionModel'")
    common.check_fields(config, component="unet", known=_IGNORED | _READ, fixed=_FIXED)
    get = config.get
    channels = list(get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    for field, types, table in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        bad = [t for t in types if t not in table]
        if bad or len(types) != levels:
            raise ValueError(f"unet: {field}={types} must have {levels} entries from "
                             f"{sorted(table)}")
    cross = [_DOWN[t] for t in down]
    if cross != [_UP[t] for t in reversed(up)]:
        raise ValueError(f"unet: up_block_types={up} must mirror down_block_types={down}")
    heads = get("attention_head_dim", 8)
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    if len(heads) != levels or not all(isinstance(h, int) for h in heads):
        raise ValueError(f"unet: attention_head_dim={get('attention_head_dim')!r} must be an int "
                         f"or {levels} ints")
    for field in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
        if not isinstance(get(field, 1), int):
            raise ValueError(f"unet: {field}={get(field)!r}: only one int for every level is "
                             "supported")
    if get("norm_num_groups", 32) is None:
        raise ValueError("unet: norm_num_groups=None is not supported")
    return dict(
        in_channels=get("in_channels", 4), out_channels=get("out_channels", 4),
        block_out_channels=channels, cross_attn=cross,
        layers_per_block=get("layers_per_block", 2), num_heads=heads,
        cross_attention_dim=get("cross_attention_dim", 1280),
        transformer_depth=get("transformer_layers_per_block", 1),
        upcast_attention=bool(get("upcast_attention", False)),
        norm_num_groups=get("norm_num_groups", 32), norm_eps=float(get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)), downsample_padding=get("downsample_padding", 1))


def build(kwargs: dict[str, Any], **overrides) -> CondUNet:
    """A `CondUNet` from (JSON) keyword arguments, e.g. ``overrides={"dtype": jnp.bfloat16}``."""
    return CondUNet(**common.tuples({**kwargs, **overrides}), rngs=nnx.Rngs(0))


def load_diffusers(directory: str | os.PathLike, **overrides) -> tuple[CondUNet, dict[str, Any]]:
    """Reads ``directory/config.json`` and its weights into a float32-parameter `CondUNet`.

    Returns:
        ``(model, record)``; ``record = {"format", "kwargs", "sample_size"}``.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: an unmappable config field, or a missing / unused / misshapen weight.
    """
    config = common.read_json(os.path.join(directory, common.CONFIG_FILE), "unet config")
    kwargs = config_to_kwargs(config)
    source = common.load_state_dict(common.find_weights(directory, ("diffusion_pytorch_model",)))
    model = common.build_loaded(lambda: build(kwargs, **overrides), source,
                                lambda path: common.torch_key(path, _RENAMES), component="unet")
    return model, {"format": FORMAT, "kwargs": kwargs, "sample_size": config.get("sample_size")}


def load_converted(directory: str | os.PathLike, **overrides) -> tuple[CondUNet, dict[str, Any]]:
    """Loads a `CondUNet` written by ``common.save_component`` (e.g. ``dtype=jnp.bfloat16``)."""
    return common.load_component(directory, FORMAT, lambda kw: build(kw, **overrides))


