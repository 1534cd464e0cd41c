"""SR3 super-resolution (Saharia et al., 2021) and cascaded sampling (Ho et al., 2021).

SR3 is a diffusion model of the high-resolution image ``x`` conditioned on the low-resolution
``y``: the upsampled ``y`` is concatenated to the noisy input channels,

    eps_theta(x_t, t, c),   c = upsample(y) : [B, H, W, C]   (bicubic, bilinear or nearest),

trained with the ordinary denoising loss on pairs ``(x, y = area_downsample(x))``.

Cascaded diffusion (CDM) chains a base model at low resolution with an SR model. To make the SR
model robust to the base model's imperfect samples, its conditioning is corrupted by the forward
process at a random level during training (*noise conditioning augmentation*),

    y_aug = sqrt(alpha_bar_s) y + sqrt(1 - alpha_bar_s) z,   s ~ U{0, ..., aug_max_t},

and at sampling time the base sample is corrupted at one fixed level ``s = aug_t``. (CDM also
feeds ``s`` to the SR model; here the model is not told ``s``: it infers the corruption from
the conditioning, which keeps the UNet's interface unchanged.)
"""
import jax

from diffusion_jax import diffusion
from diffusion_jax.applications import common

UPSAMPLE_METHODS = ("bicubic", "bilinear", "nearest")


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


def sr_training_condition(images, key, *, factor, sched=None, aug_max_t=0, method="bicubic"):
    """Conditioning images for a training batch, with optional noise conditioning augmentation.

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
        ``cond_image [B, H, W, C]`` for ``UNet(..., cond_image=...)``.

    Raises:
        ValueError: for a bad ``factor`` or ``method``, or ``aug_max_t > 0`` without ``sched``.
    """
    low = common.area_downsample(images, factor)
    if aug_max_t > 0:
        if sched is None:
            raise ValueError("sr_training_condition: aug_max_t > 0 needs sched.")
        t_key, noise_key = jax.random.split(key)
        levels = jax.random.randint(t_key, (images.shape[0],), 0, aug_max_t + 1)       # [B]
        low = diffusion.q_sample(sched, low, levels, jax.random.normal(noise_key, low.shape))
    return upsample_condition(low, images.shape[1], method)


def augment_low_res(low_res, sched, aug_t, key):
    """Noise conditioning augmentation at sampling time: ``q_sample(low_res, aug_t)``; ``aug_t < 0``
    returns ``low_res`` unchanged. Shapes ``[B, h, w, C]``."""
    return common.q_sample_level(sched, low_res, aug_t, key)


def sr_denoiser(model_fn, low_res, *, image_size, method="bicubic"):
    """Denoiser of high-resolution images conditioned on ``low_res``.

    ``denoise(x, t) = model_fn(x, t, upsample_condition(low_res, image_size, method))``; the
    conditioning is computed once.

    Args:
        model_fn: ``model_fn(x [B, H, W, C], t [B], cond_image [B, H, W, C]) -> prediction``,
            e.g. ``lambda x, t, c: unet(x, t, cond_image=c)``.
        low_res: ``[B, h, w, C]`` in [-1, 1] (possibly noise-augmented).
        image_size: ``H = W`` of the output.
        method: upsampling method, the one used in training.

    Returns:
        ``denoise(x, t) -> prediction``.
    """
    cond = upsample_condition(low_res, image_size, method)

    def denoise(x, t):
        return model_fn(x, t, cond)

    return denoise


def sr_sample(model_fn, sched, low_res, key, *, image_size, method="bicubic", aug_t=-1,
              sampler="ddim", num_steps=50, eta=0.0, pred_type="eps", variance="posterior",
              clip_x0=None):
    """Sample high-resolution images for ``low_res``: ``[B, h, w, C] -> [B, H, W, C]``.

    ``key`` is split into (augmentation, ``x_T``, chain) keys.

    Args:
        model_fn: the SR model, see :func:`sr_denoiser`.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule` of the SR model.
        low_res: ``[B, h, w, C]`` in [-1, 1].
        key: PRNG key.
        image_size: output size ``H``.
        method: upsampling method used in training.
        aug_t: noise-augmentation step applied to ``low_res`` first (``-1``: none).
        sampler, num_steps, eta, pred_type, variance, clip_x0: as the samplers.

    Returns:
        ``[B, H, W, C]``.
    """
    aug_key, x_T_key, chain_key = jax.random.split(key, 3)
    cond_low = augment_low_res(low_res, sched, aug_t, aug_key)
    denoise = sr_denoiser(model_fn, cond_low, image_size=image_size, method=method)
    shape = (low_res.shape[0], image_size, image_size, low_res.shape[3])
    x_T = jax.random.normal(x_T_key, shape, low_res.dtype)
    return common.run_sampler(sampler, denoise, sched, x_T, chain_key, num_steps=num_steps,
                              eta=eta, pred_type=pred_type, variance=variance, clip_x0=clip_x0)


def cascade_sample(base_sample_fn, sr_sample_fn, key):
    """Cascaded generation: a low-resolution base sample, then super-resolution.

    ``y = base_sample_fn(k1)``; ``x = sr_sample_fn(y, k2)``. Put the noise conditioning
    augmentation in ``sr_sample_fn`` (``sr_sample(..., aug_t=s)``), e.g.::

        base = lambda k: ddim_sample(base_denoise, sched, jax.random.normal(k, (16, 8, 8, 1)), k)
        sr = lambda y, k: sr_sample(sr_model_fn, sched, y, k, image_size=16, aug_t=50)
        low, high = cascade_sample(base, sr, key)

    Args:
        base_sample_fn: ``key -> low_res [B, h, w, C]``.
        sr_sample_fn: ``(low_res, key) -> high_res [B, H, W, C]``.
        key: PRNG key.

    Returns:
        ``(low_res [B, h, w, C], high_res [B, H, W, C])``.
    """
    base_key, sr_key = jax.random.split(key)
    low_res = base_sample_fn(base_key)
    return low_res, sr_sample_fn(low_res, sr_key)
