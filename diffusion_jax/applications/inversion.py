"""DDIM inversion, reconstruction and editing (Song et al., 2021; Kim et al., 2022).

Deterministic DDIM (``eta = 0``) is a discretised ODE, so it can be run forward: along the
ascending timesteps ``s_0 = -1 < s_1 < ... < s_S`` (``alpha_bar_{-1} = 1``) of
:func:`~diffusion_jax.samplers.ddim_timesteps`,

    eps      = eps_theta(x_{s_{i-1}}, s_i),
    x0_hat   = (x_{s_{i-1}} - sqrt(1 - alpha_bar_{s_{i-1}}) eps) / sqrt(alpha_bar_{s_{i-1}}),
    x_{s_i}  = sqrt(alpha_bar_{s_i}) x0_hat + sqrt(1 - alpha_bar_{s_i}) eps,

which inverts the DDIM decoder step ``x_{s_i} -> x_{s_{i-1}}`` up to evaluating eps at
``x_{s_{i-1}}`` instead of ``x_{s_i}`` (an O(step^2) error per step, so the round trip
``decode(invert(x_0))`` converges to ``x_0`` as the number of steps grows; a few fixed-point
refinements per step make it exact at any number of steps).

Editing decodes the inverted latent differently: under another condition
(:func:`ddim_edit`, e.g. another class label), or with the gradient of a user loss on the
predicted clean image added at every step (:func:`guided_edit`, the mechanism of
DiffusionCLIP / universal guidance without any CLIP weights).
"""
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import denoisers, diffusion, guidance, samplers


def ddim_invert(denoise, sched, x0, *, num_steps=50, spacing="uniform", t_start=None,
                fixed_point_iters=0, return_trajectory=False):
    """Encode ``x0`` into the DDIM latent at step ``t_start`` (default ``T - 1``).

    With ``fixed_point_iters = K > 0`` each step is refined K times by re-evaluating eps at the
    current estimate of ``x_{s_i}`` (the step's formula with ``eps_theta(x_{s_i}, s_i)``). Its
    fixed point inverts the decoder step exactly, so the round trip is exact up to the
    convergence of the iteration instead of O(1/S) (cost: K more denoiser calls per step).

    Args:
        denoise: a :class:`~diffusion_jax.denoisers.Denoiser` (its ``pred_type`` is used; a
            bare ``f(x, t)`` predicts eps), e.g. of a continuous-time or EDM model.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` clean images.
        num_steps: ``S``, the number of DDIM steps (use the same for decoding).
        spacing: ``"uniform"`` or ``"quadratic"``, see :func:`~.samplers.ddim_timesteps`.
        t_start: last (noisiest) step of the encoding; decode with the same ``t_start``.
        fixed_point_iters: static number K of refinements per step (0: plain DDIM inversion).
        return_trajectory: also return the latent after every step.

    Returns:
        ``x_{t_start} [B, ...]``, or ``(x, trajectory [S, B, ...])``.
    """
    pred_type = denoisers.pred_type_of(denoise)
    ts = samplers.ddim_timesteps(sched.num_timesteps, num_steps, spacing, t_start)[::-1]
    t_froms = jnp.concatenate([jnp.full((1,), -1, jnp.int32), ts[:-1]])    # [S] ascending

    def body(x, inputs):
        t_from, t = inputs
        a_from = jnp.where(t_from >= 0, sched.alphas_cumprod[jnp.maximum(t_from, 0)], 1.0)
        a_to = sched.alphas_cumprod[t]
        t_b = jnp.full((x.shape[0],), t, jnp.int32)

        def step(x_eval):
            _, eps = diffusion.to_x0_and_eps(denoise(x_eval, t_b), x_eval, a_to,
                                            pred_type)
            x0_hat = (x - jnp.sqrt(1.0 - a_from) * eps) / jnp.sqrt(a_from)
            return jnp.sqrt(a_to) * x0_hat + jnp.sqrt(1.0 - a_to) * eps

        x_new = lax.fori_loop(0, fixed_point_iters, lambda _, x_eval: step(x_eval), step(x))
        return x_new, (x_new if return_trajectory else None)

    x, traj = lax.scan(body, x0, (t_froms, ts))
    return (x, traj) if return_trajectory else x


def ddim_decode(denoise, sched, latent, *, num_steps=50, spacing="uniform", t_start=None,
                clip_x0=None):
    """Deterministic DDIM (``eta = 0``) from ``latent`` at step ``t_start`` down to ``x_0``.

    Args:
        denoise, sched: as :func:`ddim_invert`.
        latent: ``[B, ...]`` at step ``t_start`` (default ``T - 1``).
        num_steps, spacing, t_start: as used for :func:`ddim_invert`.
        clip_x0: ``None`` (exact round trips) or a clip range for ``x0_pred``.

    Returns:
        ``x_0 [B, ...]``.
    """
    return samplers.ddim_sample(denoise, sched, latent, jax.random.PRNGKey(0),
                                num_steps=num_steps, eta=0.0, spacing=spacing,
                                pred_type=denoisers.pred_type_of(denoise),
                                clip_x0=clip_x0, t_start=t_start)


def ddim_reconstruct(denoise, sched, x0, *, num_steps=50, spacing="uniform", t_start=None,
                     fixed_point_iters=0):
    """``ddim_decode(ddim_invert(x0))``: the round trip, ``[B, ...] -> [B, ...]``."""
    kwargs = dict(num_steps=num_steps, spacing=spacing, t_start=t_start)
    latent = ddim_invert(denoise, sched, x0, fixed_point_iters=fixed_point_iters, **kwargs)
    return ddim_decode(denoise, sched, latent, **kwargs)


def ddim_edit(denoise_source, denoise_target, sched, x0, *, num_steps=50, spacing="uniform",
              t_start=None, fixed_point_iters=0, clip_x0=None):
    """Invert ``x0`` under one condition and decode it under another.

    ``x_0' = decode_target(invert_source(x_0))``, e.g. ``denoise_source`` conditioned on the
    image's class and ``denoise_target`` on the wanted class (or classifier-free guided toward
    it). With ``t_start < T - 1`` only part of the trajectory is replaced, keeping more of
    the original.

    Args:
        denoise_source: denoiser the image is inverted with.
        denoise_target: denoiser the latent is decoded with.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` images to edit.
        num_steps, spacing, t_start: shared by both passes.
        fixed_point_iters: refinements per inversion step, see :func:`ddim_invert`.
        clip_x0: clip range for the decoding pass.

    Returns:
        ``[B, ...]`` edited images.
    """
    kwargs = dict(num_steps=num_steps, spacing=spacing, t_start=t_start)
    latent = ddim_invert(denoise_source, sched, x0, fixed_point_iters=fixed_point_iters, **kwargs)
    return ddim_decode(denoise_target, sched, latent, clip_x0=clip_x0, **kwargs)


def guided_edit(denoise, sched, x0, loss_fn, *, scale=1.0, num_steps=50, spacing="uniform",
                t_start=None, fixed_point_iters=0, clip_x0=None):
    """Invert ``x0``, then decode it with the gradient of ``loss_fn`` steering every step.

    The decoder uses :func:`~diffusion_jax.guidance.loss_guided_denoiser`:

        eps_hat = eps + s * sqrt(1 - alpha_bar_t) * grad_{x_t} loss(x0_hat(x_t, t)),

    so each step moves toward lower ``loss`` of its predicted clean image while the
    deterministic latent keeps the rest of the image. ``scale = 0`` is
    :func:`ddim_reconstruct`.

    Args:
        denoise: a :class:`~diffusion_jax.denoisers.Denoiser` (or a bare eps ``f(x, t)``).
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` images to edit.
        loss_fn: ``loss_fn(x0_pred [B, ...]) -> [B]``, differentiable (e.g. a distance to a
            target colour in a region, or a classifier's negative log-probability).
        scale: guidance scale ``s``.
        num_steps, spacing, t_start: shared by inversion and decoding.
        fixed_point_iters: refinements per inversion step, see :func:`ddim_invert`.
        clip_x0: clip range for the decoding pass.

    Returns:
        ``[B, ...]`` edited images.
    """
    guided = guidance.loss_guided_denoiser(denoise, sched, loss_fn, scale)
    return ddim_edit(denoise, guided, sched, x0, num_steps=num_steps, spacing=spacing,
                     t_start=t_start, fixed_point_iters=fixed_point_iters, clip_x0=clip_x0)
