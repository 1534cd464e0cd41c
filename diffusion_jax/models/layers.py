"""Building blocks of the DDPM/ADM UNet in Flax NNX.

Every block takes and returns NHWC activations ``[B, H, W, C]``. Parameters are
created in ``param_dtype`` (float32) and cast to the compute ``dtype`` (e.g.
bfloat16) when applied; group-norm statistics are always computed in float32. The
attention block lives in ``attention.py`` beside the other attention layers.

Every parameter carries logical axis names in its ``out_sharding`` metadata (see
``LOGICAL_AXIS_NAMES``), so one rules table can map them to mesh axes, e.g.::

    with nnx.logical_axis_rules([("conv_out", "fsdp"), ("mlp", "fsdp"), ...]):
        pspecs = nnx.get_partition_spec(nnx.state(model, nnx.Param))

The names are annotations only: the parameters are created unsharded
(``eager_sharding=False``) and the blocks know nothing of meshes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names used by the parameters of this package (and their meaning):
#   "conv_in"  input-feature axis of a convolution kernel   [kh, kw, conv_in, conv_out]
#   "conv_out" output-feature axis of a convolution kernel and its bias
#   "embed"    input axis of a dense layer and the feature axis of embedding tables
#   "mlp"      output axis of a dense layer (time MLP, time projections) and its bias
#   "heads"    the (heads x head_dim) axis of the attention q/k/v/output projections
#   "norm"     the channel axis of group-norm scales and biases
#   "vocab"    the row axis of the class-label embedding table
# Spatial kernel axes are annotated None (never sharded).
LOGICAL_AXIS_NAMES = ("conv_in", "conv_out", "embed", "mlp", "heads", "norm", "vocab")

Dtype = jnp.dtype | type

_DEFAULT_INIT = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_ZERO_INIT = nnx.initializers.zeros_init()


def with_axes(init, names: Sequence[str | None]):
    """Wraps an initializer so its parameter carries logical axis ``names``.

    Args:
      init: a ``jax.nn.initializers`` initializer.
      names: one logical axis name (or None) per parameter dimension.

    Returns:
      The initializer with ``out_sharding=names`` metadata and eager sharding off.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def conv(in_features: int, out_features: int, kernel_size: int, *, strides: int = 1,
         padding="SAME", zero_init: bool = False, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with kernel ``[k, k, in, out]`` annotated (None, None, "conv_in", "conv_out").

    Args:
      in_features, out_features: channel counts.
      kernel_size: square kernel size k.
      strides: spatial stride.
      padding: "SAME" (TensorFlow convention: for stride 2 on an even size, pad 0 before
        and 1 after), "VALID", or explicit ``((top, bottom), (left, right))``.
      zero_init: initialise the kernel to zero (residual-branch outputs, ADM style);
        otherwise variance scaling (fan_avg, uniform) as in DDPM.
      dtype, param_dtype: compute and parameter dtypes.
      rngs: parameter RNGs.
    """
    return nnx.Conv(
        in_features, out_features, (kernel_size, kernel_size), strides=strides,
        padding=padding, dtype=dtype, param_dtype=param_dtype,
        kernel_init=with_axes(_ZERO_INIT if zero_init else _DEFAULT_INIT,
                              (None, None, "conv_in", "conv_out")),
        bias_init=with_axes(_ZERO_INIT, ("conv_out",)), rngs=rngs)


def dense(in_features: int, out_features: int, *, axes=("embed", "mlp"), zero_init: bool = False,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer ``y = x W + b`` with ``W: [in, out]`` annotated ``axes`` and ``b`` annotated ``axes[1]``."""
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype,
        kernel_init=with_axes(_ZERO_INIT if zero_init else _DEFAULT_INIT, axes),
        bias_init=with_axes(_ZERO_INIT, (axes[1],)), rngs=rngs)


def group_norm(num_features: int, num_groups: int, eps: float, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """Group normalisation over ``[H, W, C/G]`` per group; scale and bias annotated ("norm",).

    Raises:
      ValueError: if ``num_features`` is not divisible by ``num_groups``.
    """
    if num_features % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count {num_features}")
    return nnx.GroupNorm(
        num_features, num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
        scale_init=with_axes(nnx.initializers.ones_init(), ("norm",)),
        bias_init=with_axes(_ZERO_INIT, ("norm",)), rngs=rngs)


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of a (possibly fractional) time value, as in DDPM.

    With ``h = dim // 2`` and ``f_i = exp(-log(max_period) * i / (h - freq_shift))``:

        emb(t) = [sin(t f_0), ..., sin(t f_{h-1}), cos(t f_0), ..., cos(t f_{h-1})]

    (cos first when ``flip_sin_to_cos``; a zero column is appended when ``dim`` is odd).
    DDPM uses ``freq_shift=1, flip_sin_to_cos=False``; ADM/diffusers' default is
    ``freq_shift=0, flip_sin_to_cos=True``.

    Args:
      t: ``[B]`` times (integer timesteps or float noise levels).
      dim: embedding width.
      flip_sin_to_cos: put the cosines first.
      freq_shift: the shift in the frequency denominator.
      max_period: the longest period.

    Returns:
      ``[B, dim]`` float32 embedding.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimeEmbedding(nnx.Module):
    """Two-layer MLP on the sinusoidal embedding: ``dense2(silu(dense1(emb)))``, ``[B, D] -> [B, E]``."""

    def __init__(self, in_dim: int, emb_dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.dense1 = dense(in_dim, emb_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense2 = dense(emb_dim, emb_dim, axes=("mlp", "embed"), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, emb: jax.Array) -> jax.Array:
        return self.dense2(nnx.silu(self.dense1(emb)))


class ResBlock(nnx.Module):
    """Residual block conditioned on the time (and class) embedding.

    ``h = conv1(silu(norm1(x)))``; then, with ``e = dense(silu(emb))``,
    "shift" (DDPM, diffusers "default"): ``h = silu(norm2(h + e))``;
    "scale_shift" (ADM): ``[s, b] = e``, ``h = silu(norm2(h) * (1 + s) + b)``;
    then ``out = skip(x) + conv2(dropout(h))`` where ``skip`` is a 1x1 conv when the
    channel count changes and the identity otherwise.

    Shapes: ``x: [B, H, W, in_ch]``, ``emb: [B, E]`` -> ``[B, H, W, out_ch]``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, num_groups: int, eps: float,
                 dropout: float, time_conditioning: str, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        if time_conditioning not in ("shift", "scale_shift"):
            raise ValueError(f"time_conditioning must be 'shift' or 'scale_shift', got {time_conditioning!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale_shift = time_conditioning == "scale_shift"
        self.norm1 = group_norm(in_ch, num_groups, eps, **kw)
        self.conv1 = conv(in_ch, out_ch, 3, **kw)
        self.emb_proj = dense(emb_dim, out_ch * (2 if self.scale_shift else 1), **kw)
        self.norm2 = group_norm(out_ch, num_groups, eps, **kw)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv(out_ch, out_ch, 3, zero_init=True, **kw)
        self.skip = conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, emb: jax.Array, dropout_key: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        e = self.emb_proj(nnx.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.dropout(nnx.silu(h), deterministic=deterministic, rngs=dropout_key)
        h = self.conv2(h)
        skip = x if self.skip is None else self.skip(x)
        return skip + h


class Downsample(nnx.Module):
    """Halves H and W: a 3x3 stride-2 conv (``resample="conv"``) or a 2x2 average pool ("pool").

    ``padding=0`` pads one row/column after (TensorFlow "SAME", as DDPM); ``padding=1``
    pads one on each side (diffusers ``downsample_padding=1``). Shapes:
    ``[B, H, W, C] -> [B, H/2, W/2, C]``.
    """

    def __init__(self, channels: int, *, resample: str, padding: int, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        if padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {padding!r}")
        pad = "SAME" if padding == 0 else ((1, 1), (1, 1))
        self.conv = conv(channels, channels, 3, strides=2, padding=pad, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs) if resample == "conv" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is None:
            return nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.conv(x)


class Upsample(nnx.Module):
    """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv when ``resample="conv"``.

    Shapes: ``[B, H, W, C] -> [B, 2H, 2W, C]``.
    """

    def __init__(self, channels: int, *, resample: str, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs) if resample == "conv" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x if self.conv is None else self.conv(x)
