"""Text-conditional UNet in diffusers' ``UNet2DConditionModel`` layout (Stable Diffusion 1.x/2.x).

``f(x_t, t, cond) -> [B, H, W, out_channels]`` for latents ``x_t: [B, H, W, C]`` (NHWC),
timesteps ``t: [B]`` and ``cond = {"text": [B, S, cross_attention_dim]}`` (text-encoder states).
It knows nothing of schedules, losses or meshes.

Structure (module names follow diffusers so checkpoints map by name)::

    emb  = time_embedding(sinusoid(t))                                   [B, 4 * C0]
    h    = conv_in(x)                                                    [B, H, W, C0]
    down_blocks[i] (width C_i): layers_per_block x (ResBlock [+ Transformer2D]),
          then a stride-2 conv except at the last level; every output is a skip
    mid_block: ResBlock, Transformer2D, ResBlock
    up_blocks (lowest resolution first): layers_per_block + 1 x
          (concat skip, ResBlock [+ Transformer2D]), then upsample except at the last level
    out  = conv_out(silu(conv_norm_out(h)))

Heads: level i has ``num_heads[i]`` heads of width ``C_i / num_heads[i]`` on the way down
and in the middle (``num_heads[-1]``); up level i (counted from the lowest resolution) uses
``num_heads[L - 1 - i]``, as diffusers does. (diffusers' ``attention_head_dim`` config field
holds these head counts; the converter maps it.)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.attention import Transformer2D

# Published layouts as `CondUNet` keyword arguments.
SD15_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    cross_attn=(True, True, True, False), layers_per_block=2, num_heads=(8, 8, 8, 8),
    cross_attention_dim=768)
SD21_UNET = dict(
    SD15_UNET, num_heads=(5, 10, 20, 20), cross_attention_dim=1024, upcast_attention=True)


class CondUNet(nnx.Module):
    """Cross-attention UNet ``(x [B,H,W,C], t [B], cond {"text": [B,S,D]}) -> [B,H,W,out] float32``.

    Args:
        in_channels, out_channels: latent channels in and out.
        block_out_channels: width ``C_i`` of each resolution level.
        cross_attn: per level, whether its blocks carry a `Transformer2D` (the up path mirrors
            the down path).
        layers_per_block: residual blocks per level on the way down (one more on the way up).
        num_heads: attention heads per level (see the module docstring).
        cross_attention_dim: width D of the text states.
        transformer_depth: transformer blocks inside each `Transformer2D`.
        upcast_attention: compute attention in float32.
        norm_num_groups, norm_eps: GroupNorm groups and epsilon of the residual blocks
            (also the LayerNorm epsilon of the transformer blocks, as diffusers).
        flip_sin_to_cos, freq_shift: sinusoidal time-embedding options.
        downsample_padding: 1 pads the stride-2 conv one pixel on each side.
        dtype, param_dtype: compute and parameter dtypes.
        remat: rematerialise each residual / transformer block in the backward pass.
        rngs: parameter RNGs.

    Raises:
        ValueError: per-level options of the wrong length, or heads that do not divide a width.
    """

    def __init__(self, *, in_channels: int = 4, out_channels: int = 4,
                 block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
                 cross_attn: Sequence[bool] = (True, True, True, False),
                 layers_per_block: int = 2, num_heads: Sequence[int] = (8, 8, 8, 8),
                 cross_attention_dim: int = 768, transformer_depth: int = 1,
                 upcast_attention: bool = False, norm_num_groups: int = 32,
                 norm_eps: float = 1e-5, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                 downsample_padding: int = 1, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        levels = len(block_out_channels)
        for name, value in (("cross_attn", cross_attn), ("num_heads", num_heads)):
            if len(value) != levels:
                raise ValueError(f"{name} has {len(value)} entries; expected one per level "
                                 f"({levels}, the length of block_out_channels)")
        for ch, heads in zip(block_out_channels, num_heads):
            if heads < 1 or ch % heads:
                raise ValueError(f"num_heads={heads} must be >= 1 and divide the width {ch}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.num_levels = block_out_channels[0], levels
        self.cross_attention_dim = cross_attention_dim
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        self.dtype, self.remat = dtype, remat

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        emb_dim = 4 * block_out_channels[0]

        def res_block(cin, cout):
            return layers.ResBlock(cin, cout, emb_dim, num_groups=norm_num_groups, eps=norm_eps,
                                   dropout=0.0, time_conditioning="shift", **kw)

        def transformer(ch, heads):
            return Transformer2D(ch, heads, ch // heads, cross_attention_dim,
                                 depth=transformer_depth, num_groups=norm_num_groups,
                                 norm_eps=norm_eps, upcast=upcast_attention, **kw)

        self.conv_in = layers.conv(in_channels, block_out_channels[0], 3, **kw)
        self.time_embedding = layers.TimeEmbedding(block_out_channels[0], emb_dim, **kw)

        skips = [block_out_channels[0]]
        ch = block_out_channels[0]
        down = []
        for i, out_ch in enumerate(block_out_channels):
            block = _Block()
            block.resnets = nnx.List([res_block(ch if j == 0 else out_ch, out_ch)
                                      for j in range(layers_per_block)])
            block.attentions = nnx.List([transformer(out_ch, num_heads[i])
                                         for _ in range(layers_per_block)] if cross_attn[i] else [])
            ch = out_ch
            skips += [ch] * layers_per_block
            last = i == levels - 1
            block.downsamplers = nnx.List([] if last else [layers.Downsample(
                ch, resample="conv", padding=downsample_padding, **kw)])
            skips += [] if last else [ch]
            down.append(block)
        self.down_blocks = nnx.List(down)

        self.mid_block = _Block()
        self.mid_block.resnets = nnx.List([res_block(ch, ch), res_block(ch, ch)])
        self.mid_block.attentions = nnx.List([transformer(ch, num_heads[-1])])

        up = []
        for i in reversed(range(levels)):
            block = _Block()
            out_ch = block_out_channels[i]
            resnets = []
            for _ in range(layers_per_block + 1):
                resnets.append(res_block(ch + skips.pop(), out_ch))
                ch = out_ch
            block.resnets = nnx.List(resnets)
            block.attentions = nnx.List([transformer(ch, num_heads[i]) for _ in resnets]
                                        if cross_attn[i] else [])
            block.upsamplers = nnx.List([layers.Upsample(ch, resample="conv", **kw)]
                                        if i else [])
            up.append(block)
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = layers.group_norm(ch, norm_num_groups, norm_eps, **kw)
        self.conv_out = layers.conv(ch, out_channels, 3, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        """Applies the network.

        Args:
            x: ``[B, H, W, in_channels]`` noisy latents; H and W divisible by ``2**(levels-1)``.
            t: ``[B]`` or scalar timesteps (integer or float; embedded as given).
            cond: ``{"text": [B, S, cross_attention_dim]}`` text-encoder states (other keys
                are ignored).

        Returns:
            ``[B, H, W, out_channels]`` float32.

        Raises:
            ValueError: a shape does not match the model or ``cond["text"]`` is missing.
        """
        b, hgt, wid, c = x.shape
        factor = 2 ** (self.num_levels - 1)
        if hgt % factor or wid % factor or c != self.in_channels:
            raise ValueError(f"x has shape {x.shape}; expected [B, H, W, {self.in_channels}] with "
                             f"H and W divisible by {factor}")
        text = cond.get("text") if isinstance(cond, Mapping) else None
        if text is None or text.ndim != 3 or text.shape[0] != b or \
                text.shape[2] != self.cross_attention_dim:
            raise ValueError(f"cond['text'] must have shape [{b}, S, {self.cross_attention_dim}], "
                             f"got {None if text is None else text.shape}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        emb = layers.timestep_embedding(t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                        freq_shift=self.freq_shift)
        emb = self.time_embedding(emb.astype(self.dtype))
        text = text.astype(self.dtype)

        res = lambda m, h: self._apply(lambda m, h, e: m(h, e), m, h, emb)
        attn = lambda m, h: self._apply(lambda m, h, c: m(h, c), m, h, text)

        h = self.conv_in(x.astype(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = res(resnet, h)
                if len(block.attentions):
                    h = attn(block.attentions[j], h)
                skips.append(h)
            for down in block.downsamplers:
                h = down(h)
                skips.append(h)
        h = res(self.mid_block.resnets[0], h)
        h = res(self.mid_block.resnets[1], attn(self.mid_block.attentions[0], h))
        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = res(resnet, jnp.concatenate([h, skips.pop()], axis=-1))
                if len(block.attentions):
                    h = attn(block.attentions[j], h)
            for upsample in block.upsamplers:
                h = upsample(h)
        h = self.conv_out(nnx.silu(self.conv_norm_out(h)))
        return h.astype(jnp.float32)

    def _apply(self, fn, module, *args):
        """``fn(module, *args)``, rematerialised in the backward pass when ``self.remat``."""
        if self.remat:
            return nnx.remat(fn)(module, *args)
        return fn(module, *args)


class _Block(nnx.Module):
    """One level: ``resnets``, ``attentions`` (one per ResBlock or empty) and ``downsamplers``
    or ``upsamplers`` (empty at the last level)."""
