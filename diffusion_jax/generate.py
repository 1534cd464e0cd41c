"""Sharded, compiled sampling from a model: the training-time grid and ``run_sample.py``.

The sample batch is split over every device of the mesh (padded up to a multiple of the
device count), and the whole chain is one jitted program: the model's denoiser
(:func:`diffusion_jax.denoisers.build_denoiser`) run by a registered sampler
(:func:`diffusion_jax.samplers.run`). ``eta`` and the guidance scale are arguments of that
program, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion_jax import denoisers, samplers, sharding


def make_sample_fn(graphdef: nnx.GraphDef, schedule, config, mesh: Mesh, *, num_samples: int,
                   sampler: str | None = None,
                   options: samplers.SamplerOptions | None = None) -> Callable:
    """A compiled ``sample_fn(params, key, cond=None, *, guidance_scale=None, eta=None)``.

    ``sample_fn`` returns float32 numpy ``[N, H, W, C]``, nominally in [-1, 1]. The N samples
    (padded up to a multiple of the device count) are split over every device of ``mesh``;
    ``x_T`` is drawn from ``fold_in(key, 0)`` and the chain uses ``fold_in(key, 1)``.

    Args:
        graphdef: the model's graph definition (``nnx.split``).
        schedule: the `DiscreteSchedule` the model was trained with.
        config: the full config (``data``, ``diffusion.pred_type``, ``sample``).
        mesh: the device mesh.
        num_samples: N.
        sampler: a registered sampler name (default ``config.sample.sampler``).
        options: sampler options (default ``samplers.options_from_config(config)``).

    Returns:
        ``sample_fn(params, key, cond=None, *, guidance_scale=None, eta=None)``: ``params`` an
        ``nnx.State`` (e.g. an EMA); ``cond`` a condition dict of host arrays with batch N
        (``{"label": int [N]}``); ``guidance_scale`` the classifier-free guidance scale ``s``
        (Stable Diffusion's: ``<= 1`` none, :mod:`diffusion_jax.denoisers`; ``None``: the
        config's, :func:`~diffusion_jax.denoisers.default_guidance_scale`);
        ``eta`` overrides ``options.eta``. The last two are traced.

    Raises:
        ValueError: unknown sampler (here); labels outside ``[0, num_classes)`` or a
            negative or non-finite guidance scale (when called).
        FloatingPointError: a sample with a NaN or Inf (when called).
    """
    sampler = sampler or config.sample.sampler
    samplers.check_sampler(sampler)
    options = options or samplers.options_from_config(config)
    default_scale = denoisers.default_guidance_scale(config)
    n_pad = -(-num_samples // mesh.size) * mesh.size  # round up to a multiple of devices
    shape = (n_pad, config.data.image_size, config.data.image_size, config.data.num_channels)
    batch_sharding = sharding.batch_sharding(mesh)

    def sample(params, key, cond, options, guidance_scale):
        model = nnx.merge(graphdef, params)
        # The denoiser carries the model's parameterisation (a continuous-time model becomes
        # an x0-predictor of discrete t); the sampler reads its pred_type.
        denoise = denoisers.build_denoiser(model, cond, guidance_scale=guidance_scale,
                                           diffusion=config.diffusion, schedule=schedule)
        x_init = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        x_init = jax.lax.with_sharding_constraint(x_init, batch_sharding)
        return samplers.run_with_status(sampler, denoise, schedule, x_init,
                                        jax.random.fold_in(key, 1), options)

    sample_jit = jax.jit(sample, out_shardings=(batch_sharding, sharding.replicated(mesh)))

    def sample_fn(params, key, cond=None, *, guidance_scale=None, eta=None):
        cond = _device_cond(cond, num_samples, n_pad, config.data.num_classes, batch_sharding)
        run_options = options if eta is None else dataclasses.replace(
            options, eta=samplers.make_options(eta=eta).eta)
        scale = denoisers.traced_scale(default_scale if guidance_scale is None
                                       else guidance_scale)
        images, status = sample_jit(params, key, cond, run_options, scale)
        images = np.asarray(jax.device_get(images))[:num_samples]
        samplers.check_finite(images, sampler, status)
        return images

    return sample_fn


def _device_cond(cond, num_samples, n_pad, num_classes, batch_sharding):
    """Host condition dict (batch N) -> padded to ``n_pad`` and sharded; labels range-checked."""
    if not cond:
        return None
    out = {}
    for kind, value in cond.items():
        value = np.asarray(value)
        if value.shape[0] != num_samples:
            raise ValueError(f'cond["{kind}"] has batch {value.shape[0]}, expected {num_samples}.')
        if kind == "label":
            check_labels(value, num_classes)
            value = value.astype(np.int32)
        out[kind] = jax.device_put(np.resize(value, (n_pad,) + value.shape[1:]), batch_sharding)
    return out


def check_labels(labels, num_classes):
    """Raise ``ValueError`` unless every label is an integer in ``[0, num_classes)``.

    An out-of-range label would index past the class embedding and give NaN images.
    """
    labels = np.asarray(labels)
    if num_classes <= 0:
        raise ValueError("Class labels were given but the model is unconditional "
                         "(num_classes = 0).")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 \
            or labels.max() >= num_classes:
        raise ValueError(f"Class labels must be integers in [0, {num_classes - 1}] for this "
                         f"{num_classes}-class model, got values in "
                         f"[{labels.min()}, {labels.max()}].")


def sampling_params(state):
    """The parameters to sample with: the first EMA of a train state, else its raw params."""
    return state.ema_params[0] if state.ema_params else state.params
