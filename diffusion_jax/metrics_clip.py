"""CLIP score and a CLIP-feature Fréchet distance with this package's `CLIPModel`.

``clip_score`` (Hessel et al., 2021; torchmetrics' convention) is

    CLIPScore = mean_n max(100 cos(E_I(x_n), E_T(c_n)), 0),

computed by :func:`diffusion_jax.metrics.clip_score` from the embedding functions built here.
``clip_fd`` is the Fréchet distance between Gaussian fits of the unit CLIP image embeddings of
two image sets: an FID-like distance in a feature space that exists offline (a CLIP trained
here), not comparable with Inception FID.

A CLIP is a `CLIPModel` plus the tokenizer it was trained with; `load_clip` reads both from a
CLIP-stage training workdir (``configs/fashion_clip.py``: checkpoint + ``WORKDIR/tokenizer``),
from a transformers ``CLIPModel`` directory (``config.json`` + weights; ViT image tower), or
from such a checkpoint converted by ``convert.common.save_component``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx

from diffusion_jax import metrics

TOKENIZER_SUBDIR = "tokenizer"


ImageFn = Callable[[np.ndarray], np.ndarray]
TextFn = Callable[[Sequence[str]], np.ndarray]


def clip_embedders(model, tokenizer, *, batch_size: int = 64) -> tuple[ImageFn, TextFn]:
    """``(image_fn, text_fn)``: images ``[N, H, W, C]`` in [-1, 1] -> ``[N, E]`` and N texts ->
    ``[N, E]`` unit embeddings (jitted, in fixed-size batches so each compiles once).

    Args:
        model: a `diffusion_jax.models.clip.CLIPModel`.
        tokenizer: callable texts -> int ids ``[N, L]`` (e.g. `clip_tokenizer.CLIPTokenizer`).
        batch_size: images / texts per call.
    """
    def image_fn(images):
        return metrics.extract_features(lambda x: _encode_image(model, x),
                                        np.asarray(images, np.float32), batch_size)

    def text_fn(texts):
        ids = np.asarray(tokenizer(list(texts)))
        return metrics.extract_features(lambda i: _encode_text(model, i), ids, batch_size)

    return image_fn, text_fn


def clip_score(model, tokenizer, images, texts: Sequence[str], *, batch_size: int = 64) -> float:
    """CLIP score (in [0, 100]) of ``images [N, H, W, C]`` in [-1, 1] against N ``texts``."""
    image_fn, text_fn = clip_embedders(model, tokenizer, batch_size=batch_size)
    return metrics.clip_score(images, texts, image_fn, text_fn)


def clip_fd(model, images_a, images_b, *, batch_size: int = 64) -> float:
    """Fréchet distance between the CLIP image-embedding Gaussians of two image sets."""
    image_fn, _ = clip_embedders(model, None, batch_size=batch_size)
    return metrics.frechet_distance_from_features(image_fn(images_a), image_fn(images_b))


@nnx.jit
def _encode_image(model, images):
    return model.encode_image(images)


@nnx.jit
def _encode_text(model, input_ids):
    return model.encode_text(input_ids)


def load_clip(path: str):
    """``(CLIPModel, tokenizer)`` from a CLIP-stage workdir or a (converted) CLIP checkpoint.

    ``path/config.json`` marks a checkpoint: a converted one (its ``format`` field) or a
    transformers ``CLIPModel`` directory. The tokenizer is ``path/tokenizer/`` when present,
    else ``path`` itself (transformers keeps its files beside the weights).

    Raises:
        FileNotFoundError: ``path`` or its tokenizer is missing.
        ValueError: the workdir's model is not a `CLIPModel`, or the checkpoint is unsupported.
    """
    from diffusion_jax.convert import clip as convert_clip
    from diffusion_jax.convert import common
    from diffusion_jax.models import clip
    from diffusion_jax import clip_tokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP directory {path!r} does not exist")
    tok_dir = os.path.join(path, TOKENIZER_SUBDIR)
    config_path = os.path.join(path, common.CONFIG_FILE)
    if os.path.isfile(config_path):
        converted = common.read_json(config_path, "clip config").get("format") == \
            convert_clip.FORMAT
        load = convert_clip.load_converted if converted else convert_clip.load_transformers
        model, _ = load(path)
        return model, clip_tokenizer.load_tokenizer(tok_dir if os.path.isdir(tok_dir) else path)
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"CLIP workdir {path!r} has no {TOKENIZER_SUBDIR}/ directory; "
                                "train one with configs/fashion_clip.py first")
    from diffusion_jax import loading
    model = loading.load(workdir=path, kinds=("clip",)).model
    if not isinstance(model, clip.CLIPModel):
        raise ValueError(f"workdir {path!r} holds a {type(model).__name__}, not a CLIPModel "
                         "(expected a configs/fashion_clip.py run)")
    return model, clip_tokenizer.load_tokenizer(tok_dir)
