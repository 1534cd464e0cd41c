"""DDPM/ADM-style UNet in Flax NNX.

The network predicts ``f(x_t, t, cond) -> [B, H, W, out_channels]`` from a noisy image
``x_t: [B, H, W, C]`` (NHWC), a time value ``t: [B]`` and the condition pytree
``cond = {"label": y [B], "image": c [B, H, W, Cc]}`` (missing keys: absent): class labels
``y`` and a conditioning image ``c`` concatenated to the input channels. It knows nothing of schedules, losses or meshes.

Structure (mirrors diffusers' ``UNet2DModel`` so its checkpoints convert one to one)::

    emb  = dense2(silu(dense1(sinusoid(t)))) + class_embed(y)           [B, 4 * base]
    h    = conv_in(concat(x, c))                                        [B, H, W, base]
    down: per level i (resolution image_size / 2^i, width base * channel_mult[i]):
          num_res_blocks x (ResBlock [+ attention]), then Downsample except at the last level;
          every output is kept as a skip connection
    mid:  ResBlock, attention, ResBlock
    up:   per level (lowest resolution first): num_res_blocks + 1 x
          (concat skip, ResBlock [+ attention]), then Upsample except at the last level
    out  = conv_out(silu(norm_out(h)))                                  [B, H, W, out_channels]

Mixed precision: parameters are ``param_dtype`` (float32); activations use ``dtype``
(e.g. bfloat16); the output is always float32.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import attention, layers
from diffusion_jax.models.layers import LOGICAL_AXIS_NAMES

__all__ = ["DTYPES", "LAYOUTS", "LOGICAL_AXIS_NAMES", "UNet", "count_params", "layout_kwargs",
           "unet_from_config"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
COND_KEYS = ("label", "image")  # the condition kinds this UNet accepts in ``cond``

# Named layouts: UNet keyword arguments (image_size included; in_channels defaults to 3).
LAYOUTS: dict[str, dict[str, Any]] = {
    # Ho et al. (2020) CIFAR-10 model = diffusers google/ddpm-cifar10-32: 35,746,307 parameters.
    "ddpm_cifar10": dict(image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_groups=32),
    # Ho et al. (2020) 256x256 model (LSUN / CelebA-HQ) = google/ddpm-church-256 layout.
    "ddpm_256": dict(image_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                     num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, num_groups=32),
    # A ~1M-parameter model for tests and CPU smoke runs.
    "tiny": dict(image_size=16, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 attn_resolutions=(8,), dropout=0.1, num_groups=8),
}


def layout_kwargs(name: str, **overrides) -> dict[str, Any]:
    """Returns the UNet keyword arguments of a named layout, updated with ``overrides``.

    Raises:
      ValueError: if ``name`` is not a key of ``LAYOUTS``.
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown UNet layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return {**LAYOUTS[name], **overrides}


class UNet(nnx.Module):
    """DDPM/ADM UNet, ``(x [B,H,W,C], t [B], y [B], cond_image [B,H,W,Cc]) -> [B,H,W,out] float32``.

    Args:
      image_size: training resolution; decides which levels get attention.
      in_channels: image channels C.
      out_channels: output channels (default ``in_channels``; 2C for learned variances).
      base_channels: width of the first level; the time embedding has 4x this width.
      channel_mult: width multiplier per resolution level.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: resolutions (e.g. 16 for 16x16) that get self-attention.
      num_heads: attention heads (ignored when ``num_head_channels`` is set).
      dropout: dropout rate inside residual blocks.
      num_groups: group-norm groups.
      resample: "conv" (stride-2 conv down, nearest + conv up) or "pool" (2x2 average pool
        down, nearest up, no parameters).
      num_classes: number of class labels; 0 for an unconditional model. The label table has
        ``num_classes + 1`` rows: row ``num_classes`` is the null label (classifier-free guidance).
      cond_image_channels: channels of an image concatenated to the input (0 = none).
      time_input: "discrete" (integer timesteps ``t`` in {0..T-1}) or "continuous" (a float
        noise level). In both cases the sinusoidal embedding is applied to the value as given,
        so a continuous caller should pass a suitably scaled value, e.g. ``1000 * t`` for
        ``t`` in [0, 1] or ``log(sigma) / 4`` as in NCSN++.
      dtype: compute dtype (e.g. ``jnp.bfloat16``).
      param_dtype: parameter dtype.
      remat: rematerialise each residual / attention block in the backward pass.
      num_head_channels: if set, heads per block = channels // num_head_channels (ADM and
        diffusers ``attention_head_dim``).
      time_conditioning: "shift" (DDPM; diffusers "default") or "scale_shift" (ADM).
      norm_eps: group-norm epsilon.
      flip_sin_to_cos, freq_shift: sinusoidal-embedding options (see
        ``layers.timestep_embedding``); the defaults reproduce DDPM.
      downsample_padding: 0 pads the stride-2 conv one pixel after (TF "SAME", DDPM);
        1 pads one pixel on each side.
      rngs: parameter RNGs.

    Raises:
      ValueError: on an invalid option, naming it.
    """

    def __init__(self, *, image_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
                 base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
                 num_heads: int = 1, dropout: float = 0.1, num_groups: int = 32,
                 resample: str = "conv", num_classes: int = 0, cond_image_channels: int = 0,
                 time_input: str = "discrete", dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, num_head_channels: int | None = None,
                 time_conditioning: str = "shift", norm_eps: float = 1e-6,
                 flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                 downsample_padding: int = 0, rngs: nnx.Rngs):
        resolutions = _check_options(image_size, channel_mult, attn_resolutions, resample,
                                     time_input, num_classes, cond_image_channels, dropout)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.num_levels = len(channel_mult)
        self.num_classes = num_classes
        self.cond_image_channels = cond_image_channels
        self.time_input = time_input
        self.dropout = dropout
        self.dtype = dtype
        self.remat = remat
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        emb_dim = 4 * base_channels

        def res_block(cin, cout):
            return layers.ResBlock(cin, cout, emb_dim, num_groups=num_groups, eps=norm_eps,
                                   dropout=dropout, time_conditioning=time_conditioning, **kw)

        def attn_block(ch):
            heads = num_heads
            if num_head_channels is not None:
                if ch % num_head_channels:
                    raise ValueError(f"num_head_channels={num_head_channels} must divide the width {ch}")
                heads = ch // num_head_channels
            return attention.AttentionBlock(ch, heads, num_groups=num_groups, eps=norm_eps, **kw)

        self.time_embed = layers.TimeEmbedding(base_channels, emb_dim, **kw)
        self.class_embed = nnx.Embed(
            num_classes + 1, emb_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=layers.with_axes(nnx.initializers.normal(1.0), ("vocab", "embed")),
        ) if num_classes else None
        self.conv_in = layers.conv(in_channels + cond_image_channels, base_channels, 3, **kw)

        self.down, chans, ch = _down_levels(base_channels, channel_mult, num_res_blocks, resolutions,
                                        attn_resolutions, res_block, attn_block,
                                        lambda ch: layers.Downsample(
                                            ch, resample=resample, padding=downsample_padding, **kw))
        self.mid = _Level()
        self.mid.res = nnx.List([res_block(ch, ch), res_block(ch, ch)])
        self.mid.attn = nnx.List([attn_block(ch)])
        self.mid.resample = None

        self.up = _up_levels(base_channels, channel_mult, num_res_blocks, resolutions,
                             attn_resolutions, res_block, attn_block, chans,
                             lambda ch: layers.Upsample(ch, resample=resample, **kw))
        ch = base_channels * channel_mult[0]
        self.norm_out = layers.group_norm(ch, num_groups, norm_eps, **kw)
        self.conv_out = layers.conv(ch, self.out_channels, 3, zero_init=True, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array] | None = None, *,
                 deterministic: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """Applies the network.

        Args:
            x: ``[B, H, W, in_channels]`` noisy images; H and W divisible by ``2**(levels-1)``.
            t: ``[B]`` (or scalar) integer timesteps (``time_input="discrete"``; a float dtype
                raises) or float noise levels (``time_input="continuous"``).
            cond: the condition pytree, a dict with any of (a missing key means absent):
                ``"label"``: int ``[B]`` labels in {0..num_classes}; ``num_classes`` is the null
                label and a missing label means all-null. Only for class-conditional models.
                ``"image"``: ``[B, H, W, cond_image_channels]``, concatenated to ``x``; required
                iff ``cond_image_channels > 0``.
                Any other key raises (this model has no text conditioning).
            deterministic: disable dropout.
            dropout_key: PRNG key for dropout; required when ``deterministic=False`` and
                dropout > 0.

        Returns:
            ``[B, H, W, out_channels]`` float32.

        Raises:
            ValueError: for a malformed ``x``, ``t`` dtype or ``cond`` (unknown key, wrong shape,
                a label for an unconditional model, a missing or unexpected image).
        """
        b, hgt, wid, c = x.shape
        factor = 2 ** (self.num_levels - 1)
        if hgt % factor or wid % factor or c != self.in_channels:
            raise ValueError(f"x has shape {x.shape}; expected [B, H, W, {self.in_channels}] with H and "
                             f"W divisible by {factor}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        if self.time_input == "discrete" and not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"time_input='discrete' expects integer timesteps t, got {t.dtype}; "
                             "build the model with time_input='continuous' for float noise levels")
        y, cond_image = self._unpack_cond(cond, x.shape)
        if not deterministic and self.dropout > 0 and dropout_key is None:
            raise ValueError("dropout_key is required when deterministic=False and dropout > 0")

        emb = layers.timestep_embedding(t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                        freq_shift=self.freq_shift)
        emb = self.time_embed(emb.astype(self.dtype))
        if self.class_embed is not None:
            labels = jnp.full((b,), self.num_classes, jnp.int32) if y is None else y
            emb = emb + self.class_embed(labels)
        if self.cond_image_channels:
            x = jnp.concatenate([x, cond_image.astype(x.dtype)], axis=-1)

        counter = itertools.count()
        def res(block, h):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, next(counter))
            return self._apply(lambda m, h, e, k: m(h, e, k, deterministic), block, h, emb, key)

        def attn(level, j, h):
            return self._apply(lambda m, h: m(h), level.attn[j], h) if len(level.attn) else h

        h = self.conv_in(x.astype(self.dtype))
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = attn(level, j, res(block, h))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = res(self.mid.res[1], attn(self.mid, 0, res(self.mid.res[0], h)))

        for level in self.up:
            for j, block in enumerate(level.res):
                h = attn(level, j, res(block, jnp.concatenate([h, skips.pop()], axis=-1)))
            if level.resample is not None:
                h = level.resample(h)

        h = self.conv_out(nnx.silu(self.norm_out(h)))
        return h.astype(jnp.float32)

    def _unpack_cond(self, cond, x_shape):
        """``(labels [B] or None, cond_image [B, H, W, Cc] or None)`` from ``cond``, checked."""
        cond = {} if cond is None else cond
        unknown = sorted(set(cond) - set(COND_KEYS))
        if unknown:
            raise ValueError(f"cond has unknown key(s) {unknown}; this UNet takes {list(COND_KEYS)}")
        b, hgt, wid, _ = x_shape
        y, cond_image = cond.get("label"), cond.get("image")
        if y is not None:
            if self.class_embed is None:
                raise ValueError('cond["label"] was given but the model is unconditional '
                                 "(num_classes=0)")
            if y.shape != (b,) or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f'cond["label"] must be int [{b}], got {y.dtype} {y.shape}')
        image_shape = (b, hgt, wid, self.cond_image_channels)
        if self.cond_image_channels and (cond_image is None or cond_image.shape != image_shape):
            raise ValueError(f'cond["image"] must have shape {image_shape}, '
                             f"got {None if cond_image is None else cond_image.shape}")
        if not self.cond_image_channels and cond_image is not None:
            raise ValueError('cond["image"] was given but cond_image_channels=0')
        return y, cond_image

    def _apply(self, fn, module, *args):
        """``fn(module, *args)``, rematerialised in the backward pass when ``self.remat``."""
        if self.remat:
            return nnx.remat(fn)(module, *args)
        return fn(module, *args)


class _Level(nnx.Module):
    """Container of one resolution level: ``res`` (ResBlocks), ``attn`` (one per ResBlock or
    empty) and ``resample`` (Downsample / Upsample or None)."""


def unet_from_config(model_cfg, *, image_size: int | None = None, in_channels: int | None = None,
                     num_classes: int = 0, rngs: nnx.Rngs) -> UNet:
    """Builds a UNet from the ``config.model`` section.

    Args:
      model_cfg: ConfigDict (or mapping) whose fields are UNet keyword arguments, plus
        ``class_conditional`` (bool), ``cond_drop_prob`` (ignored here: the training step drops
        labels) and ``dtype`` / ``param_dtype`` as strings ("float32" | "bfloat16" | "float16").
      image_size, in_channels: from ``config.data`` (override fields of the same name in
        ``model_cfg``).
      num_classes: ``config.data.num_classes``; used only when ``class_conditional``.
      rngs: parameter RNGs.

    Raises:
      ValueError: for an unknown field, an unknown dtype name, a missing image size / channel
        count, or ``class_conditional`` without ``num_classes > 0``.
    """
    fields = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    class_conditional = fields.pop("class_conditional", False)
    fields.pop("cond_drop_prob", None)
    if class_conditional and num_classes <= 0:
        raise ValueError("model.class_conditional=True needs num_classes > 0 (config.data.num_classes)")
    fields["num_classes"] = num_classes if class_conditional else 0
    for name, value in (("image_size", image_size), ("in_channels", in_channels)):
        if value is not None:
            fields[name] = value
        elif name not in fields:
            raise ValueError(f"unet_from_config needs {name} (from config.data)")
    for name in ("dtype", "param_dtype"):
        if isinstance(fields.get(name), str):
            if fields[name] not in DTYPES:
                raise ValueError(f"model.{name}={fields[name]!r}; expected one of {sorted(DTYPES)}")
            fields[name] = DTYPES[fields[name]]
    for name in ("channel_mult", "attn_resolutions"):
        if name in fields:
            fields[name] = tuple(fields[name])
    allowed = set(inspect.signature(UNet.__init__).parameters) - {"self", "rngs"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; UNet accepts {sorted(allowed)}")
    return UNet(**fields, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) of ``model`` (works on abstract models)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _check_options(image_size, channel_mult, attn_resolutions, resample, time_input, num_classes,
                   cond_image_channels, dropout) -> list[int]:
    """Validates `UNet`'s options; returns the resolution of each level (``image_size / 2^i``)."""
    if resample not in ("conv", "pool"):
        raise ValueError(f"resample must be 'conv' or 'pool', got {resample!r}")
    if time_input not in ("discrete", "continuous"):
        raise ValueError(f"time_input must be 'discrete' or 'continuous', got {time_input!r}")
    if num_classes < 0 or cond_image_channels < 0:
        raise ValueError(f"num_classes ({num_classes}) and cond_image_channels "
                         f"({cond_image_channels}) must be >= 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    unknown = sorted(set(attn_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(f"attn_resolutions {unknown} match no level; the levels of "
                         f"image_size={image_size} have resolutions {resolutions}")
    return resolutions


def _down_levels(base_channels, channel_mult, num_res_blocks, resolutions, attn_resolutions,
                 res_block, attn_block, downsample):
    """The down path's levels, the widths of its skip connections in the order they are made, and
    its output width. Modules are created in the order of the
    forward pass, which fixes which parameter RNG draws each one gets.
    """
    chans = [base_channels]
    ch = base_channels
    levels = []
    for i, mult in enumerate(channel_mult):
        level = _Level()
        out_ch = base_channels * mult
        level.res = nnx.List([res_block(ch if j == 0 else out_ch, out_ch)
                              for j in range(num_res_blocks)])
        use_attn = resolutions[i] in attn_resolutions
        level.attn = nnx.List([attn_block(out_ch) for _ in range(num_res_blocks)] if use_attn else [])
        ch = out_ch
        chans += [ch] * num_res_blocks
        last = i == len(channel_mult) - 1
        level.resample = None if last else downsample(ch)
        chans += [] if last else [ch]
        levels.append(level)
    return nnx.List(levels), chans, ch


def _up_levels(base_channels, channel_mult, num_res_blocks, resolutions, attn_resolutions,
               res_block, attn_block, chans, upsample):
    """The up path's levels (lowest resolution first), each block taking one skip of ``chans``."""
    chans = list(chans)
    ch = chans[-1]
    levels = []
    for i in reversed(range(len(channel_mult))):
        level = _Level()
        out_ch = base_channels * channel_mult[i]
        blocks = []
        for _ in range(num_res_blocks + 1):
            blocks.append(res_block(ch + chans.pop(), out_ch))
            ch = out_ch
        level.res = nnx.List(blocks)
        use_attn = resolutions[i] in attn_resolutions
        level.attn = nnx.List([attn_block(ch) for _ in blocks] if use_attn else [])
        level.resample = upsample(ch) if i != 0 else None
        levels.append(level)
    return nnx.List(levels)
