"""Model + condition -> the denoiser the samplers take, with classifier-free guidance.

Samplers and applications take ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]``.
This module closes a model and a condition pytree (:mod:`diffusion_jax.conditioning`:
``{"label": [B], "image": [B, H, W, Cc], "text": [B, L, D]}``, missing keys absent) over
once, and builds classifier-free guidance (Ho & Salimans, 2022) for any kind of condition:

    pred_hat(x, t) = (1 + w) * f(x, t, cond) - w * f(x, t, null(cond)),

computed in one batched call of the model on ``[x; x]`` with ``[cond; null(cond)]``. Each kind
knows its null: ``label`` -> the null label ``num_classes`` (the row trained with label
dropout); ``image`` -> the image itself (image conditions are never dropped in training, so it
is kept in both halves); ``text`` -> the empty-prompt states the caller supplies
(``null_text``). The combination is linear in the prediction, so it holds for ``eps``, ``x0``
and ``v``. ``w`` may be a traced value: a jitted sampler taking ``w`` as an argument compiles
once for every ``w``.
"""
import jax
import jax.numpy as jnp

from diffusion_jax.conditioning import COND_KINDS

GUIDED_KINDS = ("label", "text")  # the kinds classifier-free guidance drops


def model_denoiser(model, cond=None):
    """``denoise(x, t) = model(x, t, cond)``, or ``model(x, t)`` when ``cond`` is empty.

    Args:
        model: callable ``model(x [B, ...], t int32 [B], cond=None) -> prediction``, e.g. the
            UNet.
        cond: condition dict (batch ``B`` arrays), or ``None``.

    Returns:
        ``denoise(x, t) -> prediction``.
    """
    cond = _checked(cond)
    if not cond:
        return lambda x, t: model(x, t)
    return lambda x, t: model(x, t, cond)


def null_condition(cond, *, num_classes=None, null_text=None):
    """``cond`` with every guided kind replaced by its null (``image`` is kept).

    Args:
        cond: condition dict with batch ``B``.
        num_classes: the model's number of classes (its null label); needed with ``label``.
        null_text: ``[1 or B, L, D]`` states of the empty prompt; needed with ``text``.

    Returns:
        The null condition, same structure and shapes as ``cond``.

    Raises:
        ValueError: if a needed null is missing or ``cond`` has an unknown key.
    """
    cond = _checked(cond)
    null = dict(cond)
    if "label" in cond:
        if num_classes is None:
            raise ValueError('null_condition: cond["label"] needs num_classes (the null label).')
        null["label"] = jnp.full(cond["label"].shape, num_classes, cond["label"].dtype)
    if "text" in cond:
        if null_text is None:
            raise ValueError('null_condition: cond["text"] needs null_text, the states of the '
                             "empty prompt [1 or B, L, D].")
        null["text"] = jnp.broadcast_to(jnp.asarray(null_text, cond["text"].dtype),
                                         cond["text"].shape)
    return null


def guided_denoiser(model, cond, null_cond, scale):
    """Classifier-free guidance in one batched model call.

    ``denoise(x, t) = (1 + w) f(x, t, cond) - w f(x, t, null_cond)`` with the two halves
    evaluated as ``f([x; x], [t; t], [cond; null_cond])``. ``w = 0`` is the conditional
    model, ``w = -1`` the unconditional one.

    Args:
        model: ``model(x [2B, ...], t [2B], cond) -> prediction [2B, ...]``.
        cond, null_cond: condition dicts of batch ``B`` with the same keys.
        scale: guidance weight ``w`` (scalar; may be traced).

    Returns:
        ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]``.

    Raises:
        ValueError: if the two conditions have different keys.
    """
    cond, null_cond = _checked(cond), _checked(null_cond)
    if set(cond) != set(null_cond):
        raise ValueError(f"cond keys {sorted(cond)} and null_cond keys {sorted(null_cond)} differ.")
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)

    def denoise(x, t):
        batch = x.shape[0]
        pred = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        return (1.0 + scale) * pred[:batch] - scale * pred[batch:]

    return denoise


def build_denoiser(model, cond=None, *, guidance_scale=None, null_text=None):
    """The sampler-facing denoiser of ``model`` under ``cond``, guided when asked.

    With ``guidance_scale=None``, or a condition with no guided kind (``label``, ``text``),
    this is :func:`model_denoiser`; otherwise :func:`guided_denoiser` against
    :func:`null_condition` (the label null is ``model.num_classes``).

    Args:
        model: the model, called ``model(x, t, cond)``; needs a ``num_classes`` attribute
            when ``cond`` has a label and guidance is on.
        cond: condition dict, or ``None``.
        guidance_scale: ``None`` (no guidance) or the weight ``w`` (may be traced; whether
            guidance is on is decided by ``None`` alone, so every ``w`` shares one program).
        null_text: empty-prompt states for a ``text`` condition.

    Returns:
        ``denoise(x, t) -> prediction``.

    Example:
        >>> denoise = build_denoiser(unet, {"label": labels}, guidance_scale=3.0)
        >>> x0 = samplers.run("ddim", denoise, sched, x_T, key, options)
    """
    cond = _checked(cond)
    if guidance_scale is None or not any(kind in cond for kind in GUIDED_KINDS):
        return model_denoiser(model, cond)
    null = null_condition(cond, num_classes=getattr(model, "num_classes", None),
                          null_text=null_text)
    return guided_denoiser(model, cond, null, guidance_scale)


def _checked(cond):
    """``cond`` as a dict (``None`` -> ``{}``), rejecting unknown kinds."""
    cond = {} if cond is None else dict(cond)
    unknown = sorted(set(cond) - set(COND_KINDS))
    if unknown:
        raise ValueError(f"Unknown condition kind(s) {unknown}; expected some of {list(COND_KINDS)}.")
    return cond
