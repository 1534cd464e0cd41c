"""The compiled text-to-image program over autoencoder latents, given its loaded parts.

One jitted program (:data:`program`) per task and shape does, for ``ids [B, L]`` of the
prompts and ``null_ids [1 or B, L]`` of the negative (default: empty) prompt:

    text    = text_encoder(ids).last_hidden_state                    [B, L, D]
    null    = text_encoder(null_ids).last_hidden_state               [1 or B, L, D]
    denoise = eps_u + s (eps_c - eps_u)                              (s: SD's guidance scale)
    out     = task(denoise, LatentCodec(vae), schedule, ...)         e.g. `sample_runner`:
              z_0 = sampler(denoise, schedule, z_T),  x_0 = vae.decode(z_0 / scaling_factor)

The parts are plain modules: ``unet(z, t, {"text": states})``, an autoencoder with
``encode(x).mode()`` / ``decode(z)`` / ``scaling_factor`` and a text encoder with
``last_hidden_state``. :func:`diffusion_jax.pipelines.text_to_image` (a converted Stable
Diffusion checkpoint or the stages trained here) and the training-time sample grid of the
``latent_diffusion`` objective (:mod:`diffusion_jax.objectives`) both run :func:`sample`, so
the grid is what the pipeline gives for the same parameters, prompts, key and sampler. The
pipelines' image-to-image tasks (img2img, inpainting, inversion) run through :func:`run` with
their runners of :data:`diffusion_jax.applications.tasks.TASK_TABLE`.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import denoisers, image_io, samplers, schedules, sharding
from diffusion_jax.conditioning import text_condition
from diffusion_jax.samplers import chain
from diffusion_jax.sde import parameterization


class LatentCodec(NamedTuple):
    """The latent wrapper: images ``[B, H, W, C]`` in [-1, 1] <-> latents ``[B, H/f, W/f, C_z]``.

    ``encode(x) = mode(q(z | x)) * scaling_factor`` (the posterior mean, so deterministic) and
    ``decode(z) = vae.decode(z / scaling_factor)``: the latents have roughly unit variance,
    which is what the UNet was trained on.
    """
    vae: Any

    def encode(self, images: jax.Array) -> jax.Array:
        return self.vae.encode(images).mode() * self.vae.scaling_factor

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.vae.decode(latents / self.vae.scaling_factor)


class ContinuousTimeUNet(nnx.Module):
    """A UNet trained with a continuous ``diffusion.kind`` as a discrete-time x0-predictor:
    ``unet(z_t [B, h, w, C], t int [B], cond) = discrete_view(net(., ., cond))(z_t, t)`` under
    the schedule of ``diffusion`` (:func:`~diffusion_jax.sde.parameterization.discrete_view`).

    Args:
        net: the trained network ``net(z, time float [B], cond)``.
        diffusion: the run's ``config.diffusion`` (kept frozen, a static attribute).
    """

    def __init__(self, net: nnx.Module, diffusion: ml_collections.ConfigDict):
        self.net, self.in_channels = net, net.in_channels
        self.diffusion = ml_collections.FrozenConfigDict(diffusion)

    def __call__(self, x, t, cond):
        schedule = schedules.schedule_from_config(self.diffusion)
        return parameterization.discrete_view(lambda z, time: self.net(z, time, cond),
                                              self.diffusion, schedule)(x, t)


def sampling_unet(unet: nnx.Module, diffusion: ml_collections.ConfigDict) -> nnx.Module:
    """The UNet of a run trained with ``diffusion`` (its ``config.diffusion``) as every latent
    task takes it: itself for the discrete kind, else :class:`ContinuousTimeUNet`."""
    if parameterization.kind_of(diffusion) == "discrete":
        return unet
    return ContinuousTimeUNet(unet, diffusion)


def latent_factor(vae) -> int:
    """The autoencoder's downsampling factor ``f = 2 ** (levels - 1)``."""
    return 2 ** (len(vae.encoder.down_blocks) - 1)


def sample(parts, schedule, ids, null_ids, key, *, shape, sampler, options, guidance_scale,
           latents=None, mesh=None, decode=True):
    """Text-to-image: ``z_T ~ N(0, I)`` (or ``latents``), the guided chain, decoding.

    Args:
        parts: ``(unet, vae, text_encoder)`` (see the module docstring).
        schedule: the UNet's :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        ids: ``[B, L]`` int token ids of the prompts.
        null_ids: ``[1 or B, L]`` ids of the unconditional half of guidance.
        key: PRNG key; ``z_T`` from ``fold_in(key, 0)`` (unless ``latents``), the chain from
            ``fold_in(key, 1)``.
        shape: ``(B, H/f, W/f, C_z)`` of ``z_T``.
        sampler: a registered sampler name; ``options``: its
            :class:`~diffusion_jax.samplers.SamplerOptions`.
        guidance_scale: ``s`` (Stable Diffusion's; ``None`` or ``<= 1``: no guidance).
        latents: optional ``z_T`` of ``shape``.
        mesh: device mesh to split the batch over (default: a 1-device mesh).
        decode: decode the final latents into images.

    Returns:
        ``(out, status)``: host float32 ``[B, H, W, C]`` images (or ``[B, H/f, W/f, C_z]``
        latents) as the network gives them, and the chain's
        :class:`~diffusion_jax.samplers.chain.ChainStatus` (for :func:`finish`).
    """
    if latents is None:
        latents = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    return run(parts, schedule, sample_runner, sampler, options, ids, null_ids, guidance_scale,
               {"x": latents}, jax.random.fold_in(key, 1), mesh=mesh,
               static=(("decode", decode),))


def run(parts, schedule, task: Callable, sampler, options, ids, null_ids, guidance_scale,
        arrays, key, *, mesh=None, static=()):
    """Pads the batch to a multiple of the mesh's devices, splits it over them, runs
    :data:`program` and un-pads.

    Args:
        parts, schedule, ids, null_ids, guidance_scale: as :func:`sample`.
        task: ``task(denoise, codec, schedule, sampler, options, arrays, key, **static)``, a
            module-level function (it is a static argument of the program), e.g.
            :func:`sample_runner`.
        sampler, options: the registered sampler and its options.
        arrays: dict of ``[B, ...]`` inputs of the task (``{"x": z_T}``, images, masks).
        key: the task's PRNG key.
        mesh: device mesh (default: a 1-device mesh).
        static: ``((name, value), ...)`` hashable keyword arguments of ``task``.

    Returns:
        ``(out [B, ...] host array, status)``; ``status`` is ``None`` for a task without a
        registry chain.
    """
    batch = ids.shape[0]
    mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                                      jax.devices()[:1])
    n_pad = -(-batch // mesh.size) * mesh.size
    pad = lambda a: np.resize(np.asarray(a), (n_pad,) + tuple(np.shape(a)[1:]))
    split = sharding.batch_sharding(mesh)
    ids = jax.device_put(pad(ids), split)
    null_ids = jax.device_put(pad(null_ids) if null_ids.shape[0] == batch else null_ids,
                              sharding.replicated(mesh) if null_ids.shape[0] == 1 else split)
    arrays = {k: jax.device_put(pad(v), split) for k, v in arrays.items()}
    graphdef, state = nnx.split(tuple(parts))
    state = jax.device_put(state, sharding.replicated(mesh))
    scale = denoisers.traced_scale(guidance_scale)
    out, status = program(graphdef, state, options, scale, ids, null_ids, arrays, key,
                          schedule=StaticSchedule(schedule), task=task, sampler=sampler,
                          static=tuple(static))
    return np.asarray(jax.device_get(out))[:batch], status


def finish(out, sampler, output, status=None):
    """Checks finiteness (naming the chain's first non-finite step from ``status``) and
    converts to ``output``: ``"uint8"``; ``"float"``, clipped to [-1, 1] as the uint8 images
    are (a decoder's output overshoots); ``"latents"`` as they are, float32.

    Raises:
        FloatingPointError: a NaN or Inf in ``out``.
    """
    samplers.check_finite(out, sampler, status)
    if output == "uint8":
        return image_io.to_uint8(out)
    out = np.asarray(out, np.float32)
    return np.clip(out, -1.0, 1.0) if output == "float" else out


def sample_runner(denoise, codec, schedule, sampler, options, arrays, key, *, decode):
    """The sampler's chain from ``arrays["x"]`` (``x_T``), ``z_0 = sampler(denoise, schedule,
    x_T)``; decoded when ``decode``. The ``sample`` runner of the one task table
    (:data:`diffusion_jax.applications.tasks.TASK_TABLE`), so a pixel model (identity codec)
    runs it too."""
    z = samplers.run(sampler, denoise, schedule, arrays["x"], key, options)
    return codec.decode(z) if decode else z


class StaticSchedule:
    """A schedule as a static argument of :data:`program`, hashed by its betas: samplers that
    derive Python values from it (``pc``'s step check and part-way start) see it concrete."""

    def __init__(self, schedule: schedules.DiscreteSchedule):
        self.schedule = schedule
        self._key = hashlib.sha256(np.asarray(schedule.betas, np.float32).tobytes()).hexdigest()

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, StaticSchedule) and other._key == self._key


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "task", "sampler", "static"))
def program(graphdef, state, options, scale, ids, null_ids, arrays, key, *, schedule, task,
            sampler, static):
    """One compiled run: text encoding once, ``task`` over latents; also the chain's status
    (where it first went non-finite), ``None`` for a task without one."""
    schedule = schedule.schedule
    unet, vae, text_encoder = nnx.merge(graphdef, state)
    text = text_encoder(ids).last_hidden_state                           # [B, L, D]
    null = text_encoder(null_ids).last_hidden_state                      # [1 or B, L, D]
    denoise = denoisers.build_denoiser(unet, text_condition(text), guidance_scale=scale,
                                       null_text=null, pred_type=options.pred_type)
    with chain.recording() as records:
        out = task(denoise, LatentCodec(vae), schedule, sampler, options, arrays, key,
                   **dict(static))
    return out, chain.combine(records) if records else None
