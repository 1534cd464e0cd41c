"""A tiny CLIP trained in seconds on 4 synthetic classes, shared by the CLIP-score and
DiffusionCLIP tests.

Class ``k`` images are a fixed binary pattern (random signs, lightly smoothed) with per-image
contrast and noise; class ``k`` texts are ``"a photo of <WORDS[k]>"`` under a word-level
tokenizer (``<bos>=0``, ``<eos>=1``, padding with ``<eos>``).
"""
import functools

import numpy as np
import optax
from flax import nnx
from scipy.ndimage import gaussian_filter

from diffusion_jax import contrastive
from diffusion_jax.models import clip

SIDE = 16
WORDS = ("circle", "square", "stripe", "cross")
VOCAB = ("<bos>", "<eos>", "a", "photo", "of") + WORDS
MAX_LEN = 8
TINY_CLIP = dict(text=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                           num_layers=1, num_heads=4, max_positions=MAX_LEN, eos_token_id=1),
                 image=dict(in_channels=1, embed_dim=32, base_channels=8, channel_mult=(1, 2),
                            num_groups=4),
                 projection_dim=16)


def tokenize(texts):
    """Word-level ids ``[N, MAX_LEN]``: bos, words, eos, eos padding."""
    out = np.ones((len(texts), MAX_LEN), np.int32)
    for i, text in enumerate(texts):
        ids = [0] + [VOCAB.index(w) for w in text.split()] + [1]
        out[i, :len(ids)] = ids
    return out


def texts_for(labels):
    return [f"a photo of {WORDS[k]}" for k in labels]


def templates():
    rng = np.random.default_rng(123)
    signs = np.sign(rng.normal(size=(len(WORDS), SIDE, SIDE)))
    return gaussian_filter(signs, sigma=(0, 0.6, 0.6))


def images_for(labels, seed):
    """``[N, SIDE, SIDE, 1]`` float32 in [-1, 1] of the classes ``labels``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    contrast = rng.uniform(0.6, 0.9, size=(len(labels), 1, 1))
    x = contrast * templates()[labels] + rng.normal(0, 0.1, size=(len(labels), SIDE, SIDE))
    return np.clip(x, -1, 1)[..., None].astype(np.float32)


@functools.lru_cache(maxsize=1)
def trained_clip(steps: int = 60):
    """A `CLIPModel` trained with `contrastive.clip_loss` on fresh batches of the 4 classes."""
    model = clip.clip_from_kwargs(TINY_CLIP, seed=0)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, o, ids, images, labels):
        def loss_fn(m):
            out = m(ids, images)
            mask = labels[:, None] == labels[None, :]
            return contrastive.clip_loss(out.image_embeds, out.text_embeds, m.logit_scale.value,
                                         positive_mask=mask)
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    for i in range(steps):
        labels = np.arange(16) % len(WORDS)
        step(model, opt, tokenize(texts_for(labels)), images_for(labels, seed=i), labels)
    return model
