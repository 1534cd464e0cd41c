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

from diffusion_jax import denoisers, samplers
from diffusion_jax.applications import common
from diffusion_jax.conditioning import (UPSAMPLE_METHODS, image_condition,
                                        sr_training_condition, upsample_condition)

__all__ = ["UPSAMPLE_METHODS", "augment_low_res", "cascade_sample", "sr_denoiser", "sr_sample",
           "sr_training_condition", "upsample_condition"]


def augment_low_res(low_res, sched, aug_t, key):
    """Noise conditioning augmentation at sampling time: ``q_sample(low_res, aug_t)``; ``aug_t < 0``
    returns ``low_res`` unchanged. Shapes ``[B, h, w, C]``."""
    return common.q_sample_level(sched, low_res, aug_t, key)


def sr_denoiser(model, low_res, *, image_size, method="bicubic", cond=None,
                guidance_scale=None, diffusion=None, sched=None):
    """Denoiser of high-resolution images conditioned on ``low_res``.

    ``denoise(x, t) = model(x, t, {**cond, "image": upsample_condition(low_res)})``, the
    conditioning computed once; with ``guidance_scale`` and a label in ``cond``,
    classifier-free guidance on the label (the image is kept in both halves).

    Args:
        model: ``model(x [B, H, W, C], t [B], cond) -> prediction``, e.g. the UNet with
            ``cond_image_channels = C``.
        low_res: ``[B, h, w, C]`` in [-1, 1] (possibly noise-augmented).
        image_size: ``H = W`` of the output.
        method: upsampling method, the one used in training.
        cond: other conditions (e.g. ``{"label": [B]}``), or None.
        guidance_scale: classifier-free guidance scale ``s`` (``<= 1`` or None: none).
        diffusion: the model's ``config.diffusion`` (``pred_type``, ``kind``), or None (a
            discrete eps model).
        sched: the schedule to sample on (needed for a continuous-time ``diffusion.kind``).

    Returns:
        A :class:`~diffusion_jax.denoisers.Denoiser`.
    """
    return denoisers.build_denoiser(model, {**(cond or {}),
                                            **image_condition(low_res, image_size, method)},
                                    guidance_scale=guidance_scale, diffusion=diffusion,
                                    schedule=sched)


def sr_sample(model, sched, low_res, key, *, image_size, method="bicubic", aug_t=-1,
              sampler="ddim", options=None, cond=None, guidance_scale=None, diffusion=None):
    """Sample high-resolution images for ``low_res``: ``[B, h, w, C] -> [B, H, W, C]``.

    ``key`` is split into (augmentation, ``x_T``, chain) keys.

    Args:
        model: the SR model, see :func:`sr_denoiser`.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule` of the SR model.
        low_res: ``[B, h, w, C]`` in [-1, 1].
        key: PRNG key.
        image_size: output size ``H``.
        method: upsampling method used in training.
        aug_t: noise-augmentation step applied to ``low_res`` first (``-1``: none), e.g.
            ``config.sr.sample_aug_t``.
        sampler: a registered sampler name.
        options: :class:`~diffusion_jax.samplers.SamplerOptions` (default: the defaults).
        cond, guidance_scale, diffusion: as :func:`sr_denoiser`.

    Returns:
        ``[B, H, W, C]``.
    """
    aug_key, x_T_key, chain_key = jax.random.split(key, 3)
    cond_low = augment_low_res(low_res, sched, aug_t, aug_key)
    denoise = sr_denoiser(model, cond_low, image_size=image_size, method=method, cond=cond,
                          guidance_scale=guidance_scale, diffusion=diffusion, sched=sched)
    shape = (low_res.shape[0], image_size, image_size, low_res.shape[3])
    x_T = jax.random.normal(x_T_key, shape, low_res.dtype)
    return samplers.run(sampler, denoise, sched, x_T, chain_key, common.default_options(options))


def cascade_sample(base_sample_fn, sr_sample_fn, key):
    """Cascaded generation: a low-resolution base sample, then super-resolution.

    ``y = base_sample_fn(k1)``; ``x = sr_sample_fn(y, k2)``. Put the noise conditioning
    augmentation in ``sr_sample_fn`` (``sr_sample(..., aug_t=s)``), e.g.::

        base = lambda k: ddim_sample(base_denoise, sched, jax.random.normal(k, (16, 8, 8, 1)), k)
        sr = lambda y, k: sr_sample(sr_model, sched, y, k, image_size=16, aug_t=50)
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
