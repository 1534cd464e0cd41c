"""DiT, the Diffusion Transformer of Peebles & Xie (2023), in Flax NNX.

The network predicts ``f(x_t, t, cond) -> [B, H, W, C]`` from a noisy image (or latent)
``x_t: [B, H, W, C]`` (NHWC), a time value ``t: [B]`` and ``cond = {"label": y [B]}``
(missing: the null label). Module and parameter names follow diffusers'
``DiTTransformer2DModel``, so its checkpoints convert one to one (`diffusion_jax.convert.dit`)::

    tokens = patchify(x) + pos                          [B, T, D]   T = (H / p) (W / p)
    per block (depth of them), with c = t_emb(t) + y_emb(y) of the block's own embedder:
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(silu(c))        each [B, D]
        tokens += gate1 * attn(LN(tokens) (1 + scale1) + shift1)
        tokens += gate2 * mlp(LN(tokens) (1 + scale2) + shift2)
    shift, scale = proj_out_1(silu(c_0))               c_0: block 0's conditioning
    out = unpatchify(proj_out_2(LN(tokens) (1 + scale) + shift))  [B, H, W, out_channels]

``patchify`` is a ``p x p`` convolution with stride ``p``; ``pos`` the fixed 2-D sin-cos table
(`sincos_pos_embed`); ``t_emb`` an MLP on the 256-wide sinusoid of ``t`` (cosines first,
frequency shift 1); ``y_emb`` a table of ``num_classes + 1`` rows whose last row is the null
label of classifier-free guidance (label dropout is the training objective's, as for the UNet).
LN is a LayerNorm without parameters (epsilon 1e-6 before attention and the output, ``norm_eps``
before the MLP, as diffusers). As in diffusers (and unlike the paper's single embedder), every
block owns its time and label embedder; block 0's also conditions the output layer.

adaLN-Zero: every modulation layer (``norm1.linear``, ``proj_out_1``) and the output projection
``proj_out_2`` start at zero, so each block starts as the identity and the network outputs 0.

Learned variance: with ``learn_sigma`` the output has ``2 C`` channels, ``[eps, v]`` as in DiT
(``v`` interpolates the log variance). This project's objectives train ``eps`` only, so
`__call__` returns the first ``C`` channels (diffusers' ``DiTPipeline`` splits them off the same
way) and `predict` returns all of them; the variance half gets no gradient here and stays at
its zero initialisation in models trained here.

Mixed precision: parameters are ``param_dtype``; activations use ``dtype``; norms, the
position table and the output are float32. Every parameter carries logical axis names
(``layers.LOGICAL_AXIS_NAMES``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import attention, layers
from diffusion_jax.models.layers import Dtype

TIME_EMBED_DIM = 256  # width of the sinusoid of t (diffusers' Timesteps(256, True, 1))
COND_KEYS = ("label",)

# DiT-XL/2 of the paper (as diffusers' DiTTransformer2DModel for 256x256 images, i.e. 32x32x4
# latents): 749,826,464 parameters in diffusers' layout (per-block embedders included).
XL_2 = dict(image_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28,
            num_heads=16, num_classes=1000, learn_sigma=True)


class DiT(nnx.Module):
    """DiT, ``(x [B, H, W, C], t [B], cond {"label": [B]}) -> [B, H, W, C]`` float32.

    Args:
        image_size: training resolution (H = W); it sets the position table's base grid.
        in_channels: C.
        patch_size: p; ``image_size`` must be a multiple of it.
        hidden_size: D, the token width; a multiple of 4 (the 2-D sin-cos table) and of
            ``num_heads``.
        depth: number of transformer blocks.
        num_heads: attention heads (width ``D / num_heads`` each).
        mlp_ratio: MLP hidden width ``mlp_ratio * D``.
        num_classes: class labels; 0 = unconditional (no label embedder). The label table has
            ``num_classes + 1`` rows: row ``num_classes`` is the null label.
        learn_sigma: ``2 C`` outputs (noise and variance), see the module docstring.
        norm_eps: epsilon of the LayerNorm before each MLP.
        dtype, param_dtype: compute and parameter dtypes.
        remat: rematerialise each block in the backward pass.
        rngs: parameter RNGs.

    Raises:
        ValueError: an image size that is not a multiple of the patch size, or a width the
            heads or the position table cannot split (each message names the setting).
    """

    def __init__(self, *, image_size: int = 32, in_channels: int = 4, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: int = 4, num_classes: int = 1000, learn_sigma: bool = True,
                 norm_eps: float = 1e-5, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        _check_sizes(image_size, patch_size, hidden_size, num_heads, depth, num_classes)
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.patch_size = patch_size
        self.base_grid = image_size // patch_size
        self.num_classes = num_classes
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = _PatchEmbed(in_channels, hidden_size, patch_size, **kw)
        self.transformer_blocks = nnx.List([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                     norm_eps=norm_eps, **kw) for _ in range(depth)])
        self.proj_out_1 = layers.dense(hidden_size, 2 * hidden_size, zero_init=True, **kw)
        self.proj_out_2 = layers.dense(hidden_size, patch_size**2 * self.out_channels,
                                       zero_init=True, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array] | None = None, *,
                 deterministic: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """The noise prediction: the first ``C`` channels of `predict`, ``[B, H, W, C]``.

        ``deterministic`` and ``dropout_key`` are accepted for the models' common call and
        unused (DiT has no dropout).
        """
        del deterministic, dropout_key
        return self.predict(x, t, cond)[..., :self.in_channels]

    def predict(self, x: jax.Array, t: jax.Array,
                cond: dict[str, jax.Array] | None = None) -> jax.Array:
        """Every output channel (noise, then the variance half when ``learn_sigma``).

        Args:
            x: ``[B, H, W, C]`` with H and W multiples of the patch size.
            t: ``[B]`` (or scalar) timesteps or noise levels, embedded as given.
            cond: ``{"label": int [B]}`` in {0..num_classes}; a missing label is the null one.

        Returns:
            ``[B, H, W, out_channels]`` float32.

        Raises:
            ValueError: a malformed ``x`` or ``cond``.
        """
        b, hgt, wid, _ = x.shape
        p = self.patch_size
        if hgt % p or wid % p or x.shape[-1] != self.in_channels:
            raise ValueError(f"x has shape {x.shape}; expected [B, H, W, {self.in_channels}] "
                             f"with H and W multiples of patch_size={p}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        labels = self._labels(cond, b)
        tokens = self.pos_embed(x.astype(self.dtype), self.base_grid)
        for block in self.transformer_blocks:
            if self.remat:
                tokens = nnx.remat(lambda m, h, tt, y: m(h, tt, y))(block, tokens, t, labels)
            else:
                tokens = block(tokens, t, labels)
        c = self.transformer_blocks[0].norm1.emb(t, labels)
        shift, scale = jnp.split(self.proj_out_1(nnx.silu(c)), 2, axis=-1)
        tokens = _modulate(_layer_norm(tokens, 1e-6), shift, scale)
        out = self.proj_out_2(tokens)                           # [B, T, p * p * out_channels]
        out = out.reshape(b, hgt // p, wid // p, p, p, self.out_channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, hgt, wid, self.out_channels)
        return out.astype(jnp.float32)

    def _labels(self, cond, batch: int) -> jax.Array | None:
        """The ``[B]`` labels of ``cond`` (the null label where absent), None if unconditional."""
        cond = {} if cond is None else cond
        unknown = sorted(set(cond) - set(COND_KEYS))
        if unknown:
            raise ValueError(f"cond has unknown key(s) {unknown}; DiT takes {list(COND_KEYS)}")
        y = cond.get("label")
        if not self.num_classes:
            if y is not None:
                raise ValueError('cond["label"] was given but the DiT is unconditional '
                                 "(num_classes=0)")
            return None
        if y is None:
            return jnp.full((batch,), self.num_classes, jnp.int32)
        if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f'cond["label"] must be int [{batch}], got {y.dtype} {y.shape}')
        return y


class DiTBlock(nnx.Module):
    """One adaLN-Zero block (diffusers' ``BasicTransformerBlock`` with ``ada_norm_zero``).

    Shapes: ``tokens: [B, T, D]``, ``t: [B]``, ``labels: [B]`` or None -> ``[B, T, D]``.
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: int, num_classes: int,
                 norm_eps: float, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_eps = norm_eps
        self.norm1 = _AdaLayerNormZero(dim, num_classes, **kw)
        self.attn1 = attention.Attention(dim, None, num_heads, dim // num_heads, qkv_bias=True,
                                         **kw)
        self.ff = _FeedForward(dim, mlp_ratio * dim, **kw)

    def __call__(self, tokens: jax.Array, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.norm1(t, labels), 6,
                                                                 axis=-1)  # each [B, D]
        h = _modulate(_layer_norm(tokens, 1e-6), shift1, scale1)
        tokens = tokens + gate1[:, None, :] * self.attn1(h)
        h = _modulate(_layer_norm(tokens, self.norm_eps), shift2, scale2)
        return tokens + gate2[:, None, :] * self.ff(h)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, base_grid: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table of DiT / MAE, ``[grid_h * grid_w, dim]`` float32.

    Token ``(i, j)`` (row-major) at positions ``u = j base / grid_w``, ``v = i base / grid_h``
    gets ``[E(u), E(v)]``, with ``E(a) = [sin(a w_k), cos(a w_k)]`` over
    ``w_k = 10000^(-k / (dim / 4))``, ``k < dim / 4`` (diffusers' ``get_2d_sincos_pos_embed``
    with ``base_size = base_grid``; computed in float64).
    """
    quarter = np.arange(dim // 4, dtype=np.float64) / (dim / 4)
    omega = 1.0 / 10000.0**quarter                                         # [D/4]

    def embed(positions):                                                  # [M] -> [M, D/2]
        angles = np.outer(positions, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    u = np.arange(grid_w, dtype=np.float64) / (grid_w / base_grid)
    v = np.arange(grid_h, dtype=np.float64) / (grid_h / base_grid)
    uu, vv = np.meshgrid(u, v)                                             # [grid_h, grid_w]
    return np.concatenate([embed(uu.ravel()), embed(vv.ravel())], axis=1).astype(np.float32)


def _check_sizes(image_size, patch_size, hidden_size, num_heads, depth, num_classes):
    """ValueError naming the first setting the network cannot be built with."""
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide hidden_size={hidden_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 (the 2-D sin-cos "
                         "position table)")
    if depth < 1 or num_classes < 0:
        raise ValueError(f"depth={depth} must be >= 1 and num_classes={num_classes} >= 0")


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without scale or bias, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x (1 + scale) + shift`` with ``x: [B, T, D]`` and ``shift, scale: [B, D]``."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


@functools.lru_cache(maxsize=32)
def _pos_table(dim: int, grid_h: int, grid_w: int, base_grid: int) -> np.ndarray:
    return sincos_pos_embed(dim, grid_h, grid_w, base_grid)


class _PatchEmbed(nnx.Module):
    """``proj`` (``p x p`` conv, stride p) then the sin-cos table: ``[B, H, W, C] -> [B, T, D]``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        self.dim = dim
        self.proj = layers.conv(in_channels, dim, patch_size, strides=patch_size,
                                padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, base_grid: int) -> jax.Array:
        h = self.proj(x)                                                   # [B, H/p, W/p, D]
        b, gh, gw, _ = h.shape
        pos = jnp.asarray(_pos_table(self.dim, gh, gw, base_grid))
        return (h.reshape(b, gh * gw, self.dim).astype(jnp.float32) + pos).astype(h.dtype)


class _AdaLayerNormZero(nnx.Module):
    """The block's conditioning ``c = emb(t, y)`` and its six modulations ``linear(silu(c))``,
    ``[B] -> [B, 6 D]`` (``linear`` zero-initialised)."""

    def __init__(self, dim: int, num_classes: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.emb = _TimestepLabelEmbedding(dim, num_classes, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs)
        self.linear = layers.dense(dim, 6 * dim, zero_init=True, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

    def __call__(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        return self.linear(nnx.silu(self.emb(t, labels)))


class _TimestepLabelEmbedding(nnx.Module):
    """``c = timestep_embedder(sinusoid(t)) + class_embedder(y)``, ``[B] -> [B, D]``."""

    def __init__(self, dim: int, num_classes: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.timestep_embedder = layers.TimeEmbedding(TIME_EMBED_DIM, dim, dtype=dtype,
                                                      param_dtype=param_dtype, rngs=rngs)
        self.class_embedder = _LabelEmbedding(num_classes, dim, dtype=dtype,
                                              param_dtype=param_dtype,
                                              rngs=rngs) if num_classes else None

    def __call__(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        sinusoid = layers.timestep_embedding(t, TIME_EMBED_DIM, flip_sin_to_cos=True,
                                             freq_shift=1.0)
        c = self.timestep_embedder(sinusoid.astype(self.dtype))
        return c if self.class_embedder is None else c + self.class_embedder(labels)


class _LabelEmbedding(nnx.Module):
    """``embedding_table``: ``num_classes + 1`` rows (the last: null label), normal(0.02)."""

    def __init__(self, num_classes: int, dim: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.embedding_table = nnx.Embed(
            num_classes + 1, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=layers.with_axes(nnx.initializers.normal(0.02), ("vocab", "embed")))

    def __call__(self, labels: jax.Array) -> jax.Array:
        return self.embedding_table(labels)


class _FeedForward(nnx.Module):
    """diffusers ``FeedForward`` with tanh-GELU: ``net[2](gelu(net[0].proj(x)))``,
    ``[B, T, D] -> [B, T, D]`` (``net[1]``, diffusers' dropout, has no parameters)."""

    def __init__(self, dim: int, inner: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List([_GELUProj(dim, inner, **kw), None,
                             layers.dense(inner, dim, axes=("mlp", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class _GELUProj(nnx.Module):
    """``gelu_tanh(proj(x))``, ``[B, T, D] -> [B, T, F]``."""

    def __init__(self, dim: int, inner: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.proj = layers.dense(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)
