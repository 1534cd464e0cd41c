"""Pieces shared by the discrete-time samplers (:mod:`.ddpm`, :mod:`.ddim`)."""
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import to_x0_and_eps
from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import call_denoiser
from diffusion_jax.schedules import extract
from diffusion_jax.sde.adapters import dynamic_threshold as threshold_x0


def with_dynamic_threshold(denoise, schedule, pred_type, percentile):
    """``(denoise, pred_type)``, or with a ``percentile`` an x0-denoiser whose predictions are
    dynamically thresholded (the eps used by the step then follows them)."""
    if percentile is None:
        return denoise, pred_type

    def x0_denoise(x, t):
        alpha_bar = extract(schedule.alphas_cumprod, t, x.ndim)
        x0, _ = to_x0_and_eps(call_denoiser(denoise, x, t), x, alpha_bar, pred_type)
        return threshold_x0(x0, percentile)

    return x0_denoise, "x0"


def run_chain(step, x, key, ts, t_prevs, step_hook, return_trajectory):
    """Scans ``step(x, t, t_prev, key) -> (x_prev, x0_pred)`` over ``ts`` [S], then the hook."""

    def body(x, inputs):
        i, t, t_prev = inputs
        noise_key, hook_key = jax.random.split(jax.random.fold_in(key, i))
        x_prev, x0_pred = step(x, t, t_prev, noise_key)
        if step_hook is not None:
            x_prev = step_hook(x_prev, x0_pred, t_prev, hook_key)
        return x_prev, (x_prev if return_trajectory else None)

    x, traj = chain.scan(body, x, (jnp.arange(ts.shape[0]), ts, t_prevs), levels=ts,
                         level_name="t")
    return (x, traj) if return_trajectory else x


def predict_x0_eps(denoise, sched, x_t, t_b, pred_type, clip_x0, keep_eps=False):
    """``(x0, eps)`` from the denoiser at ``t_b`` [B]; with ``clip_x0``, eps follows clipped x0
    unless ``keep_eps``."""
    alpha_bar = extract(sched.alphas_cumprod, t_b, x_t.ndim)               # [B, 1, ..., 1]
    x0, eps = to_x0_and_eps(call_denoiser(denoise, x_t, t_b), x_t, alpha_bar, pred_type)
    if clip_x0 is not None:
        clipped, eps_clipped = to_x0_and_eps(jnp.clip(x0, *clip_x0), x_t, alpha_bar, "x0")
        x0, eps = clipped, (eps if keep_eps else eps_clipped)
    return x0, eps
