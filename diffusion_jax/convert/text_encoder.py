"""transformers ``CLIPTextModel`` (``text_encoder/`` of an SD pipeline) -> `CLIPTextModel`."""
from __future__ import annotations

import os
from typing import Any

from flax import nnx

from diffusion_jax.convert import common
from diffusion_jax.models import build
from diffusion_jax.models.text_encoder import ACTIVATIONS, CLIPTextModel

FORMAT = build.ARCHS["clip_text"].checkpoint_format

# Fields that do not change inference (training-only, bookkeeping, or the CLIP projection head).
_IGNORED = {"_name_or_path", "architectures", "model_type", "torch_dtype", "dtype",
            "transformers_version", "attention_dropout", "dropout", "initializer_range",
            "initializer_factor", "projection_dim", "pad_token_id", "bos_token_id",
            "output_hidden_states", "output_attentions", "use_cache", "return_dict",
            "tie_word_embeddings", "_attn_implementation_autoset", "is_decoder",
            "chunk_size_feed_forward", "id2label", "label2id", "problem_type"}
_READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
         "eos_token_id"}
# The buffer transformers once saved with the weights (no parameter).
_BUFFER = "embeddings.position_ids"


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Maps a transformers ``CLIPTextConfig`` (or a ``CLIPConfig``'s ``text_config``) to kwargs.

    Raises:
        ValueError: naming the first field or value that cannot be represented.
    """
    archs = config.get("architectures") or ["CLIPTextModel"]
    if archs[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ValueError(f"text_encoder: architectures={archs}; expected CLIPTextModel")
    if archs[0] == "CLIPTextModelWithProjection":
        raise ValueError("text_encoder: CLIPTextModelWithProjection (text_projection) is not "
                         "supported; SD 1.x/2.x use CLIPTextModel")
    common.check_fields(config, component="text_encoder", known=_IGNORED | _READ)
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"text_encoder: unsupported hidden_act={act!r}; supported: "
                         f"{sorted(ACTIVATIONS)}")
    get = config.get
    return dict(vocab_size=get("vocab_size", 49408), hidden_size=get("hidden_size", 512),
                intermediate_size=get("intermediate_size", 2048),
                num_layers=get("num_hidden_layers", 12), num_heads=get("num_attention_heads", 8),
                max_positions=get("max_position_embeddings", 77), hidden_act=act,
                layer_norm_eps=float(get("layer_norm_eps", 1e-5)),
                eos_token_id=get("eos_token_id", 2))


def build(kwargs: dict[str, Any], **overrides) -> CLIPTextModel:
    """A `CLIPTextModel` from (JSON) keyword arguments, e.g. ``dtype=jnp.bfloat16``."""
    return CLIPTextModel(**{**kwargs, **overrides}, rngs=nnx.Rngs(0))


def load_transformers(directory: str | os.PathLike,
                      **overrides) -> tuple[CLIPTextModel, dict[str, Any]]:
    """Reads ``directory/config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).

    State-dict keys may carry transformers' ``text_model.`` prefix or not.

    Returns:
        ``(model, record)``; ``record = {"format", "kwargs"}``.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: an unmappable config field, or a missing / unused / misshapen weight.
    """
    config = common.read_json(os.path.join(directory, common.CONFIG_FILE), "text_encoder config")
    kwargs = config_to_kwargs(config)
    source = common.load_state_dict(common.find_weights(directory, ("model", "pytorch_model")))
    source = {k.removeprefix("text_model."): v for k, v in source.items()}
    model = common.build_loaded(lambda: build(kwargs, **overrides), source,
                                lambda path: common.torch_key(path, {}),
                                component="text_encoder", ignore=lambda k: k == _BUFFER)
    return model, {"format": FORMAT, "kwargs": kwargs}


def load_converted(directory: str | os.PathLike,
                   **overrides) -> tuple[CLIPTextModel, dict[str, Any]]:
    """Loads a `CLIPTextModel` written by ``common.save_component``."""
    return common.load_component(directory, FORMAT, lambda kw: build(kw, **overrides))
