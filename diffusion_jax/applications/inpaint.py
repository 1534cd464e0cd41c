"""Inpainting by known-pixel replacement, with optional RePaint resampling (Lugmayr et al., 2022).

After every reverse step the known region is overwritten by the known image noised to the same
step (a fresh draw of the forward process):

    x_{t-1} <- m * q_sample(x_known, t-1) + (1 - m) * x_{t-1},

where ``m = 1`` marks known pixels. The last step (``t - 1 = -1``) writes ``x_known`` itself, so
the output equals ``x_known`` exactly on the known pixels.

RePaint adds resampling: after descending ``jump_length`` steps the chain is pushed back up with
the forward transitions ``x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z`` and descended again,
``jump_n_sample - 1`` extra times per jump point, so the generated region has more steps to
harmonise with the known one.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import samplers
from diffusion_jax.applications import common


def known_pixels_hook(x_known, mask, sched):
    """Sampler ``step_hook`` that writes the noised known image into the known region.

    ``hook(x_prev, x0_pred, t_prev, key) = m * q_sample(x_known, t_prev) + (1 - m) * x_prev``
    (``x_known`` itself at ``t_prev = -1``).

    Args:
        x_known: ``[B, H, W, C]`` image whose known pixels are kept.
        mask: ``1`` on known pixels, ``0`` elsewhere; broadcastable to ``x_known``
            (e.g. ``[B, H, W, 1]`` or ``[H, W, 1]``).
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.

    Returns:
        ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev``.
    """
    mask = jnp.asarray(mask, x_known.dtype)

    def hook(x_prev, x0_pred, t_prev, key):
        known = common.q_sample_level(sched, x_known, t_prev, key)
        return mask * known + (1.0 - mask) * x_prev

    return hook


def inpaint(denoise, sched, x_known, mask, key, *, sampler="ddpm", options=None, jump_length=10,
            jump_n_sample=1):
    """Fill the unknown region (``mask = 0``) of ``x_known`` with the diffusion model.

    Args:
        denoise: a :class:`~diffusion_jax.denoisers.Denoiser` (``denoise(x, t)`` with its
            ``pred_type``), e.g. of a continuous-time or EDM model.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule` with ``T`` steps.
        x_known: ``[B, H, W, C]`` in [-1, 1]; values under ``mask = 0`` are ignored.
        mask: ``1`` on known pixels, broadcastable to ``x_known``.
        key: PRNG key (``x_T`` and the chain).
        sampler: a registered sampler with a step hook (``"ddpm"``, ``"ddim"``, ...).
        options: :class:`~diffusion_jax.samplers.SamplerOptions` (default: the defaults).
        jump_length, jump_n_sample: RePaint resampling; ``jump_n_sample = 1`` disables it.
            Resampling uses DDPM steps, whatever ``sampler`` says.

    Returns:
        ``[B, H, W, C]``, equal to ``x_known`` where ``mask = 1``.
    """
    options = common.default_options(options)
    x_T_key, chain_key = jax.random.split(key)
    x_T = jax.random.normal(x_T_key, x_known.shape, x_known.dtype)
    hook = known_pixels_hook(x_known, mask, sched)
    if jump_n_sample > 1:
        return repaint_sample(denoise, sched, x_T, hook, chain_key, jump_length=jump_length,
                              jump_n_sample=jump_n_sample, options=options)
    return samplers.run(sampler, denoise, sched, x_T, chain_key, options, step_hook=hook)


def repaint_schedule(num_timesteps, jump_length, jump_n_sample):
    """The sequence of steps RePaint visits, from ``T - 1`` down to ``-1`` (the clean image).

    The chain descends one step at a time; on reaching a step ``t`` that is a multiple of
    ``jump_length`` below ``T - jump_length``, it climbs back ``jump_length`` steps, at most
    ``jump_n_sample - 1`` times per such ``t``. Without jumps it is ``T-1, T-2, ..., 0, -1``.

    Args:
        num_timesteps: ``T``.
        jump_length: steps climbed per jump, ``>= 1``.
        jump_n_sample: visits of each jump segment, ``>= 1``.

    Returns:
        ``[N]`` int32 numpy array; consecutive entries differ by exactly 1.

    Raises:
        ValueError: if ``jump_length`` or ``jump_n_sample`` is below 1.

    Example:
        >>> repaint_schedule(4, 2, 2)   # [3, 2, 1, 0, 1, 2, 1, 0, -1]
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and "
                         f"{jump_n_sample}.")
    jumps_left = {t: jump_n_sample - 1 for t in range(0, num_timesteps - jump_length, jump_length)}
    t = num_timesteps - 1
    path = [t]
    while t >= 0:
        t -= 1
        path.append(t)
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            path.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    return np.asarray(path, np.int32)


def repaint_sample(denoise, sched, x_T, step_hook, key, *, jump_length=10, jump_n_sample=10,
                   options=None):
    """DDPM chain along :func:`repaint_schedule`, one ``lax.scan``.

    A down move ``t -> t-1`` is :func:`~diffusion_jax.samplers.ddpm_step` followed by
    ``step_hook(x_{t-1}, x0_pred, t-1, key)``; an up move ``t -> t+1`` draws from the forward
    transition ``q(x_{t+1} | x_t) = N(sqrt(alpha_{t+1}) x_t, beta_{t+1} I)``. Move ``i`` uses
    ``fold_in(key, i)``.

    Args:
        denoise, sched: as :func:`~diffusion_jax.samplers.ddpm_sample`.
        x_T: ``[B, ...]`` start at step ``T - 1``.
        step_hook: ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev`` (e.g.
            :func:`known_pixels_hook`).
        key: PRNG key.
        jump_length, jump_n_sample: see :func:`repaint_schedule`.
        options: :class:`~diffusion_jax.samplers.SamplerOptions`; ``variance`` and
            ``clip_x0`` apply (the DDPM step); ``pred_type`` is the denoiser's when it declares
            one (:func:`~diffusion_jax.samplers.for_denoiser`).

    Returns:
        ``x_0 [B, ...]``.
    """
    options = samplers.for_denoiser(common.default_options(options), denoise)
    path = repaint_schedule(sched.num_timesteps, jump_length, jump_n_sample)
    ts, t_nexts = jnp.asarray(path[:-1]), jnp.asarray(path[1:])

    def body(x, inputs):
        i, t, t_next = inputs
        move_key, hook_key = jax.random.split(jax.random.fold_in(key, i))

        def down(x):
            x_prev, x0_pred = samplers.ddpm_step(denoise, sched, x, t, move_key,
                                                 pred_type=options.pred_type,
                                                 variance=options.variance,
                                                 clip_x0=options.clip_x0)
            return step_hook(x_prev, x0_pred, t_next, hook_key)

        def up(x):
            alpha = sched.alphas[t_next]
            z = jax.random.normal(move_key, x.shape, x.dtype)
            return jnp.sqrt(alpha) * x + jnp.sqrt(1.0 - alpha) * z

        return lax.cond(t_next < t, down, up, x), None

    x, _ = lax.scan(body, x_T, (jnp.arange(ts.shape[0]), ts, t_nexts))
    return x
