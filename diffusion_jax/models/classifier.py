"""A small time-conditioned image classifier ``f(x_t, t) -> logits`` for classifier guidance.

The encoder half of the UNet, built from the same blocks (:mod:`diffusion_jax.models.layers`)::

    emb    = TimeEmbedding(sinusoid(t))                                    [B, 4 * base]
    h      = conv_in(x)                                                     [B, H, W, base]
    levels: per level i, one ResBlock(h, emb) of width base * channel_mult[i], then a
            stride-2 Downsample except at the last level
    logits = head(mean_{H, W} silu(norm(h)))                                [B, K]

Like the UNet it knows nothing of schedules: ``t`` is whatever time value the caller uses.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers


class NoisyClassifier(nnx.Module):
    """Classifier of noisy images ``x_t [B, H, W, C]`` at timestep ``t [B]``: ``-> logits [B, K]``.

    Args:
        image_size: input height and width; divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: input channels ``C``.
        num_classes: number of logits ``K``.
        base_channels: width of the first level; level ``i`` has width
            ``base_channels * channel_mult[i]``.
        channel_mult: per-level width multipliers.
        num_groups: GroupNorm groups (must divide every level's width).
        rngs: ``nnx.Rngs`` for initialisation.

    Raises:
        ValueError: if ``image_size`` does not halve cleanly through the levels.
    """

    def __init__(self, *, image_size, in_channels, num_classes, base_channels=32,
                 channel_mult=(1, 2), num_groups=8, rngs):
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by "
                             f"2 ** (len(channel_mult) - 1) = {factor}.")
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = layers.TimeEmbedding(base_channels, emb_dim, **kw)
        self.conv_in = layers.conv(in_channels, base_channels, 3, **kw)
        blocks, downs = [], []
        channels = base_channels
        for level, mult in enumerate(channel_mult):
            width = base_channels * mult
            blocks.append(layers.ResBlock(channels, width, emb_dim, num_groups=num_groups, eps=1e-6,
                                          dropout=0.0, time_conditioning="shift", **kw))
            last = level == len(channel_mult) - 1
            downs.append(None if last else
                         layers.Downsample(width, resample="conv", padding=1, **kw))
            channels = width
        self.blocks = nnx.List(blocks)
        self.downs = nnx.List(downs)
        self.norm_out = layers.group_norm(channels, num_groups, 1e-6, **kw)
        self.head = layers.dense(channels, num_classes, axes=("embed", "vocab"), **kw)

    def __call__(self, x, t):
        """Logits ``[B, K]`` for ``x: [B, H, W, C]`` and ``t: [B]``."""
        emb = self.time_embed(layers.timestep_embedding(t, self.base_channels))   # [B, E]
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs):
            h = block(h, emb)
            if down is not None:
                h = down(h)                                                   # [B, H/2, W/2, ch]
        h = jax.nn.silu(self.norm_out(h)).mean(axis=(1, 2))                  # [B, ch]
        return self.head(h)
