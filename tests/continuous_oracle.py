"""Exact continuous-time (vp / subvp / ve) and EDM networks for tests of the applications.

The data are images with i.i.d. ``N(0, VAR)`` pixels; with a ``cond["image"]`` (an SR model's
upsampled low-res input, factor 2) the data are that image's 2x2 block means plus ``N(0, VAR)``
detail. In VE terms (``y = x0 + sigma n``) the exact denoiser is

    E[x0 | y] = lowpass(c) + VAR / (VAR + sigma^2) (y - lowpass(y))      (with an image c)
    E[x0 | y] = VAR / (VAR + sigma^2) y                                  (without),

and :class:`ContinuousOracle` is the network each ``diffusion.kind`` trains toward: for the SDE
kinds the noise ``eps = (x - m x0) / s`` of ``x = m x0 + s n`` at network time ``999 tau``, for
EDM ``F = (D - c_skip x) / c_out`` at network time ``1000 c_noise(sigma)``.
"""
import jax.numpy as jnp
import ml_collections

from diffusion_jax.applications import ilvr
from diffusion_jax.sde import parameterization, sdes, training

VAR = 0.25


def diffusion_config(kind):
    """A ``config.diffusion`` of ``kind`` with the usual SDE / EDM settings (eps for discrete)."""
    return ml_collections.ConfigDict(dict(
        kind=kind, pred_type="eps", sde_beta_min=0.1, sde_beta_max=20.0, sde_sigma_min=0.01,
        sde_sigma_max=200.0, sde_eps=1e-5, likelihood_weighting=False, edm_sigma_data=0.5,
        edm_p_mean=-1.2, edm_p_std=1.2))


def exact_x0(y, sigma, cond=None):
    """``E[x0 | y = x0 + sigma n]``; ``y: [B, H, W, C]``, ``sigma: [B]``."""
    shrink = (VAR / (VAR + sigma**2))[:, None, None, None]
    image = (cond or {}).get("image")
    if image is None:
        return shrink * y
    return ilvr.lowpass(image, 2) + shrink * (y - ilvr.lowpass(y, 2))


class ContinuousOracle:
    """``model(x, time [B] float, cond=None)``: the exact network of ``diffusion.kind``."""

    num_classes = 0

    def __init__(self, diffusion_cfg):
        self.cfg = diffusion_cfg
        self.kind = parameterization.kind_of(diffusion_cfg)

    def __call__(self, x, time, cond=None):
        if self.kind == "edm":
            sigma = jnp.exp(4.0 * time / parameterization.EDM_NOISE_SCALE)
            c_skip, c_out, c_in, _ = training.edm_preconditioning(sigma, self.cfg.edm_sigma_data)
            y = x / c_in[:, None, None, None]
            d = exact_x0(y, sigma, cond)
            return (d - c_skip[:, None, None, None] * y) / c_out[:, None, None, None]
        sde = parameterization.sde_of(self.cfg)
        m, s = sdes.marginal_coefficients(sde, time / parameterization.VP_TIME_SCALE)
        m_b, s_b = m[:, None, None, None], s[:, None, None, None]
        x0 = exact_x0(x / m_b, s / m, cond)
        return (x - m_b * x0) / s_b
