"""KL autoencoder in diffusers' ``AutoencoderKL`` layout (the Stable Diffusion VAE), Flax NNX.

``encode``: image ``x: [B, H, W, 3]`` in [-1, 1] -> `DiagonalGaussian` over latents
``[B, H/f, W/f, latent_channels]`` with ``f = 2**(levels - 1)``; ``decode``: latents -> image.
A diffusion model works on ``z * scaling_factor`` (SD: 0.18215) and the pipeline divides by
it before decoding; the model stores the factor but does not apply it.

Structure (names follow diffusers)::

    encoder: conv_in -> down_blocks[i]: layers_per_block x ResnetBlock (+ stride-2 conv,
             padded after, except the last) -> mid_block (ResnetBlock, attention, ResnetBlock)
             -> conv_out(silu(conv_norm_out(h)))  [2 * latent_channels: mean, log-variance]
    quant_conv (1x1) -> posterior;  post_quant_conv (1x1) -> decoder
    decoder: conv_in -> mid_block -> up_blocks (widest first): layers_per_block + 1 x
             ResnetBlock (+ nearest upsample and conv, except the last) -> conv_out(silu(norm(h)))

GroupNorm epsilon is 1e-6 throughout, as diffusers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.attention import AttentionBlock
from diffusion_jax.models.layers import Dtype

# The Stable Diffusion 1.x / 2.x VAE (83,653,863 parameters).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              scaling_factor=0.18215)

_EPS = 1e-6


class DiagonalGaussian(NamedTuple):
    """``N(mean, diag(exp(logvar)))`` over latents; ``mean, logvar: [B, h, w, c]``.

    ``logvar`` is clipped to [-30, 20] when built by `AutoencoderKL.encode` (as diffusers).
    """
    mean: jax.Array
    logvar: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        """``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn with ``key``."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32)
        return self.mean + jnp.exp(0.5 * self.logvar) * eps

    def mode(self) -> jax.Array:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self) -> jax.Array:
        """``KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar)`` per example: ``[B]``."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
    """The SD VAE: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``.

    Args:
        in_channels, out_channels: image channels.
        latent_channels: channels of the latent.
        block_out_channels: widths of the encoder levels (the decoder reverses them).
        layers_per_block: residual blocks per encoder level (one more per decoder level).
        norm_num_groups: GroupNorm groups.
        scaling_factor: the latent scale a diffusion model trained on this VAE used.
        mid_block_attention: self-attention in the middle blocks.
        use_quant_conv, use_post_quant_conv: the 1x1 convolutions around the latent.
        dtype, param_dtype: compute and parameter dtypes.
        rngs: parameter RNGs.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 4,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32,
                 scaling_factor: float = 0.18215, mid_block_attention: bool = True,
                 use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        arch = dict(block_out_channels=tuple(block_out_channels), num_layers=layers_per_block,
                    groups=norm_num_groups, attention=mid_block_attention)
        self.scaling_factor = scaling_factor
        self.latent_channels = latent_channels
        self.dtype = dtype
        self.encoder = Encoder(in_channels, 2 * latent_channels, **arch, **kw)
        self.decoder = Decoder(latent_channels, out_channels, **arch, **kw)
        c2 = 2 * latent_channels
        self.quant_conv = layers.conv(c2, c2, 1, **kw) if use_quant_conv else None
        self.post_quant_conv = (layers.conv(latent_channels, latent_channels, 1, **kw)
                                if use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """``x: [B, H, W, in_channels]`` in [-1, 1] -> posterior over ``[B, H/f, W/f, latent]``."""
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """``z: [B, h, w, latent_channels]`` (unscaled) -> ``[B, h f, w f, out_channels]`` f32."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction ``decode(sample)`` (``decode(mode)`` when ``key`` is None)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))


class ResnetBlock(nnx.Module):
    """Residual block without time input: ``skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``.

    ``skip`` (named ``conv_shortcut``) is a 1x1 conv when the width changes.
    Shapes: ``[B, H, W, in] -> [B, H, W, out]``.
    """

    def __init__(self, cin: int, cout: int, groups: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.group_norm(cin, groups, _EPS, **kw)
        self.conv1 = layers.conv(cin, cout, 3, **kw)
        self.norm2 = layers.group_norm(cout, groups, _EPS, **kw)
        self.conv2 = layers.conv(cout, cout, 3, **kw)
        self.conv_shortcut = layers.conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class MidBlock(nnx.Module):
    """``resnets[1](attentions[0](resnets[0](x)))``; one-head self-attention (optional)."""

    def __init__(self, ch: int, groups: int, attention: bool, **kw):
        self.resnets = nnx.List([ResnetBlock(ch, ch, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List(
            [AttentionBlock(ch, 1, num_groups=groups, eps=_EPS, **kw)] if attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.resnets[0](x)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class Encoder(nnx.Module):
    """``[B, H, W, in_channels] -> [B, H/f, W/f, out_channels]`` (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, *, block_out_channels: tuple,
                 num_layers: int, groups: int, attention: bool, **kw):
        chans = block_out_channels
        self.conv_in = layers.conv(in_channels, chans[0], 3, **kw)
        blocks, ch = [], chans[0]
        for i, out_ch in enumerate(chans):
            block = _Block()
            block.resnets = nnx.List([ResnetBlock(ch if j == 0 else out_ch, out_ch, groups, **kw)
                                      for j in range(num_layers)])
            ch = out_ch
            block.downsamplers = nnx.List([] if i == len(chans) - 1 else [
                layers.Downsample(ch, resample="conv", padding=0, **kw)])
            blocks.append(block)
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(ch, groups, attention, **kw)
        self.conv_norm_out = layers.group_norm(ch, groups, _EPS, **kw)
        self.conv_out = layers.conv(ch, out_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            for down in block.downsamplers:
                h = down(h)
        h = self.mid_block(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """``[B, h, w, in_channels] -> [B, h f, w f, out_channels]`` (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, *, block_out_channels: tuple,
                 num_layers: int, groups: int, attention: bool, **kw):
        chans = tuple(reversed(block_out_channels))
        ch = chans[0]
        self.conv_in = layers.conv(in_channels, ch, 3, **kw)
        self.mid_block = MidBlock(ch, groups, attention, **kw)
        blocks = []
        for i, out_ch in enumerate(chans):
            block = _Block()
            block.resnets = nnx.List([ResnetBlock(ch if j == 0 else out_ch, out_ch, groups, **kw)
                                      for j in range(num_layers + 1)])
            ch = out_ch
            block.upsamplers = nnx.List([] if i == len(chans) - 1 else [
                layers.Upsample(ch, resample="conv", **kw)])
            blocks.append(block)
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = layers.group_norm(ch, groups, _EPS, **kw)
        self.conv_out = layers.conv(ch, out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            for up in block.upsamplers:
                h = up(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class _Block(nnx.Module):
    """One level: ``resnets`` and ``downsamplers`` / ``upsamplers`` (empty at the last level)."""
