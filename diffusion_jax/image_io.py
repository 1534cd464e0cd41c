"""Image files at the edges of the library: uint8 conversion, grids, PNG read and write.

Inside the library images are float NHWC in [-1, 1]; this module converts to and from uint8
and files. Reading never silently changes an image's size or aspect: a size mismatch is an
error unless resizing is asked for.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float ``[..., C]`` in [-1, 1] -> uint8 ``round((x + 1) * 127.5)`` clipped to [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, num_cols: int | None = None, pad: int = 1,
               min_tile: int = 32) -> np.ndarray:
    """Tiles uint8 ``[N, H, W, C]`` into one ``[R(sH+pad)+pad, K(sW+pad)+pad, C]`` image.

    ``K = num_cols`` (default ``ceil(sqrt(N))``) images per row, ``R = ceil(N / K)`` rows,
    separated and framed by ``pad`` black pixels; unused cells stay black. Small images are
    enlarged by pixel repetition with the integer factor ``s = ceil(min_tile / H)`` so that
    e.g. 8x8 digits stay visible.
    """
    scale = max(1, -(-min_tile // images.shape[1]))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    cols = num_cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes uint8 ``[H, W, C]`` (C = 1 or 3) to ``path`` as PNG."""
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def read_image(path: str, size: int, channels: int, *, resize: bool = False) -> np.ndarray:
    """``[size, size, channels]`` float32 in [-1, 1] from an image file.

    The file is converted to grey (``channels = 1``) or RGB (3); 16-bit grey files are scaled
    by 255/65535 first. Its size must be
    ``size x size`` unless ``resize`` is set, which resizes it bilinearly (changing the aspect
    of a non-square image).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable image, or its size differs and ``resize``
            is not set.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Input image {path!r} does not exist.")
    try:
        image = Image.open(path)
        image.load()
    except OSError as err:
        raise ValueError(f"{path!r} is not a readable image: {err}") from err
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale, do not saturate
        wide = np.asarray(image, np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(wide), 0, 255).astype(np.uint8))
    if image.size != (size, size):
        if not resize:
            raise ValueError(f"{path!r} is {image.size[0]}x{image.size[1]} (WxH) but the model "
                             f"takes {size}x{size} images; pass a {size}x{size} image or ask for "
                             "resizing (--resize_input).")
        image = image.convert("L" if channels == 1 else "RGB").resize((size, size),
                                                                      Image.BILINEAR)
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, np.float32).reshape(size, size, channels)
    return array / 127.5 - 1.0
