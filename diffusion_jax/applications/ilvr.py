"""ILVR: iterative latent variable refinement (Choi et al., 2021).

Sampling is steered toward a reference image ``y`` by replacing the low frequencies of every
sample with those of the reference noised to the same step:

    x_{t-1} <- x'_{t-1} + phi_N(y_{t-1}) - phi_N(x'_{t-1}),   y_{t-1} ~ q(y_{t-1} | y),

where ``x'_{t-1}`` is the unconditional proposal and ``phi_N`` is a low-pass filter: area
downsampling by ``N`` followed by nearest upsampling. That ``phi_N`` is the orthogonal
projection onto images constant on ``N x N`` blocks, so ``phi_N(phi_N(x)) = phi_N(x)`` and,
after a refined step, ``phi_N(x_{t-1}) = phi_N(y_{t-1})`` exactly. At the last step
(``t - 1 = -1``) ``y_{-1} = y``; when that step is refined, ``phi_N(x_0) = phi_N(y)``.
"""
import jax
import jax.numpy as jnp

from diffusion_jax import samplers
from diffusion_jax.applications import common


def lowpass(x, factor):
    """``phi_N(x)``: area downsample by ``factor``, then nearest upsample back, ``[B, H, W, C]``.

    A linear, idempotent, self-adjoint projection; differentiable and jittable.

    Raises:
        ValueError: if ``factor`` does not divide ``H`` and ``W``.
    """
    return common.nearest_upsample(common.area_downsample(x, factor), factor)


def ilvr_hook(reference, sched, factor, *, t_min=-1, t_max=None):
    """Sampler ``step_hook`` applying the ILVR refinement for target steps in ``[t_min, t_max]``.

    ``hook(x', x0_pred, t_prev, key) = x' + phi_N(q_sample(y, t_prev)) - phi_N(x')`` when
    ``t_min <= t_prev <= t_max``, else ``x'``.

    Args:
        reference: ``[B, H, W, C]`` reference images ``y`` in [-1, 1].
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        factor: ``N``; divides ``H`` and ``W``.
        t_min: lowest refined target step; ``-1`` (default) refines the final step too,
            ``k >= 0`` leaves the last ``k + 1`` steps unconstrained (more detail from the model).
        t_max: highest refined target step (default ``T - 1``: all).

    Returns:
        ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev``.

    Raises:
        ValueError: if ``factor`` does not divide the reference's ``H`` and ``W``.
    """
    t_max = sched.num_timesteps - 1 if t_max is None else t_max
    common.check_factor(reference.shape, factor)

    def hook(x_prev, x0_pred, t_prev, key):
        y_prev = common.q_sample_level(sched, reference, t_prev, key)
        refined = x_prev + lowpass(y_prev, factor) - lowpass(x_prev, factor)
        active = (t_prev >= t_min) & (t_prev <= t_max)
        return jnp.where(active, refined, x_prev)

    return hook


def ilvr_sample(denoise, sched, reference, key, *, factor=4, t_min=-1, t_max=None,
                sampler="ddpm", options=None):
    """Sample from ``x_T ~ N(0, I)`` with the ILVR refinement toward ``reference``.

    Args:
        denoise: a :class:`~diffusion_jax.denoisers.Denoiser` (``denoise(x, t)`` with its
            ``pred_type``), e.g. of a continuous-time or EDM model.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        reference: ``[B, H, W, C]`` reference images.
        key: PRNG key, split into ``(x_T key, chain key)``.
        factor: downsampling factor ``N`` (larger: only coarse structure is copied).
        t_min, t_max: refined range of target steps, see :func:`ilvr_hook`.
        sampler: a registered sampler with a step hook: ``"ddpm"`` (as in the paper),
            ``"ddim"``, ...
        options: :class:`~diffusion_jax.samplers.SamplerOptions` (default: the defaults).

    Returns:
        ``[B, H, W, C]`` samples sharing ``phi_N`` with the reference (exactly when the last
        step is refined, ``t_min = -1``).
    """
    x_T_key, chain_key = jax.random.split(key)
    x_T = jax.random.normal(x_T_key, reference.shape, reference.dtype)
    hook = ilvr_hook(reference, sched, factor, t_min=t_min, t_max=t_max)
    return samplers.run(sampler, denoise, sched, x_T, chain_key, common.default_options(options),
                        step_hook=hook)
