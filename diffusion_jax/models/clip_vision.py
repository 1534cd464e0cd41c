"""CLIP's ViT image tower in transformers' ``CLIPVisionModel`` layout (Flax NNX).

For CLIP checkpoints converted from disk (:mod:`diffusion_jax.convert.clip`)::

    x    = ((images + 1) / 2 - mean) / std, resized to image_size        [B, S, S, 3]
    p    = patch_embedding(x) (conv p x p, stride p, no bias)            [B, S/p, S/p, D]
    h_0  = [class_embedding; flatten(p)] + position_embedding            [B, 1 + N, D]
    h    = encoder(pre_layrnorm(h_0))   (non-causal pre-LN blocks, as the text tower's)
    pooled = post_layernorm(h[:, 0])                                     [B, D]

Input images are the library's ``[B, H, W, C]`` in [-1, 1] (gray is repeated to RGB); the
resize (bicubic, antialiased) and CLIP's pixel normalisation happen here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.attention import layer_norm
from diffusion_jax.models.text_encoder import EncoderLayer, _Container, _embed

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionTransformer(nnx.Module):
    """ViT ``images [B, H, W, C] -> pooled [B, hidden_size]`` (module docstring).

    Args:
        image_size, patch_size: input side S after resizing and patch side p (p divides S).
        hidden_size, intermediate_size, num_layers, num_heads: transformer shape.
        num_channels: 3 for CLIP.
        hidden_act, layer_norm_eps: as the text tower.
        pixel_mean, pixel_std: per-channel normalisation of [0, 1] pixels.
        dtype, param_dtype, rngs: as usual.

    Raises:
        ValueError: ``patch_size`` does not divide ``image_size``.
    """

    def __init__(self, *, image_size: int = 224, patch_size: int = 32, hidden_size: int = 768,
                 intermediate_size: int = 3072, num_layers: int = 12, num_heads: int = 12,
                 num_channels: int = 3, hidden_act: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5, pixel_mean=OPENAI_CLIP_MEAN,
                 pixel_std=OPENAI_CLIP_STD, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_size, self.num_channels = image_size, num_channels
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        num_positions = (image_size // patch_size) ** 2 + 1
        self.embeddings = _Container()
        self.embeddings.class_embedding = nnx.Param(
            nnx.initializers.normal(hidden_size ** -0.5)(rngs.params(), (hidden_size,),
                                                         param_dtype),
            out_sharding=("embed",), eager_sharding=False)
        self.embeddings.patch_embedding = nnx.Conv(
            num_channels, hidden_size, (patch_size, patch_size), strides=patch_size,
            padding="VALID", use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=layers.with_axes(nnx.initializers.lecun_normal(),
                                         (None, None, "conv_in", "conv_out")))
        self.embeddings.position_embedding = _embed(num_positions, hidden_size, (None, "embed"),
                                                    **kw)
        self.pre_layrnorm = layer_norm(hidden_size, layer_norm_eps, **kw)
        self.encoder = _Container()
        self.encoder.layers = nnx.List([
            EncoderLayer(hidden_size, intermediate_size, num_heads, hidden_act, layer_norm_eps,
                         causal=False, **kw) for _ in range(num_layers)])
        self.post_layernorm = layer_norm(hidden_size, layer_norm_eps, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Pooled ``[B, hidden_size]`` (float32) of ``images [B, H, W, C]`` in [-1, 1]."""
        x = self.preprocess(images)
        p = self.embeddings.patch_embedding(x)                          # [B, S/p, S/p, D]
        b, _, _, d = p.shape
        cls = jnp.broadcast_to(self.embeddings.class_embedding.value.astype(p.dtype), (b, 1, d))
        h = jnp.concatenate([cls, p.reshape(b, -1, d)], axis=1)        # [B, 1 + N, D]
        h = h + self.embeddings.position_embedding(jnp.arange(h.shape[1]))[None]
        h = self.pre_layrnorm(h)
        for layer in self.encoder.layers:
            h = layer(h, None)
        return self.post_layernorm(h[:, 0]).astype(jnp.float32)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[-1, 1] ``[B, H, W, C]`` -> CLIP-normalised ``[B, S, S, num_channels]``."""
        if images.shape[-1] == 1 and self.num_channels == 3:
            images = jnp.repeat(images, 3, axis=-1)
        if images.shape[-1] != self.num_channels:
            raise ValueError(f"images have {images.shape[-1]} channels; expected "
                             f"{self.num_channels} (or 1)")
        b, h, w, c = images.shape
        x = (images.astype(jnp.float32) + 1.0) / 2.0
        if (h, w) != (self.image_size, self.image_size):
            x = jax.image.resize(x, (b, self.image_size, self.image_size, c), "bicubic")
        mean, std = jnp.asarray(self.pixel_mean), jnp.asarray(self.pixel_std)
        return (x - mean) / std
