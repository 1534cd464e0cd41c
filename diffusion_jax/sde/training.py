"""Continuous-time training objectives: denoising score matching of an SDE, and EDM's loss.

* :func:`continuous_dsm_loss` (Song et al., 2021, eq. 7): ``t ~ U(eps, 1)``,
  ``x_t = m(t) x_0 + s(t) z`` and ``lambda(t) || score(x_t, t) + z / s(t) ||^2`` with
  ``lambda = s^2`` (the default) or ``g(t)^2`` (likelihood weighting, Song et al., 2021b).
* EDM (Karras et al., 2022): the preconditioned denoiser
  ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with

      c_skip = sd^2 / (sigma^2 + sd^2),     c_out = sigma sd / sqrt(sigma^2 + sd^2),
      c_in = 1 / sqrt(sigma^2 + sd^2),      c_noise = log(sigma) / 4,

  ``sd = sigma_data = 0.5``, trained with ``ln sigma ~ N(P_mean, P_std^2)`` (-1.2, 1.2) and the
  weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` on ``||D(x_0 + sigma n) - x_0||^2``,
  which makes the network's effective target unit-variance at every ``sigma``.

Losses average over non-batch dimensions (like :func:`diffusion_jax.losses.denoising_loss`) and
return ``(loss, per_example [B], noise level [B])``.
"""
import jax
import jax.numpy as jnp

from diffusion_jax.sde._util import expand
from diffusion_jax.sde.sdes import check_sde, drift_and_diffusion, marginal_prob


def continuous_dsm_loss(score_fn, sde, x0, key, *, eps=1e-5, likelihood_weighting=False):
    """Continuous-time denoising score matching (see the module docstring).

    ``per_example_b = mean_dims(lambda(t_b) (score(x_t, t)_b + z_b / s_b)^2)``; with
    ``lambda = s^2`` this is ``mean_dims((s score + z)^2)``, score_sde's default.

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``.
        sde: the SDE.
        x0: ``[B, ...]`` data.
        key: PRNG key (split for ``t`` and ``z``).
        eps: smallest time, ``0 < eps < 1``.
        likelihood_weighting: weight by ``g(t)^2`` instead of ``s(t)^2``.

    Returns:
        ``(loss scalar, per_example [B], t [B])``.
    """
    check_sde(sde)
    if isinstance(eps, (int, float)) and not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}.")
    key_t, key_z = jax.random.split(key)
    batch = x0.shape[0]
    t = jax.random.uniform(key_t, (batch,), jnp.float32, eps, 1.0)
    z = jax.random.normal(key_z, x0.shape, jnp.float32)
    mean, std = marginal_prob(sde, x0, t)
    std_b = expand(std, x0.ndim)
    score = score_fn(mean + std_b * z, t).astype(jnp.float32)
    if likelihood_weighting:
        _, g = drift_and_diffusion(sde, x0, t)
        sq = expand(g**2, x0.ndim) * jnp.square(score + z / std_b)
    else:
        sq = jnp.square(std_b * score + z)
    per_example = jnp.mean(sq.reshape(batch, -1), axis=1)
    return jnp.mean(per_example), per_example, t


def edm_preconditioning(sigma, sigma_data=0.5):
    """EDM's ``(c_skip, c_out, c_in, c_noise)``, each shaped as ``sigma`` (module docstring)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    return (sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total),
            0.25 * jnp.log(sigma))


def edm_denoiser(net, sigma_data=0.5):
    """``D(x, sigma) = c_skip x + c_out net(c_in x, c_noise)`` from a raw network.

    Args:
        net: ``net(x_in [B, ...], c_noise [B]) -> [B, ...]``.
        sigma_data: data standard deviation ``sd``.

    Returns:
        ``D(x [B, ...], sigma [B]) -> x0 [B, ...]``.
    """

    def denoiser(x, sigma):
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
        nd = x.ndim
        return expand(c_skip, nd) * x + expand(c_out, nd) * net(expand(c_in, nd) * x, c_noise)

    return denoiser


def edm_loss_weight(sigma, sigma_data=0.5):
    """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2``, shaped as ``sigma``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_lognormal_sigmas(key, batch_size, p_mean=-1.2, p_std=1.2):
    """EDM's training noise levels ``sigma = exp(P_mean + P_std n)``, ``n ~ N(0, 1)``: ``[B]``."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch_size,), jnp.float32))


def edm_loss(denoiser, x0, key, *, sigma_data=0.5, p_mean=-1.2, p_std=1.2):
    """EDM's loss ``lambda(sigma) mean_dims((D(x_0 + sigma n, sigma) - x_0)^2)``, log-normal sigma.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0 [B, ...]`` (e.g. :func:`edm_denoiser`).
        x0: ``[B, ...]`` data.
        key: PRNG key.
        sigma_data, p_mean, p_std: EDM's constants.

    Returns:
        ``(loss scalar, per_example [B], sigma [B])``.
    """
    key_sigma, key_n = jax.random.split(key)
    batch = x0.shape[0]
    sigma = sample_lognormal_sigmas(key_sigma, batch, p_mean, p_std)
    noise = jax.random.normal(key_n, x0.shape, jnp.float32)
    pred = denoiser(x0 + expand(sigma, x0.ndim) * noise, sigma).astype(jnp.float32)
    mse = jnp.mean(jnp.square(pred - x0).reshape(batch, -1), axis=1)
    per_example = edm_loss_weight(sigma, sigma_data) * mse
    return jnp.mean(per_example), per_example, sigma


def dsm_loss(score_fn, x0, sigmas, key):
    """Denoising score matching loss of NCSN (Song & Ermon, 2019), weighted by ``sigma^2``.

    ``sigma_b`` is drawn uniformly from ``sigmas``, ``x~ = x0 + sigma_b z`` with ``z ~ N(0, I)``,
    and

        loss = mean_b 1/2 sigma_b^2 || score_fn(x~, sigma)_b + (x~ - x0)_b / sigma_b^2 ||^2,

    where ``||.||^2`` sums over the non-batch dimensions (as NCSN does).

    Args:
        score_fn: ``score_fn(x [B, ...], sigma [B]) -> [B, ...]``, an estimate of
            ``grad_x log p_sigma(x)``.
        x0: ``[B, ...]`` clean data.
        sigmas: ``[L]`` noise levels.
        key: PRNG key.

    Returns:
        scalar loss.
    """
    key_level, key_z = jax.random.split(key)
    sigma = sigmas[jax.random.randint(key_level, (x0.shape[0],), 0, sigmas.shape[0])]
    sigma_b = jnp.reshape(sigma, (-1,) + (1,) * (x0.ndim - 1))
    z = jax.random.normal(key_z, x0.shape, jnp.float32)
    x_noisy = x0 + sigma_b * z
    target = -z / sigma_b                                       # = -(x~ - x0) / sigma^2
    sq_err = jnp.square(score_fn(x_noisy, sigma).astype(jnp.float32) - target)
    per_example = 0.5 * jnp.square(sigma) * jnp.sum(sq_err.reshape(x0.shape[0], -1), axis=1)
    return jnp.mean(per_example)
