"""Contrastive image-text objectives (CLIP): symmetric InfoNCE with a learned temperature.

Pure functions of embeddings; the encoders live in ``diffusion_jax.models``. With unit
embeddings ``u_i = a_i / |a_i|`` (images) and ``v_j = b_j / |b_j|`` (texts) and the learned
log-scale ``s`` (CLIP's ``logit_scale``, the log of the inverse temperature), the logits are

    L_ij = exp(s) u_i . v_j                                              [B, B]

and the loss is the mean of the image->text and text->image cross-entropies whose target for
row ``i`` is its own pair (or, with a positive mask, every pair marked positive).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INIT_LOG_SCALE = math.log(1.0 / 0.07)   # CLIP's initial temperature 0.07
MAX_LOG_SCALE = math.log(100.0)         # CLIP caps the logit scale at 100


def cosine_similarity(image_emb: jax.Array, text_emb: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``C_ij = a_i . b_j / (|a_i| |b_j|)``: image_emb [B, D], text_emb [M, D] -> [B, M]."""
    a = image_emb / jnp.maximum(jnp.linalg.norm(image_emb, axis=-1, keepdims=True), eps)
    b = text_emb / jnp.maximum(jnp.linalg.norm(text_emb, axis=-1, keepdims=True), eps)
    return a @ b.T


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, log_scale: jax.Array, *,
              positive_mask: jax.Array | None = None,
              max_log_scale: float = MAX_LOG_SCALE) -> jax.Array:
    r"""Symmetric InfoNCE (CLIP) loss.

    .. math::
        L_{ij} = e^{\min(s, s_{max})} \cos(a_i, b_j), \quad
        \mathcal{L} = \tfrac12\Big[-\tfrac1B\sum_i \sum_j T_{ij} \log\operatorname{softmax}_j L_{ij}
                      - \tfrac1B\sum_j \sum_i T'_{ji} \log\operatorname{softmax}_i L_{ij}\Big]

    with ``T = I`` by default. With ``positive_mask`` ``P`` (e.g. ``P_ij = [y_i = y_j]`` when
    several images in a batch share a caption or class), row ``i`` of ``T`` is uniform over
    the ``j`` with ``P_ij`` and ``T'`` likewise over the columns of ``P``, so pairs that
    describe each other are not pushed apart. The log-scale is clipped at ``max_log_scale``
    (no gradient beyond it), as CLIP clamps its logit scale at 100.

    Args:
        image_emb: [B, D] image embeddings (any norm).
        text_emb: [B, D] text embeddings, row ``i`` paired with image ``i``.
        log_scale: scalar learned log inverse temperature ``s`` (init ``INIT_LOG_SCALE``).
        positive_mask: optional [B, B] bool with a true diagonal.
        max_log_scale: cap ``s_max``.

    Returns:
        Scalar loss (float32).

    Example:
        >>> loss = clip_loss(img, txt, params["log_scale"])
        >>> loss = clip_loss(img, txt, s, positive_mask=labels[:, None] == labels[None, :])
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must both be [B, D], got {image_emb.shape} "
                         f"and {text_emb.shape}")
    b = image_emb.shape[0]
    scale = jnp.exp(jnp.minimum(log_scale, max_log_scale))
    logits = scale * cosine_similarity(image_emb.astype(jnp.float32),
                                       text_emb.astype(jnp.float32))          # [B, B]
    if positive_mask is None:
        targets = jnp.eye(b, dtype=jnp.float32)
    else:
        if positive_mask.shape != (b, b):
            raise ValueError(f"positive_mask must be [{b}, {b}], got {positive_mask.shape}")
        targets = jnp.asarray(positive_mask, jnp.float32)
    rows = targets / targets.sum(axis=1, keepdims=True)
    cols = targets / targets.sum(axis=0, keepdims=True)
    image_to_text = -(rows * jax.nn.log_softmax(logits, axis=1)).sum(axis=1).mean()
    text_to_image = -(cols * jax.nn.log_softmax(logits, axis=0)).sum(axis=0).mean()
    return 0.5 * (image_to_text + text_to_image)


def retrieval_accuracy(image_emb: jax.Array, text_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-1 retrieval (recall@1) in both directions over a batch of pairs.

    Args:
        image_emb: [B, D]; text_emb: [B, D], row ``i`` paired with image ``i``.

    Returns:
        ``(image_to_text, text_to_image)``: shares of rows whose most similar partner is their
        own pair.
    """
    sim = cosine_similarity(image_emb, text_emb)
    idx = jnp.arange(sim.shape[0])
    return (jnp.mean(sim.argmax(axis=1) == idx), jnp.mean(sim.argmax(axis=0) == idx))


def zero_shot_logits(image_emb: jax.Array, class_text_emb: jax.Array,
                     log_scale: jax.Array) -> jax.Array:
    """CLIP zero-shot class logits ``exp(s) cos(a_i, t_k)``: [B, D], [K, D] -> [B, K]."""
    return jnp.exp(jnp.minimum(log_scale, MAX_LOG_SCALE)) * cosine_similarity(image_emb,
                                                                              class_text_emb)
