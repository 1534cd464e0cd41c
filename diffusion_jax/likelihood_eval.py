"""Bits per dimension of a trained model on data, batched and compiled: ODE and VLB.

* :func:`ode_bits_per_dim`: the exact log-likelihood of the probability-flow ODE
  (:func:`diffusion_jax.sde.likelihood.ode_log_likelihood`, Hutchinson--Skilling trace with
  Rademacher probes) with uniform dequantisation of 8-bit data
  (:func:`~diffusion_jax.sde.likelihood.dequantized_bits_per_dim`): an upper bound on the
  model's bits per dimension that cannot be negative. The score is the model's own for
  ``diffusion.kind`` ``vp`` / ``subvp`` / ``ve`` (score of its SDE); a discrete DDPM model
  (and an EDM one, through :func:`~diffusion_jax.sde.parameterization.discrete_view`) is read
  as the score of the VP SDE matching its schedule
  (:func:`diffusion_jax.sde.adapters.sde_for_schedule`, nearest discrete step); a flow model
  (``kind="flow"``) is that SDE's score at exact noise levels through its velocity
  (:func:`~diffusion_jax.sde.parameterization.score_of_velocity`).
* :func:`vlb_bits_per_dim`: DDPM's variational bound (:func:`diffusion_jax.losses.bits_per_dim`,
  ``T`` network calls per example), discrete models only.

Both split the data into batches of ``batch_size`` (the last one padded), run one jitted
program per batch and return ``[N]`` per-example values; example ``i`` of batch ``j`` uses the
key ``fold_in(key, j)`` (the batch's probes and dequantisation noise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import denoisers, losses
from diffusion_jax.sde import parameterization
from diffusion_jax.sde.adapters import ddpm_score, sde_for_schedule
from diffusion_jax.sde.likelihood import dequantized_bits_per_dim, ode_log_likelihood


def model_score(net, config, schedule):
    """``(sde, score(x, t))`` of a model's denoiser ``net(x, time)`` (see the module docstring)."""
    diff = config.diffusion
    kind = parameterization.kind_of(diff)
    if kind in parameterization.SDE_KINDS:
        sde = parameterization.sde_of(diff)
        return sde, parameterization.score_of_eps_net(net, sde)
    sde = sde_for_schedule(schedule, "vp")
    if kind == "flow":
        return sde, parameterization.score_of_velocity(parameterization.velocity_of_net(net), sde)
    pred_type = "x0" if kind == "edm" else diff.pred_type
    return sde, ddpm_score(parameterization.discrete_view(net, diff, schedule), schedule, sde,
                           pred_type)


def ode_bits_per_dim(graphdef, params, config, schedule, images, key, *, batch_size=128,
                     method="rk4", num_steps=100, trace="hutchinson", eps=1e-5):
    """Dequantised bits/dim ``[N]`` of ``images [N, H, W, C]`` (in [-1, 1], 8-bit grid) under the
    probability-flow ODE of the model ``nnx.merge(graphdef, params)``.

    Args:
        graphdef, params: the model (e.g. :func:`diffusion_jax.loading.load`'s).
        config: its config (``diffusion``).
        schedule: its :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        images: ``[N, H, W, C]`` float in [-1, 1].
        key: PRNG key.
        batch_size: examples per compiled call.
        method, num_steps: ODE solver (``rk4`` with ``num_steps`` uniform steps, or an adaptive
            ``tsit5`` / ``dopri5``).
        trace: ``hutchinson`` (one Rademacher probe per example) or ``exact``.
        eps: the ODE's starting time.

    Returns:
        float64 numpy ``[N]`` bits per dimension.
    """

    def one_batch(params, x, batch_key):
        net = denoisers.build_denoiser(nnx.merge(graphdef, params))
        sde, score = model_score(net, config, schedule)
        log_lik = lambda y, k: ode_log_likelihood(score, sde, y, k, eps=eps, trace=trace,
                                                  method=method, num_steps=num_steps)[0]
        return dequantized_bits_per_dim(log_lik, x, batch_key)

    return _batched(jax.jit(one_batch), params, images, key, batch_size)


def vlb_bits_per_dim(graphdef, params, config, schedule, images, key, *, batch_size=128):
    """DDPM's variational-bound bits/dim ``[N]`` of ``images`` (discrete models only).

    Raises:
        ValueError: for a continuous-time model.
    """
    if parameterization.kind_of(config.diffusion) != "discrete":
        raise ValueError("The VLB bits/dim needs a discrete-time model; use the ODE bits/dim "
                         f"for diffusion.kind={config.diffusion.kind!r}.")

    def one_batch(params, x, batch_key):
        denoise = denoisers.build_denoiser(nnx.merge(graphdef, params))
        return losses.bits_per_dim(denoise, schedule, x, batch_key, config.diffusion.pred_type)

    return _batched(jax.jit(one_batch), params, images, key, batch_size)


def _batched(fn, params, images, key, batch_size):
    """``fn(params, x [b, ...], key) -> [b]`` over ``images`` in padded batches -> ``[N]``."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [N >= 1, H, W, C], got shape {images.shape}.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    n = images.shape[0]
    batch_size = min(int(batch_size), n)
    out = []
    for j, start in enumerate(range(0, n, batch_size)):
        x = images[start:start + batch_size]
        valid = x.shape[0]
        if valid < batch_size:                      # pad: one compiled shape for every batch
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - valid, axis=0)])
        values = fn(params, jnp.asarray(x), jax.random.fold_in(key, j))
        out.append(np.asarray(values, np.float64)[:valid])
    return np.concatenate(out)
