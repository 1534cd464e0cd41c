"""SDEdit (Meng et al., 2022): edit an image by noising it part-way and denoising it back.

A guide image ``x_g`` (a stroke painting, a corrupted or out-of-domain image) is perturbed to an
intermediate step ``t_0 = round(t0 * T) - 1`` with the forward process and the reverse chain
is run from there:

    x_{t_0} = sqrt(alpha_bar_{t_0}) x_g + sqrt(1 - alpha_bar_{t_0}) z,   z ~ N(0, I),
    x_0     = reverse sampler (DDPM or DDIM) started at t_0.

Small ``t0`` stays faithful to the guide; ``t0 = 1`` forgets it (up to the
``sqrt(alpha_bar_{T-1})`` of the schedule) and is ordinary sampling. With an ``edit_mask`` only
the masked region is regenerated: outside it, every step writes the guide noised to that step
(the known-pixel replacement of :mod:`diffusion_jax.applications.inpaint`), and the output
equals the guide there.
"""
import jax

from diffusion_jax import samplers
from diffusion_jax.applications import common, inpaint


def sdedit(denoise, sched, guide, key, *, t0=0.5, sampler="ddpm", options=None, edit_mask=None):
    """Perturb ``guide`` to ``t0 * T`` steps of noise and denoise it.

    ``key`` is split into ``(noise_key, chain_key)``: ``z`` is drawn from ``noise_key`` and the
    sampler gets ``chain_key``. So for ``t0 = 1`` the result is exactly
    ``sampler(denoise, sched, q_sample(guide, T - 1, z), chain_key)``.

    Args:
        denoise: a :class:`~diffusion_jax.denoisers.Denoiser` (``denoise(x, t)`` with its
            ``pred_type``), e.g. of a continuous-time or EDM model.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule` with ``T`` steps.
        guide: ``[B, H, W, C]`` guide images in [-1, 1].
        key: PRNG key.
        t0: noise fraction in (0, 1]; the chain starts at step ``round(t0 * T) - 1``.
        sampler: a registered sampler that supports ``t_start``: ``"ddpm"`` (``t_0 + 1``
            steps), ``"ddim"`` (``min(num_steps, t_0 + 1)`` steps from ``t_0``), ...
        options: :class:`~diffusion_jax.samplers.SamplerOptions` (default: the defaults).
        edit_mask: optional, ``1`` where the image may change, broadcastable to ``guide``.

    Returns:
        ``[B, H, W, C]`` edited images.

    Raises:
        ValueError: if ``t0`` is outside (0, 1] or ``sampler`` is unknown or cannot start
            part-way.
    """
    samplers.check_sampler(sampler, t_start=True, step_hook=edit_mask is not None)
    t_start = common.resolve_t_start(t0, sched.num_timesteps)
    noise_key, chain_key = jax.random.split(key)
    x_start = common.q_sample_level(sched, guide, t_start, noise_key)
    hook = None if edit_mask is None else inpaint.known_pixels_hook(guide, 1.0 - edit_mask, sched)
    return samplers.run(sampler, denoise, sched, x_start, chain_key,
                        common.default_options(options), t_start=t_start, step_hook=hook)
