"""The condition pytree and the training-time conditions built from a data batch.

A condition is one dict, passed unchanged from the data batch to the model and to the
denoisers (:mod:`diffusion_jax.denoisers`); a missing key means that kind is absent:

    cond = {"label": int32 [B],            class labels (num_classes = the null label)
            "image": float [B, H, W, Cc],  an image concatenated to the input (SR3)
            "text":  float [B, L, D]}      text-encoder states (cross-attention models)

This module holds the pure array pieces that build conditions: label dropout for
classifier-free guidance training, and the SR3 low-resolution conditioning (area
downsampling, upsampling back, noise conditioning augmentation). Images are NHWC.
"""
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion

COND_KINDS = ("label", "image", "text")
UPSAMPLE_METHODS = ("bicubic", "bilinear", "nearest")


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
        drop = jax.random.bernoulli(label_key, model_cfg.cond_drop_prob, batch["label"].shape)
        cond["label"] = jnp.where(drop, config.data.num_classes, batch["label"])
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
    return upsample_condition(low, images.shape[1], method)


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
