"""transformers ``CLIPModel`` (text + ViT towers, projections, logit scale) -> `CLIPModel`.

The state-dict keys match our parameter paths one to one (``text_model.*``,
``vision_model.*``, ``text_projection.weight``, ``visual_projection.weight``,
``logit_scale``); the ``position_ids`` buffers are skipped. The tokenizer of the checkpoint
(``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) is read by
:func:`diffusion_jax.clip_tokenizer.load_tokenizer` from the same directory.
"""
from __future__ import annotations

import os
from typing import Any

from flax import nnx

from diffusion_jax.convert import common, text_encoder
from diffusion_jax.models import build
from diffusion_jax.models.clip import CLIPModel
from diffusion_jax.models.text_encoder import ACTIVATIONS

FORMAT = build.ARCHS["clip"].checkpoint_format
_COMMON_IGNORED = {"_name_or_path", "architectures", "model_type", "torch_dtype", "dtype",
                   "transformers_version", "initializer_factor", "initializer_range",
                   "output_hidden_states", "output_attentions", "return_dict", "use_cache",
                   "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
                   "problem_type", "tie_word_embeddings", "_attn_implementation_autoset",
                   "is_decoder", "attention_dropout", "dropout", "projection_dim"}
_TOP = {"text_config", "vision_config", "projection_dim", "logit_scale_init_value"}
_VISION = {"image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_channels", "hidden_act", "layer_norm_eps"}


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Maps a transformers ``CLIPConfig`` to `CLIPModel` kwargs (``text``, ``vision``, ...).

    Raises:
        ValueError: naming the first field or value that cannot be represented.
    """
    archs = config.get("architectures") or ["CLIPModel"]
    if archs[0] != "CLIPModel":
        raise ValueError(f"clip: architectures={archs}; expected CLIPModel")
    common.check_fields(config, component="clip", known=_COMMON_IGNORED | _TOP)
    text_cfg = {k: v for k, v in config.get("text_config", {}).items()
                if k not in _COMMON_IGNORED}
    vision_cfg = dict(config.get("vision_config", {}))
    common.check_fields(vision_cfg, component="clip vision_config",
                        known=_COMMON_IGNORED | _VISION)
    act = vision_cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"clip vision_config: unsupported hidden_act={act!r}")
    get = vision_cfg.get
    vision = dict(image_size=get("image_size", 224), patch_size=get("patch_size", 32),
                  hidden_size=get("hidden_size", 768),
                  intermediate_size=get("intermediate_size", 3072),
                  num_layers=get("num_hidden_layers", 12),
                  num_heads=get("num_attention_heads", 12), num_channels=get("num_channels", 3),
                  hidden_act=act, layer_norm_eps=float(get("layer_norm_eps", 1e-5)))
    return dict(text=text_encoder.config_to_kwargs(text_cfg), vision=vision,
                projection_dim=config.get("projection_dim", 512),
                logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)))


def build(kwargs: dict[str, Any], **overrides) -> CLIPModel:
    """A `CLIPModel` from (JSON) keyword arguments."""
    kwargs = dict(kwargs)
    kwargs["vision"] = common.tuples(kwargs["vision"])
    return CLIPModel(**{**kwargs, **overrides}, rngs=nnx.Rngs(0))


def load_transformers(directory: str | os.PathLike,
                      **overrides) -> tuple[CLIPModel, dict[str, Any]]:
    """Reads ``directory/config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).

    Returns:
        ``(model, record)``; ``record = {"format", "kwargs"}``.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: an unmappable config field, or a missing / unused / misshapen weight.
    """
    config = common.read_json(os.path.join(directory, common.CONFIG_FILE), "clip config")
    kwargs = config_to_kwargs(config)
    source = common.load_state_dict(common.find_weights(directory, ("model", "pytorch_model")))
    model = common.build_loaded(lambda: build(kwargs, **overrides), source,
                                lambda path: common.torch_key(path, {}), component="clip",
                                ignore=lambda k: k.endswith("embeddings.position_ids"))
    return model, {"format": FORMAT, "kwargs": kwargs}


def load_converted(directory: str | os.PathLike, **overrides) -> tuple[CLIPModel, dict[str, Any]]:
    """Loads a `CLIPModel` written by ``common.save_component``."""
    return common.load_component(directory, FORMAT, lambda kw: build(kw, **overrides))
