"""Generation parameters stored in PNG text chunks, and read back to reproduce an image.

Each PNG carries one ``parameters`` chunk (JSON of every setting, the format read back) and
one chunk per common field (``prompt``, ``source_prompt``, ``sampler``, ``steps``, ``guidance``,
``seed``, ``checkpoint``, ...) for tools that show PNG text, e.g. ``exiftool`` or
``identify -verbose``.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

KEY = "parameters"
FORMAT = "diffusion_jax.app/1"
SHOWN = ("prompt", "negative_prompt", "source_prompt", "sampler", "steps", "guidance", "seed",
         "checkpoint")


def save_png(path: str, image: np.ndarray, params: dict) -> str:
    """Writes uint8 ``image [H, W, C]`` (C = 1 or 3) to ``path`` with ``params`` as text.

    Args:
        path: output file.
        image: uint8 ``[H, W, C]``.
        params: JSON-serialisable settings (see :class:`~diffusion_jax.app.engine.Request`,
            plus ``checkpoint`` and ``index``).

    Returns:
        ``path``.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps({"format": FORMAT, **params}, sort_keys=True))
    for name in SHOWN:
        if name in params:
            info.add_text(name, str(params[name]))
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, pnginfo=info)
    return path


def read_params(path: str) -> dict:
    """The settings stored by :func:`save_png` in the PNG at ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an image, not a PNG, or carries no parameters of this app.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    name = os.path.basename(path)
    try:
        with Image.open(path) as image:
            kind, text = image.format, dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{name} is not an image; upload a PNG made by this app.") from err
    if kind != "PNG":
        raise ValueError(f"{name} is a {kind} image; parameters are stored only in PNGs "
                         "made by this app.")
    try:
        params = json.loads(text[KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{name} carries no '{KEY}' text of this app (was it made here, "
                         "and downloaded as PNG?).") from err
    if params.pop("format", None) != FORMAT:
        raise ValueError(f"{name}: its '{KEY}' text is not in the format {FORMAT}.")
    return params
