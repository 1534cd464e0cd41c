"""CLIP: a text tower and an image tower projected into one embedding space (Flax NNX).

Layout follows transformers' ``CLIPModel`` (``text_model``, ``text_projection``,
``visual_projection``, ``logit_scale``) so a converted checkpoint's text side maps by name;
the image tower is this package's convolutional `ImageEncoder` (models trained here) or
CLIP's ViT (`CLIPVisionTransformer`, attribute ``vision_model``, for converted checkpoints)::

    u = normalize(text_projection(text_model(ids).pooler_output))         [B, E]
    v = normalize(visual_projection(image_encoder(x)))                    [B, E]
    logits_per_image = exp(logit_scale) v u^T                              [B_img, B_txt]

The projections have no bias (as in CLIP). ``logit_scale`` is the learned log inverse
temperature, initialised to ``log(1 / 0.07)``; the contrastive loss
(`diffusion_jax.contrastive.clip_loss`) caps it. The module knows no loss or optimiser.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.clip_vision import CLIPVisionTransformer
from diffusion_jax.models.image_encoder import ImageEncoder
from diffusion_jax.models.text_encoder import CLIPTextModel

INIT_LOGIT_SCALE = math.log(1.0 / 0.07)


class CLIPOutput(NamedTuple):
    """What `CLIPModel.__call__` returns.

    Attributes:
        text_embeds: ``[B_txt, E]`` unit text embeddings.
        image_embeds: ``[B_img, E]`` unit image embeddings.
        logit_scale: scalar log inverse temperature ``s`` (uncapped parameter value).
        logits_per_image: ``[B_img, B_txt]`` ``exp(s) cos(v_i, u_j)``.
    """
    text_embeds: jax.Array
    image_embeds: jax.Array
    logit_scale: jax.Array
    logits_per_image: jax.Array


class CLIPModel(nnx.Module):
    """Text + image towers with linear projections to a shared unit embedding.

    Args:
        text: keyword arguments of `CLIPTextModel` (``vocab_size``, ``hidden_size``, ...).
        image: keyword arguments of `ImageEncoder` (``in_channels``, ``embed_dim``, ...); its
            ``embed_dim`` is the image tower's output width before ``visual_projection``.
        vision: instead of ``image``, keyword arguments of `CLIPVisionTransformer`.
        projection_dim: shared embedding width ``E``.
        logit_scale_init: initial ``s`` (default ``log(1/0.07)``).
        dtype, param_dtype: compute and parameter dtypes (passed to both towers).
        rngs: parameter RNGs.
    """

    def __init__(self, *, text: Mapping[str, Any], image: Mapping[str, Any] | None = None,
                 vision: Mapping[str, Any] | None = None, projection_dim: int = 64,
                 logit_scale_init: float = INIT_LOGIT_SCALE, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if (image is None) == (vision is None):
            raise ValueError("CLIPModel: pass exactly one of image= (CNN tower) and vision= "
                             "(ViT tower)")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = CLIPTextModel(**dict(text), **kw)
        if image is not None:
            self.image_encoder = ImageEncoder(**dict(image), **kw)
            image_width = self.image_encoder.proj.kernel.value.shape[1]
        else:
            self.vision_model = CLIPVisionTransformer(**dict(vision), **kw)
            image_width = self.vision_model.post_layernorm.scale.value.shape[0]
        text_width = self.text_model.final_layer_norm.scale.value.shape[0]
        self.text_projection = _projection(text_width, projection_dim, **kw)
        self.visual_projection = _projection(image_width, projection_dim, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, param_dtype))

    def encode_text(self, input_ids: jax.Array,
                    attention_mask: jax.Array | None = None) -> jax.Array:
        """Unit text embeddings ``[B, E]`` of ``input_ids: [B, L]`` (pooled at end-of-text)."""
        pooled = self.text_model(input_ids, attention_mask).pooler_output
        return _normalize(self.text_projection(pooled))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Unit image embeddings ``[B, E]`` of ``images: [B, H, W, C]`` in [-1, 1]."""
        tower = self.image_encoder if hasattr(self, "image_encoder") else self.vision_model
        return _normalize(self.visual_projection(tower(images)))

    def __call__(self, input_ids: jax.Array, images: jax.Array,
                 attention_mask: jax.Array | None = None) -> CLIPOutput:
        """Both embeddings and the scaled cosine logits ``[B_img, B_txt]``."""
        u = self.encode_text(input_ids, attention_mask)
        v = self.encode_image(images)
        s = self.logit_scale.value
        return CLIPOutput(u, v, s, jnp.exp(s) * v @ u.T)


def clip_from_kwargs(kwargs: Mapping[str, Any], *, seed: int = 0, **overrides) -> CLIPModel:
    """A `CLIPModel` from (JSON / ``ConfigDict``) keyword arguments.

    Args:
        kwargs: ``{"text": {...}, "image": {...}, "projection_dim": E, ...}``; a
            ``ml_collections.ConfigDict`` is accepted (converted with ``to_dict``).
        seed: parameter seed.
        **overrides: replace top-level fields, e.g. ``dtype=jnp.bfloat16``.

    Raises:
        ValueError: ``text`` or ``image`` / ``vision`` is missing, or an unknown field is given.
    """
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
    kwargs.update(overrides)
    image_field = "vision" if "vision" in kwargs else "image"
    for field in ("text", image_field):
        if not isinstance(kwargs.get(field), Mapping):
            raise ValueError(f"clip kwargs: field {field!r} must be a mapping of tower kwargs, "
                             f"got {kwargs.get(field)!r}")
    known = {"text", "image", "vision", "projection_dim", "logit_scale_init", "dtype",
             "param_dtype"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"clip kwargs: unknown fields {unknown}; expected some of {sorted(known)}")
    return CLIPModel(**kwargs, rngs=nnx.Rngs(seed))


def _normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _projection(in_features: int, out_features: int, *, dtype, param_dtype,
                rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs,
                      kernel_init=layers.with_axes(nnx.initializers.normal(in_features ** -0.5),
                                                   ("embed", "mlp")))
