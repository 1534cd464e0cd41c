"""The condition pytree: one builder per kind, its null, and the training-time conditions.

A condition is one dict, passed unchanged from the data batch to the model and to the
denoisers (:mod:`diffusion_jax.denoisers`); a missing key means that kind is absent:

    cond = {"label": int32 [B],            class labels (num_classes = the null label)
            "image": float [B, H, W, Cc],  an image concatenated to the input (SR3)
            "text":  float [B, L, D]}      text-encoder states (cross-attention models)

Each kind has one builder, used by training and sampling alike (:func:`label_condition`,
with :func:`class_condition` for one class repeated over a batch, :func:`image_condition`,
:func:`text_condition`), and one entry in the table of kinds (``_KINDS``): the name of the
argument its null is made from (``num_classes`` for labels, ``null_text``, the empty prompt's
states, for text; ``None`` for a null that needs none) and how the null is made (``None``: the
kind is never dropped, like an image). Classifier-free guidance (:func:`null_condition`; the
denoiser reads a null argument from the model attribute of that name unless the caller gives
it) and condition dropout in training (each row replaced by its null with probability ``p``,
on device) both read that table, and the sampling code carries any kind it holds. Adding a
kind is one builder and one table entry here, and the model that reads it
(``tests/test_conditioning.py::test_a_new_condition_kind_is_one_table_entry``).

This module also holds the SR3 low-resolution conditioning (area downsampling, upsampling
back, noise conditioning augmentation). Images are NHWC.
"""
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion

UPSAMPLE_METHODS = ("bicubic", "bilinear", "nearest")
# kind -> (name of the argument its null is made from, or None if it needs none;
#          (value, null argument) -> null value, or None if the kind is never dropped)
_KINDS = {
    "label": ("num_classes", lambda labels, n: jnp.full(labels.shape, n, labels.dtype)),
    "image": (None, None),
    "text": ("null_text", lambda states, n: jnp.broadcast_to(jnp.asarray(n, states.dtype),
                                                             states.shape)),
}


def cond_kinds():
    """The condition kinds, in table order."""
    return tuple(_KINDS)


def guided_kinds():
    """The kinds that have a null (dropped in training, replaced for guidance)."""
    return tuple(kind for kind, (_, make_null) in _KINDS.items() if make_null)


def null_args():
    """The names of the arguments the nulls are made from (e.g. ``num_classes``)."""
    return tuple(dict.fromkeys(arg for arg, make_null in _KINDS.values() if make_null and arg))


def label_condition(labels, *, num_classes=None, drop_prob=0.0, key=None):
    """``{"label": labels}``, each replaced by the null label ``num_classes`` with probability
    ``drop_prob`` (label dropout for classifier-free guidance; needs ``key``).

    Args:
        labels: int ``[B]``.
        num_classes: the null label; needed when ``drop_prob > 0``.
        drop_prob: static probability in [0, 1].
        key: PRNG key of the dropout.
    """
    return make_condition("label", jnp.asarray(labels), null=num_classes, drop_prob=drop_prob,
                          key=key)


def class_condition(label, batch_size):
    """:func:`label_condition` of one class repeated over a batch: ``{"label": int32
    [batch_size]}`` filled with ``label``, or ``None`` when ``label`` is ``None``
    (an unconditional request)."""
    if label is None:
        return None
    return label_condition(jnp.full((batch_size,), label, jnp.int32))


def image_condition(low_res, image_size, method="bicubic"):
    """``{"image": upsample_condition(low_res, image_size, method)}``: the SR3 condition of
    ``low_res [B, h, w, C]`` (in training, :func:`sr_training_condition` gives ``low_res``)."""
    return {"image": upsample_condition(low_res, image_size, method)}


def text_condition(states, *, null_text=None, drop_prob=0.0, key=None):
    """``{"text": states}``, each row replaced by the empty prompt's states ``null_text``
    with probability ``drop_prob`` (caption dropout for classifier-free guidance, on device).

    Args:
        states: ``[B, L, D]`` text-encoder states.
        null_text: ``[1 or B, L, D]`` states of the empty prompt; needed when dropping.
        drop_prob: static probability in [0, 1].
        key: PRNG key of the dropout.
    """
    return make_condition("text", states, null=null_text, drop_prob=drop_prob, key=key)


def make_condition(kind, value, *, null=None, drop_prob=0.0, key=None):
    """``{kind: value}``, each row of ``value`` replaced by the null of ``kind`` with
    probability ``drop_prob`` (on device): the builder every kind's builder is made of.

    Args:
        kind: a kind of the table.
        value: ``[B, ...]``.
        null: the argument the kind's null is made from (e.g. ``num_classes``); needed when
            ``drop_prob > 0`` and the kind names one.
        drop_prob: static probability in [0, 1].
        key: PRNG key of the dropout; needed when ``drop_prob > 0``.

    Raises:
        ValueError: for an unknown kind, or dropout of a kind without a null.
    """
    check_condition({kind: value})
    if drop_prob and _KINDS[kind][1] is None:
        raise ValueError(f'cond["{kind}"] has no null: it cannot be dropped.')
    return {kind: _dropped(kind, value, null, drop_prob, key)}


def null_condition(cond, **nulls):
    """``cond`` with every guided kind replaced by its null (``image`` is kept).

    Args:
        cond: condition dict with batch ``B``.
        **nulls: the null arguments (:func:`null_args`), by name: ``num_classes``, the model's
            number of classes (its null label), needed with ``label``; ``null_text``,
            ``[1 or B, L, D]`` states of the empty prompt, needed with ``text``.

    Returns:
        The null condition, same structure and shapes as ``cond``.

    Raises:
        ValueError: if a needed null is missing, a null argument is unknown or ``cond`` has an
            unknown key.
    """
    unknown = sorted(set(nulls) - set(null_args()))
    if unknown:
        raise ValueError(f"Unknown null argument(s) {unknown}; expected some of "
                         f"{list(null_args())}.")
    cond = check_condition(cond)
    return {kind: value if _KINDS[kind][1] is None else
            _null_value(kind, value, nulls.get(_KINDS[kind][0])) for kind, value in cond.items()}


def check_condition(cond):
    """``cond`` as a dict (``None`` -> ``{}``).

    Raises:
        ValueError: for a key that is not a condition kind.
    """
    cond = {} if cond is None else dict(cond)
    unknown = sorted(set(cond) - set(_KINDS))
    if unknown:
        raise ValueError(f"Unknown condition kind(s) {unknown}; expected some of {list(_KINDS)}.")
    return cond


def training_condition(config, schedule, batch, *, label_key, image_key):
    """The condition of one training batch, as ``config.model`` and ``config.sr`` say.

    * ``label`` (class-conditional models): ``batch["label"]`` replaced by the null label
      ``num_classes`` with probability ``model.cond_drop_prob`` (classifier-free guidance).
    * ``image`` (``model.cond_image_channels > 0``): :func:`sr_training_condition` of
      ``batch["image"]`` with ``sr.factor``, ``sr.aug_max_t`` and ``sr.upsample_method``.

    Args:
        config: the full config (``model``, ``data.num_classes``, ``sr``).
        schedule: :class:`~diffusion_jax.schedules.DiscreteSchedule` (SR augmentation).
        batch: ``{"image": [B, H, W, C], "label": int [B] (conditional models)}``.
        label_key, image_key: PRNG keys of the label dropout and the SR augmentation.

    Returns:
        The condition dict (empty for an unconditional model).
    """
    model_cfg, cond = config.model, {}
    if model_cfg.class_conditional:
        cond.update(label_condition(batch["label"], num_classes=config.data.num_classes,
                                    drop_prob=model_cfg.cond_drop_prob, key=label_key))
    if model_cfg.cond_image_channels > 0:
        cond["image"] = sr_training_condition(
            batch["image"], image_key, factor=config.sr.factor, sched=schedule,
            aug_max_t=config.sr.aug_max_t, method=config.sr.upsample_method)
    return cond


def sr_training_condition(images, key, *, factor, sched=None, aug_max_t=0, method="bicubic"):
    """SR3 conditioning images for a training batch, with noise conditioning augmentation.

    ``y = area_downsample(x, factor)``; if ``aug_max_t > 0``, ``y`` is replaced by
    ``q_sample(y, s)`` with ``s ~ U{0, ..., aug_max_t}`` per example; then
    ``c = upsample_condition(y, H, method)``.

    Args:
        images: ``[B, H, W, C]`` high-resolution training images in [-1, 1].
        key: PRNG key for the augmentation.
        factor: downsampling factor ``H / h``.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`; needed when ``aug_max_t > 0``.
        aug_max_t: largest augmentation step (``0``: no augmentation).
        method: upsampling method of :func:`upsample_condition`.

    Returns:
        ``cond["image"]``: ``[B, H, W, C]``.

    Raises:
        ValueError: for a bad ``factor`` or ``method``, or ``aug_max_t > 0`` without ``sched``.
    """
    low = area_downsample(images, factor)
    if aug_max_t > 0:
        if sched is None:
            raise ValueError("sr_training_condition: aug_max_t > 0 needs sched.")
        t_key, noise_key = jax.random.split(key)
        levels = jax.random.randint(t_key, (images.shape[0],), 0, aug_max_t + 1)       # [B]
        low = diffusion.q_sample(sched, low, levels, jax.random.normal(noise_key, low.shape))
    return image_condition(low, images.shape[1], method)["image"]


def upsample_condition(low_res, image_size, method="bicubic"):
    """The SR3 conditioning image: ``low_res [B, h, w, C] -> [B, image_size, image_size, C]``.

    Uses :func:`jax.image.resize` (``bicubic``, ``bilinear`` interpolate; ``nearest`` repeats
    pixels), so it is jittable and differentiable.

    Raises:
        ValueError: for an unknown ``method``.
    """
    if method not in UPSAMPLE_METHODS:
        raise ValueError(
            f"Unknown upsample method {method!r}; expected one of {list(UPSAMPLE_METHODS)}.")
    batch, _, _, channels = low_res.shape
    return jax.image.resize(low_res, (batch, image_size, image_size, channels), method)


def area_downsample(x, factor):
    """Mean over non-overlapping ``factor x factor`` blocks: ``[B, H, W, C] -> [B, H/f, W/f, C]``.

    Raises:
        ValueError: if ``H`` or ``W`` is not divisible by ``factor``.
    """
    check_factor(x.shape, factor)
    batch, height, width, channels = x.shape
    blocks = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(2, 4))


def check_factor(shape, factor):
    """Raise ``ValueError`` unless the integer ``factor >= 1`` divides H and W of NHWC ``shape``."""
    height, width = shape[1], shape[2]
    if int(factor) != factor or factor < 1 or height % factor or width % factor:
        raise ValueError(f"factor={factor} must be an integer >= 1 dividing the image size "
                         f"{height}x{width}.")


def nearest_upsample(x, factor):
    """Repeat each pixel ``factor x factor`` times: ``[B, h, w, C] -> [B, h f, w f, C]``."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _null_value(kind, value, null):
    """The null of ``kind`` for ``value``, from its null argument ``null``."""
    if null is None and _KINDS[kind][0] is not None:
        raise ValueError(f'cond["{kind}"] needs {_KINDS[kind][0]} (its null) for guidance or '
                         "dropout.")
    return _KINDS[kind][1](value, null)


def _dropped(kind, value, null, drop_prob, key):
    """``value`` with each row replaced by the null of ``kind`` with probability ``drop_prob``."""
    if not drop_prob:
        return value
    drop = jax.random.bernoulli(key, drop_prob, value.shape[:1])                    # [B]
    return jnp.where(drop.reshape((-1,) + (1,) * (value.ndim - 1)),
                     _null_value(kind, value, null), value)
