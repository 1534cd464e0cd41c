"""What the flow-matching entries share: their grid's settings and the grid.

The flow entries (:mod:`.flow_euler`, :mod:`.flow_heun`, :mod:`.flow_dpm_solver`) take a
flow-matching model's velocity, not the discrete-step denoiser: the registry hands them

    velocity(x_t [B, ...], t float32 [B]) -> v [B, ...],    x_t = (1 - t) x_0 + t eps,

from the :class:`~diffusion_jax.denoisers.Denoiser` of a ``diffusion.kind="flow"`` model
(its ``velocity``), and refuses other models by name. Their time grid is diffusers'
``FlowMatchEulerDiscreteScheduler``'s (:func:`~diffusion_jax.sde.flow.flow_sigmas`, 1000
training timesteps, as SD3 and Flux use), with its ``shift`` or, with
``use_dynamic_shifting``, Flux's ``mu`` from the image's token count.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from diffusion_jax.samplers._checks import check_positive, check_positive_int, optional
from diffusion_jax.samplers.options import StepsOptions, option
from diffusion_jax.sde.flow import dynamic_shift_mu, flow_sigmas

FLOW_TRAIN_TIMESTEPS = 1000  # diffusers' num_train_timesteps of SD3 / Flux schedulers


@dataclasses.dataclass(frozen=True)
class FlowGridOptions(StepsOptions):
    """The time grid of the flow samplers (diffusers' flow-matching scheduler config)."""
    shift: float = option(
        1.0, "static time shift ``s`` of the flow grid, ``t' = s t / (1 + (s - 1) t)`` (SD3 "
        "uses 3; 1 = none); ignored with ``use_dynamic_shifting``.", check=check_positive)
    use_dynamic_shifting: bool = option(
        False, "Flux's resolution-dependent shift ``t' = e^mu / (e^mu + 1 / t - 1)``, ``mu`` "
        "linear in ``image_seq_len`` from ``base_shift`` to ``max_shift``.")
    base_shift: float = option(0.5, "``mu`` at ``base_image_seq_len`` (dynamic shifting).")
    max_shift: float = option(1.15, "``mu`` at ``max_image_seq_len`` (dynamic shifting).")
    base_image_seq_len: int = option(256, "token count where ``mu = base_shift``.",
                                     check=check_positive_int, convert=int)
    max_image_seq_len: int = option(4096, "token count where ``mu = max_shift``.",
                                    check=check_positive_int, convert=int)
    image_seq_len: int | None = option(
        None, "the image's token count for dynamic shifting; ``None``: ``(H // 2) (W // 2)`` "
        "of the sample ``[B, H, W, C]`` (2x2 patches, as Flux's packed latents).",
        check=optional(check_positive_int), kind=int)

    @staticmethod
    def resolve(values):
        """``max_image_seq_len`` must exceed ``base_image_seq_len`` (``mu`` is a line)."""
        if values["max_image_seq_len"] <= values["base_image_seq_len"]:
            raise ValueError(f"max_image_seq_len ({values['max_image_seq_len']}) must be > "
                             f"base_image_seq_len ({values['base_image_seq_len']}).")


def flow_grid(settings, x_shape):
    """``sigmas [N + 1]`` (float32, 1 -> 0) of ``settings`` for samples of shape ``x_shape``.

    Raises:
        ValueError: dynamic shifting of non-image samples without ``image_seq_len``.
    """
    mu = None
    if settings.use_dynamic_shifting:
        seq_len = settings.image_seq_len
        if seq_len is None:
            if len(x_shape) != 4:
                raise ValueError("use_dynamic_shifting needs image_seq_len for samples that are "
                                 f"not images [B, H, W, C] (got shape {tuple(x_shape)}).")
            seq_len = (x_shape[1] // 2) * (x_shape[2] // 2)
        mu = dynamic_shift_mu(seq_len, settings.base_image_seq_len, settings.max_image_seq_len,
                              settings.base_shift, settings.max_shift)
    return jnp.asarray(flow_sigmas(settings.num_steps, settings.shift, mu,
                                   FLOW_TRAIN_TIMESTEPS))


def velocity_at(velocity, x, t):
    """``velocity(x, t)`` with the scalar time ``t`` given to every example."""
    return velocity(x, jnp.full(x.shape[:1], t, jnp.float32))
