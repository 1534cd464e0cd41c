"""Inception-v3 feature extractor for FID, in Flax NNX.

This is the network of the original TensorFlow FID code (the 2015-12-05 Inception graph), as
ported by pytorch-fid (``FIDInceptionA/C/E_1/E_2``) and torch-fidelity. It differs from
torchvision's Inception-v3 in three places:

* the average-pool branch of the A, C and first E blocks does not count padded zeros
  (``count_include_pad=False``), as TensorFlow's average pool;
* the second E block (``Mixed_7c``) pools its pool branch with a *max* pool;
* the input is resized to 299x299 with bilinear interpolation and scaled to [-1, 1].

Parameter names mirror the PyTorch ``state_dict`` (``Mixed_5b.branch1x1.conv.weight``, ...),
so ``load_fid_inception`` maps pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``) onto the module mechanically.
The output is the 2048-d "pool3" feature: the spatial mean of the last block.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILENAME)
INPUT_SIZE = 299
FEATURE_DIM = 2048
PREPROCESSINGS = ("tf", "pytorch_fid")

# NNX variable name -> PyTorch state_dict suffix.
_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}
# state_dict entries that the FID feature extractor does not use.
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")
_UNUSED_SUFFIXES = ("num_batches_tracked",)


class FIDInceptionV3(nnx.Module):
    """Inception-v3 up to the 2048-d average pool ("pool3"), FID variant.

    Args:
        preprocessing: how images are brought to the network's 299x299 input, both starting
            from pixels ``p = (x + 1) * 127.5`` in [0, 255]:
            ``"tf"`` (default) -- TensorFlow 1.x ``ResizeBilinear`` (source pixel
            ``dst * in / out``, no half-pixel offset), then ``(p - 128) / 128``: the original
            TF FID graph, reproduced exactly by torch-fidelity;
            ``"pytorch_fid"`` -- ``F.interpolate(mode="bilinear", align_corners=False)``
            (half-pixel centres), then ``p / 127.5 - 1``: pytorch-fid.
        precision: ``jax.lax.Precision`` of the convolutions; ``"highest"`` keeps float32
            accuracy on GPUs (no TF32), so features do not depend on the accelerator.
        rngs: draws random parameters (Flax's default initialisers). ``None`` fills them with
            zeros instead, without any PRNG work: fast, and what ``load_fid_inception`` uses
            before overwriting them with the real weights.
    """

    def __init__(self, *, preprocessing: str = "tf", precision: str | None = "highest",
                 rngs: nnx.Rngs | None = None):
        _check_preprocessing(preprocessing)
        self.preprocessing = preprocessing
        conv = _ConvFactory(precision, rngs)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(conv, 192, pool_features=32)
        self.Mixed_5c = InceptionA(conv, 256, pool_features=64)
        self.Mixed_5d = InceptionA(conv, 288, pool_features=64)
        self.Mixed_6a = InceptionB(conv, 288)
        self.Mixed_6b = InceptionC(conv, 768, channels_7x7=128)
        self.Mixed_6c = InceptionC(conv, 768, channels_7x7=160)
        self.Mixed_6d = InceptionC(conv, 768, channels_7x7=160)
        self.Mixed_6e = InceptionC(conv, 768, channels_7x7=192)
        self.Mixed_7a = InceptionD(conv, 768)
        self.Mixed_7b = InceptionE(conv, 1280, pool="avg")
        self.Mixed_7c = InceptionE(conv, 2048, pool="max")

    def __call__(self, images: jax.Array) -> jax.Array:
        """Pool3 features of images.

        Args:
            images: [B, H, W, 3] float in [-1, 1], any H, W (resized to 299x299).

        Returns:
            [B, 2048] float32.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
        x = preprocess(images, self.preprocessing)         # [B, 299, 299, 3]
        x = self.Conv2d_1a_3x3(x)                          # [B, 149, 149, 32]
        x = self.Conv2d_2a_3x3(x)                          # [B, 147, 147, 32]
        x = self.Conv2d_2b_3x3(x)                          # [B, 147, 147, 64]
        x = nnx.max_pool(x, (3, 3), strides=(2, 2))        # [B, 73, 73, 64]
        x = self.Conv2d_3b_1x1(x)                          # [B, 73, 73, 80]
        x = self.Conv2d_4a_3x3(x)                          # [B, 71, 71, 192]
        x = nnx.max_pool(x, (3, 3), strides=(2, 2))        # [B, 35, 35, 192]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B, 35, 35, 288]
        x = self.Mixed_6a(x)                               # [B, 17, 17, 768]
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)                               # [B, 8, 8, 1280]
        x = self.Mixed_7c(self.Mixed_7b(x))                # [B, 8, 8, 2048]
        return jnp.mean(x, axis=(1, 2))                    # [B, 2048]


def load_fid_inception(path: str, *, preprocessing: str = "tf",
                       precision: str | None = "highest") -> FIDInceptionV3:
    """Builds ``FIDInceptionV3`` with the weights of a PyTorch FID Inception ``state_dict`` file.

    Accepted files: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` (same layout; read with ``torch.load``), or
    an ``.npz`` holding the same keys (readable without torch). Convolution weights
    ``[O, I, kh, kw]`` become NNX kernels ``[kh, kw, I, O]``; ``fc.*``, ``AuxLogits.*`` and
    ``num_batches_tracked`` entries are ignored; any other missing, unexpected or mis-shaped
    entry is an error.

    Args:
        path: the weights file.
        preprocessing: see ``FIDInceptionV3``.
        precision: see ``FIDInceptionV3``.

    Returns:
        The loaded module.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"FID Inception weights file {path!r} not found. Nothing is downloaded at run time: "
            f"on a machine with network access fetch {FID_WEIGHTS_URL} (pytorch-fid's "
            f"{FID_WEIGHTS_FILENAME}, about 91 MB), copy it here and pass its path "
            "(e.g. run_eval.py --inception_weights=PATH).")
    state_dict = _read_state_dict(path)
    model = FIDInceptionV3(preprocessing=preprocessing, precision=precision, rngs=None)
    used = set()
    loaded = []
    for var_path, variable in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(str(p) for p in var_path[:-1]) + "." + _TORCH_NAMES[var_path[-1]]
        if key not in state_dict:
            raise ValueError(f"weights file {path!r} lacks entry {key!r}")
        value = np.asarray(state_dict[key], dtype=np.float32)
        if var_path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)
        if value.shape != variable.shape:
            raise ValueError(f"entry {key!r} in {path!r} has shape {value.shape} after conversion, "
                             f"expected {variable.shape}")
        loaded.append((var_path, variable.replace(jnp.asarray(value))))
        used.add(key)
    unexpected = sorted(k for k in state_dict if k not in used and not _is_unused_key(k))
    if unexpected:
        raise ValueError(f"weights file {path!r} has {len(unexpected)} entries that are not part "
                         f"of the FID Inception network, e.g. {unexpected[:5]}")
    nnx.update(model, nnx.from_flat_state(loaded))
    return model


def preprocess(images: jax.Array, preprocessing: str = "tf") -> jax.Array:
    """Resizes [-1, 1] images to 299x299 and scales them as the FID network expects.

    With pixels ``p = (x + 1) * 127.5``: ``"tf"`` returns ``(resize_tf1(p) - 128) / 128`` and
    ``"pytorch_fid"`` returns ``resize_half_pixel(p) / 127.5 - 1`` (see ``FIDInceptionV3``).

    Args:
        images: [B, H, W, C] float in [-1, 1].
        preprocessing: "tf" or "pytorch_fid".

    Returns:
        [B, 299, 299, C] float32.
    """
    _check_preprocessing(preprocessing)
    pixels = (images.astype(jnp.float32) + 1.0) * 127.5
    if preprocessing == "tf":
        return (bilinear_resize(pixels, INPUT_SIZE, INPUT_SIZE, half_pixel=False) - 128.0) / 128.0
    return bilinear_resize(pixels, INPUT_SIZE, INPUT_SIZE, half_pixel=True) / 127.5 - 1.0


def bilinear_resize(x: jax.Array, height: int, width: int, *, half_pixel: bool) -> jax.Array:
    """Bilinear resize without antialiasing, as a separable pair of interpolation matrices.

    Output pixel ``d`` of an axis of input length ``n`` and output length ``m`` reads source
    coordinate ``s = d * n / m`` (TensorFlow 1.x, ``half_pixel=False``) or
    ``s = max((d + 0.5) * n / m - 0.5, 0)`` (PyTorch ``align_corners=False``,
    ``half_pixel=True``), and mixes ``x[floor(s)]`` and ``x[min(floor(s) + 1, n - 1)]`` with
    weights ``1 - frac(s)`` and ``frac(s)``.

    Args:
        x: [B, H, W, C].
        height: output height.
        width: output width.
        half_pixel: the source-coordinate convention above.

    Returns:
        [B, height, width, C], same dtype as ``x``.
    """
    rows = jnp.asarray(_interpolation_matrix(x.shape[1], height, half_pixel), x.dtype)  # [h, H]
    cols = jnp.asarray(_interpolation_matrix(x.shape[2], width, half_pixel), x.dtype)   # [w, W]
    return jnp.einsum("hH,bHWc,wW->bhwc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


class BasicConv2d(nnx.Module):
    """Convolution without bias, inference BatchNorm (eps 1e-3), ReLU: ``relu(bn(conv(x)))``.

    ``zero_init=True`` fills the parameters with host zeros instead of drawing them from
    ``rngs`` (see ``FIDInceptionV3``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int, padding,
                 precision, rngs: nnx.Rngs, zero_init: bool = False):
        pad_h, pad_w = _pair(padding)
        conv_init = dict(kernel_init=_numpy_zeros) if zero_init else {}
        bn_init = dict(scale_init=_numpy_zeros, bias_init=_numpy_zeros) if zero_init else {}
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                             padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                             precision=precision, rngs=rngs, **conv_init)
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=1e-3, rngs=rngs,
                                **bn_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1, concatenated."""

    def __init__(self, conv, in_channels: int, pool_features: int):
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, conv, in_channels: int):
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = nnx.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([self.branch3x3(x), b3, bp], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1) and a no-pad-count avg pool."""

    def __init__(self, conv, in_channels: int, channels_7x7: int):
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), b7, b7d, bp], axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, conv, in_channels: int):
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = nnx.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``pool`` is "avg" (Mixed_7b) or "max" (Mixed_7c)."""

    def __init__(self, conv, in_channels: int, pool: str):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = jnp.concatenate([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # TF's graph max-pools here; padded cells are -inf, as in F.max_pool2d(padding=1).
            pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        return jnp.concatenate([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], axis=-1)


class _ConvFactory:
    """``conv(in, out, kernel, stride=1, padding=0) -> BasicConv2d`` sharing precision and rngs.

    ``rngs=None`` builds zero-initialised layers (``nnx.Conv`` still splits a key, from a
    fixed ``Rngs(0)`` that the zero initialiser ignores).
    """

    def __init__(self, precision, rngs: nnx.Rngs | None):
        self.precision = precision
        self.zero_init = rngs is None
        self.rngs = nnx.Rngs(0) if rngs is None else rngs

    def __call__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        return BasicConv2d(in_channels, out_channels, kernel_size, stride, padding, self.precision,
                           self.rngs, self.zero_init)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, averaging only the in-image cells (TF semantics)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


def _interpolation_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
    """[out_size, in_size] bilinear weights; see ``bilinear_resize``."""
    dst = np.arange(out_size, dtype=np.float64)
    scale = in_size / out_size
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0) if half_pixel else dst * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def _read_state_dict(path: str) -> dict:
    """name -> numpy array from a torch ``.pth``/``.pt`` state_dict or an ``.npz``."""
    if path.endswith(".npz"):
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception as e:  # noqa: BLE001  zip, pickle and truncation errors alike
            raise ValueError(f"weights file {path!r} is not a readable .npz "
                             f"({type(e).__name__}: {e}); is it truncated?") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading the PyTorch file {path!r} needs torch; install it, or convert "
                          "the state_dict to .npz elsewhere: np.savez(out, **{k: v.numpy()})"
                          ) from e
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises RuntimeError, EOFError, pickle errors
        raise ValueError(f"weights file {path!r} is not a readable PyTorch state_dict "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is "
                         f"it truncated? Expected pytorch-fid's {FID_WEIGHTS_FILENAME}.") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path!r} does not hold a state_dict (got {type(state_dict).__name__})")
    return {k: v.detach().numpy() for k, v in state_dict.items()}


def _numpy_zeros(key, shape, dtype=np.float32):
    """Initialiser that ignores ``key``: host zeros, so building the module compiles nothing."""
    del key
    return np.zeros(shape, dtype)


def _check_preprocessing(preprocessing: str) -> None:
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")


def _is_unused_key(key: str) -> bool:
    return key.startswith(_UNUSED_PREFIXES) or key.endswith(_UNUSED_SUFFIXES)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
