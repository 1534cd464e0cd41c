"""Attention layers shared by the text encoder and the conditional UNet (Flax NNX).

All attention goes through `dot_product_attention`, a thin wrapper over
``jax.nn.dot_product_attention`` (so GPUs can pick a fused kernel). Module and parameter
names follow diffusers' ``Attention`` / ``BasicTransformerBlock`` / ``Transformer2DModel``
so a checkpoint maps onto them by name.

Shapes: sequences are ``[B, T, D]``; images are NHWC ``[B, H, W, C]``. Parameters carry the
logical axis names of ``layers.LOGICAL_AXIS_NAMES``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.layers import Dtype


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          upcast: bool = False) -> jax.Array:
    """Multi-head scaled dot-product attention ``softmax(q k^T / sqrt(d)) v``.

    Args:
        q: ``[B, T, N, d]`` queries (N heads of width d).
        k, v: ``[B, S, N, d]`` keys and values.
        mask: optional boolean mask broadcastable to ``[B, N, T, S]`` (True = attend).
        is_causal: also mask key positions after the query position.
        upcast: compute in float32 whatever the input dtype (diffusers' ``upcast_attention``).

    Returns:
        ``[B, T, N, d]`` in the dtype of ``v``.
    """
    dtype = v.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return out.astype(dtype)


def layer_norm(dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with scale and bias annotated ("norm",); exact variance."""
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=layers.with_axes(nnx.initializers.ones_init(), ("norm",)),
        bias_init=layers.with_axes(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class Attention(nnx.Module):
    """diffusers ``Attention``: ``to_out(attn(to_q(x), to_k(c), to_v(c)))`` with N heads.

    ``q = x W_q``, ``k = c W_k``, ``v = c W_v`` (``c = x`` for self-attention), split into
    ``heads`` heads of width ``head_dim``;
    ``out = concat_heads(softmax(q k^T / sqrt(d)) v) W_o + b_o``.

    Shapes: ``x: [B, T, query_dim]``, ``context: [B, S, context_dim]`` -> ``[B, T, query_dim]``.

    Args:
        query_dim: width of x.
        context_dim: width of the context (None = self-attention, ``query_dim``).
        heads, head_dim: number and width of the heads.
        qkv_bias: biases on the q/k/v projections (False in SD's UNet).
        upcast: attention in float32.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, *,
                 qkv_bias: bool = False, upcast: bool = False, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        inner = heads * head_dim
        kv_dim = context_dim or query_dim
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        qkv = lambda din: _linear(din, inner, ("embed", "heads"), qkv_bias, dtype, param_dtype,
                                  rngs)
        self.to_q, self.to_k, self.to_v = qkv(query_dim), qkv(kv_dim), qkv(kv_dim)
        self.to_out = nnx.List([_linear(inner, query_dim, ("heads", "embed"), True, dtype,
                                        param_dtype, rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)
        out = dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                    split(self.to_v(context)), upcast=self.upcast)
        return self.to_out[0](out.reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nnx.Module):
    """``proj(x) = [h, g]``; returns ``h * gelu(g)`` (exact erf GELU); ``[B, T, D] -> [B, T, F]``.
    """

    def __init__(self, dim: int, inner: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.proj = _linear(dim, 2 * inner, ("embed", "mlp"), True, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net[2](net[0](x))``, inner width ``4 * dim``."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        inner = mult * dim
        # net[1] is diffusers' dropout (no parameters): a placeholder keeps the indices aligned.
        self.net = nnx.List([
            GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            None,
            _linear(inner, dim, ("mlp", "embed"), True, dtype, param_dtype, rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN block: ``x += attn1(norm1(x)); x += attn2(norm2(x), text); x += ff(norm3(x))``.

    Shapes: ``x: [B, T, dim]``, ``context: [B, S, context_dim]`` -> ``[B, T, dim]``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *,
                 norm_eps: float = 1e-5, upcast: bool = False, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, norm_eps, **kw)
        self.attn1 = Attention(dim, None, heads, head_dim, upcast=upcast, **kw)
        self.norm2 = layer_norm(dim, norm_eps, **kw)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast=upcast, **kw)
        self.norm3 = layer_norm(dim, norm_eps, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """diffusers ``Transformer2DModel`` on continuous inputs (SD's spatial transformer).

    ``h = proj_in(GroupNorm(x))`` over the H*W positions, ``depth`` x `BasicTransformerBlock`
    with cross-attention to ``context``, then ``out = x + proj_out(h)``. ``proj_in`` /
    ``proj_out`` are per-position dense layers: a 1x1 convolution (``use_linear_projection=False``)
    is the same map, and the converter reshapes its ``[out, in, 1, 1]`` kernel.

    Shapes: ``x: [B, H, W, C]``, ``context: [B, S, context_dim]`` -> ``[B, H, W, C]``.

    Args:
        channels: C; the inner width is ``heads * head_dim``.
        heads, head_dim: attention heads and their width.
        context_dim: width of the text states.
        depth: number of transformer blocks.
        num_groups: GroupNorm groups (epsilon 1e-6 as diffusers).
        upcast: attention in float32.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, *,
                 depth: int = 1, num_groups: int = 32, norm_eps: float = 1e-5,
                 upcast: bool = False, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        self.norm = layers.group_norm(channels, num_groups, 1e-6, **kw)
        self.proj_in = _linear(channels, inner, ("embed", "mlp"), True, dtype, param_dtype, rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, head_dim, context_dim, norm_eps=norm_eps,
                                  upcast=upcast, **kw) for _ in range(depth)])
        self.proj_out = _linear(inner, channels, ("mlp", "embed"), True, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.proj_in(self.norm(x).reshape(b, hgt * wid, c))
        context = context.astype(h.dtype)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(b, hgt, wid, c)


def _linear(din: int, dout: int, axes, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    """A dense layer with logical axes ``axes`` on its kernel (and ``axes[1]`` on its bias)."""
    if bias:
        return layers.dense(din, dout, axes=axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=layers.with_axes(nnx.initializers.lecun_normal(), axes),
                      rngs=rngs)
