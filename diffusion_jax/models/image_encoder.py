"""A small convolutional image encoder for CLIP-style training on 28x28 / 32x32 images.

Built from the UNet's layers (:mod:`diffusion_jax.models.layers`), so its parameters carry the
same logical axis names::

    h   = conv_in(x)                                                  [B, H, W, base]
    levels: per level i, h = silu(norm(conv3x3(h))) of width base * channel_mult[i], then
            a stride-2 3x3 conv except at the last level              [B, H/2, W/2, ...]
    out = proj(mean_{H, W} silu(norm_out(h)))                         [B, embed_dim]

Any input side works ("SAME" padding: 28 -> 14 -> 7, 32 -> 16 -> 8). The embedding is not
normalised; the contrastive loss normalises it. The module knows no loss or temperature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers


class ImageEncoder(nnx.Module):
    """Images ``x [B, H, W, C]`` -> pooled embeddings ``[B, embed_dim]``.

    Args:
        in_channels: input channels ``C`` (1 for grayscale).
        embed_dim: output embedding width.
        base_channels: width of the first level; level ``i`` has ``base * channel_mult[i]``.
        channel_mult: per-level width multipliers; every level but the last halves H and W.
        num_groups: GroupNorm groups (must divide every level's width).
        dtype: compute dtype; param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for initialisation.
    """

    def __init__(self, *, in_channels: int = 1, embed_dim: int = 64, base_channels: int = 32,
                 channel_mult=(1, 2, 4), num_groups: int = 8, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not channel_mult:
            raise ValueError("channel_mult must name at least one level.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = layers.conv(in_channels, base_channels, 3, **kw)
        convs, norms, downs = [], [], []
        channels = base_channels
        for level, mult in enumerate(channel_mult):
            width = base_channels * mult
            convs.append(layers.conv(channels, width, 3, **kw))
            norms.append(layers.group_norm(width, num_groups, 1e-6, **kw))
            last = level == len(channel_mult) - 1
            downs.append(None if last else layers.conv(width, width, 3, strides=2, **kw))
            channels = width
        self.convs, self.norms, self.downs = nnx.List(convs), nnx.List(norms), nnx.List(downs)
        self.norm_out = layers.group_norm(channels, num_groups, 1e-6, **kw)
        self.proj = layers.dense(channels, embed_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Embeddings ``[B, embed_dim]`` of ``x: [B, H, W, C]`` in [-1, 1]."""
        h = self.conv_in(x)
        for conv, norm, down in zip(self.convs, self.norms, self.downs):
            h = jax.nn.silu(norm(conv(h)))
            if down is not None:
                h = down(h)                                          # [B, H/2, W/2, width]
        pooled = jax.nn.silu(self.norm_out(h)).mean(axis=(1, 2))     # [B, channels]
        return self.proj(pooled)
