"""Sampling from a trained model: denoiser, sharded sample batches, uint8 grids and PNGs.

Used by the training loop (a grid every ``train.eval_every`` steps) and by ``run_sample.py``.
The sample batch is split over every device of the mesh (padded up to a multiple of the
device count), and the whole chain is one jitted ``lax.scan`` from ``samplers.py``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from diffusion_jax import diffusion, guidance, samplers, sharding

SAMPLERS = ("ddpm", "ddim", "langevin")


def build_denoiser(model: nnx.Module, *, labels: jax.Array | None = None,
                   guidance_scale: float = 0.0) -> Callable:
    """The sampler-facing denoiser ``denoise(x [B,H,W,C], t int32 [B]) -> prediction``.

    Conditioning is closed over here, once. Unconditional: ``model(x, t)``. With ``labels``
    ``[B]`` the class-conditional prediction ``model(x, t, labels)``; with a non-zero
    ``guidance_scale`` w, classifier-free guidance
    ``(1 + w) model(x, t, y) - w model(x, t, null)`` (`guidance.cfg_denoiser`).

    Args:
        model: the UNet (its ``num_classes`` is the null label).
        labels: int32 ``[B]`` class labels, or None for unconditional / null-label samples.
        guidance_scale: classifier-free guidance weight w (used only with ``labels``).
    """
    if labels is None:
        return lambda x, t: model(x, t)
    if guidance_scale:
        return guidance.cfg_denoiser(lambda x, t, y: model(x, t, y), labels,
                                     model.num_classes, guidance_scale)
    return lambda x, t: model(x, t, labels)


def make_sample_fn(graphdef: nnx.GraphDef, schedule, config, mesh: Mesh, *,
                   num_samples: int, sampler: str | None = None, num_steps: int | None = None,
                   eta: float | None = None, guidance_scale: float = 0.0) -> Callable:
    """A compiled ``sample_fn(params, key, labels=None) -> float32 [N, H, W, C]`` (numpy).

    The N samples (padded up to a multiple of the device count) are split over every device
    of ``mesh``; ``x_T`` is drawn from ``fold_in(key, 0)`` and the chain uses
    ``fold_in(key, 1)``. Build it once and call it as often as needed (one compilation).

    Args:
        graphdef: the model's graph definition (``nnx.split``).
        schedule: the `DiscreteSchedule` the model was trained with.
        config: the full config (``data``, ``diffusion.pred_type``, ``sample``).
        mesh: the device mesh.
        num_samples: N.
        sampler, num_steps, eta: override ``config.sample``.
        guidance_scale: classifier-free guidance weight w (applies when labels are given).

    Returns:
        ``sample_fn(params, key, labels)``: ``params`` an ``nnx.State`` (e.g. an EMA),
        ``labels`` int ``[N]`` or None; returns images nominally in [-1, 1].

    Raises:
        ValueError: unknown sampler.
    """
    sample_cfg = config.sample
    sampler = sampler or sample_cfg.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}.")
    num_steps = int(num_steps or sample_cfg.num_steps)
    eta = sample_cfg.eta if eta is None else eta
    n_pad = -(-num_samples // mesh.size) * mesh.size  # round up to a multiple of devices
    shape = (n_pad, config.data.image_size, config.data.image_size, config.data.num_channels)
    batch_sharding = sharding.batch_sharding(mesh)

    def sample(params, key, labels):
        model = nnx.merge(graphdef, params)
        denoise = build_denoiser(model, labels=labels, guidance_scale=guidance_scale)
        x_init = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        x_init = jax.lax.with_sharding_constraint(x_init, batch_sharding)
        return _run_sampler(sampler, denoise, schedule, x_init, jax.random.fold_in(key, 1),
                            config, num_steps=num_steps, eta=eta)

    sample_jit = jax.jit(sample, out_shardings=batch_sharding)

    def sample_fn(params, key, labels=None):
        if labels is not None:
            labels = np.resize(np.asarray(labels, np.int32), (n_pad,))
            labels = jax.device_put(labels, batch_sharding)
        images = sample_jit(params, key, labels)
        return np.asarray(jax.device_get(images))[:num_samples]

    return sample_fn


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


def _run_sampler(sampler, denoise, schedule, x_init, key, config, *, num_steps, eta):
    """Runs one of `SAMPLERS` from ``x_init [B, H, W, C]``; returns ``x_0``."""
    pred_type, sample_cfg = config.diffusion.pred_type, config.sample
    clip_x0 = (-1.0, 1.0) if sample_cfg.clip_x0 else None
    if sampler == "ddpm":
        return samplers.ddpm_sample(denoise, schedule, x_init, key, pred_type=pred_type,
                                    variance=sample_cfg.ddpm_variance, clip_x0=clip_x0)
    if sampler == "ddim":
        return samplers.ddim_sample(denoise, schedule, x_init, key, num_steps=num_steps,
                                    eta=eta, pred_type=pred_type, clip_x0=clip_x0)
    ts = samplers.ddim_timesteps(schedule.num_timesteps, num_steps)  # [L] descending
    alpha_bar = schedule.alphas_cumprod[ts]
    sigmas = jnp.sqrt((1.0 - alpha_bar) / alpha_bar)  # [L] decreasing
    score_fn = _ve_score_fn(denoise, schedule, ts, sigmas, pred_type)
    y = samplers.annealed_langevin_sample(
        score_fn, sigmas, sigmas[0] * x_init, key, n_steps_each=sample_cfg.langevin_steps_each,
        step_lr=sample_cfg.langevin_step_lr)
    return jnp.clip(y, -1.0, 1.0) if clip_x0 else y


def _ve_score_fn(denoise, schedule, ts, sigmas, pred_type):
    """A VP (DDPM) denoiser as the score of the variance-exploding variable y = x_t / sqrt(ab_t).

    ``y = x_0 + sigma eps`` with ``sigma_t = sqrt((1 - ab_t) / ab_t)``, so
    ``score(y, sigma_t) = -eps(sqrt(ab_t) y, t) / sigma_t``. ``sigma [B]`` must be one of
    ``sigmas [L]`` (the levels at timesteps ``ts [L]``).
    """

    def score_fn(y, sigma):
        level = jnp.argmin(jnp.abs(sigmas[None, :] - sigma[:, None]), axis=1)  # [B]
        t = ts[level]
        alpha_bar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (y.ndim - 1))
        x_t = jnp.sqrt(alpha_bar) * y
        _, eps = diffusion.to_x0_and_eps(denoise(x_t, t), x_t, alpha_bar, pred_type)
        return -eps / sigma.reshape(alpha_bar.shape)

    return score_fn
