"""What the continuous-time entries share: the noise-level grid and SDE option groups, and the
adapters that let a discrete DDPM model drive a sigma-space or SDE-time solver.

Each continuous entry (:mod:`.edm`, :mod:`.dpm_solver`, :mod:`.pc`, :mod:`.probability_flow`)
has the registry's signature

    fn(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None) -> x0,

with ``denoise(x [B, H, W, C], t int32 [B])`` a discrete-time model output of type
``options.pred_type`` under ``schedule`` (:class:`~diffusion_jax.schedules.DiscreteSchedule`),
``x_start`` a sample of ``q(x_t)`` at ``t = t_start`` (default ``T - 1``; ``N(0, I)`` there) in
the model's VP scale, and ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev`` called after each
step with ``x_prev`` in VP scale and ``t_prev`` the discrete step nearest to the new noise level
(``-1`` at the end). The model becomes a denoiser of VE noise level with
:func:`~diffusion_jax.sde.adapters.ddpm_denoiser` (nearest discrete step), or a score of an SDE's
time with :func:`~diffusion_jax.sde.adapters.ddpm_score`.

``options`` is a :class:`~diffusion_jax.samplers.SamplerOptions`, or any object with
``num_steps``, ``pred_type`` and ``clip_x0``: each entry reads its settings with
:func:`~.options.read`, so a setting it lacks takes the default its options dataclass declares.

Sigma spacings (from ``sigma_0`` of the schedule to that of ``t_start``): ``karras`` (EDM's
``rho`` ramp), ``uniform`` (the DDIM timesteps ``round(linspace(t_start, 0, N))``, exactly on the
model's grid), ``log`` (uniform in ``log sigma``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers._checks import check_positive, check_t_start, one_of, optional
from diffusion_jax.samplers.options import StepsOptions, option
from diffusion_jax.sde.adapters import (clip_bounds, ddpm_denoiser, ddpm_score, discrete_sigmas,
                                        nearest_timestep)
from diffusion_jax.sde.sdes import SDE_NAMES, marginal_coefficients, time_for_sigma

SIGMA_SPACINGS = ("karras", "uniform", "log")


def _check_sigma_max(field, value):
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{field} must be None or > 0, got {value!r}.")


def _check_sde_eps(field, value):
    if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
        raise ValueError(f"{field} must lie in [0, 1), got {value}.")


@dataclasses.dataclass(frozen=True)
class SigmaCapOptions:
    """Where a solver starting from the prior starts (edm_heun, dpm_solver_pp,
    probability_flow)."""
    sigma_max: float | None = option(
        None, "``None`` or a cap on the top noise level: from the prior, the solver's grid (the "
        "ODE: its time interval) starts at the largest trained ``sigma_k <= sigma_max`` instead "
        "of ``sigma_{T-1}`` (EDM uses 80; a cosine schedule's ``sigma_{T-1}`` is ~2e4, where a "
        "Heun step to the next level is off by ``(sigma - sigma_next) / 2`` times the change of "
        "slope). Ignored when starting part-way (``t_start``).",
        check=optional(_check_sigma_max), kind=float)


@dataclasses.dataclass(frozen=True)
class SigmaGridOptions(StepsOptions, SigmaCapOptions):
    """The noise-level grid of the sigma-space solvers (edm_heun, dpm_solver_pp)."""
    sigma_spacing: str | None = option(
        None, "noise-level grid: ``karras``, ``uniform`` or ``log``; ``None``: the solver's "
        "default (edm_heun karras, dpm_solver_pp log).",
        check=optional(one_of(SIGMA_SPACINGS)), kind=str)
    rho: float = option(7.0, "Karras grid exponent (``sigma_i^(1/rho)`` uniform).",
                        check=check_positive, traced=True)


@dataclasses.dataclass(frozen=True)
class SDEOptions(StepsOptions):
    """The SDE of the SDE-time solvers (pc, probability_flow)."""
    sde: str = option("vp", "``vp``, ``subvp`` or ``ve``: the SDE the solver integrates.",
                      check=one_of(sorted(SDE_NAMES)))
    sde_eps: float = option(
        1e-3, "last time of the SDE / ODE solvers (``t`` from ``t_start`` down to ``sde_eps``).",
        check=_check_sde_eps)


def sigma_grid(schedule, num_steps, spacing="karras", t_start=None, rho=7.0):
    """Decreasing noise levels ``[num_steps]`` from ``t_start``'s (default ``T - 1``) to sigma_0.

    Raises:
        ValueError: for an unknown spacing, ``num_steps < 1`` or a bad ``t_start``.
    """
    if spacing not in SIGMA_SPACINGS:
        raise ValueError(f"Unknown sigma_spacing {spacing!r}; expected one of "
                         f"{list(SIGMA_SPACINGS)}.")
    t_top = check_t_start(t_start, schedule.num_timesteps)
    if int(num_steps) != num_steps or not 1 <= num_steps <= t_top + 1:
        raise ValueError(f"num_steps must be an integer in [1, {t_top + 1}], got {num_steps!r}.")
    sigmas = discrete_sigmas(schedule)
    if spacing == "uniform":
        ts = np.floor(np.linspace(t_top, 0, int(num_steps)) + 0.5).astype(np.int32)
        return sigmas[ts]
    if num_steps == 1:
        return sigmas[t_top][None]
    if spacing == "log":
        return jnp.exp(jnp.linspace(jnp.log(sigmas[t_top]), jnp.log(sigmas[0]), int(num_steps)))
    return karras_sigmas(num_steps, sigmas[0], sigmas[t_top], rho)


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's noise levels (Karras et al., 2022, eq. 5).

    ``sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.

    Args:
        num_steps: static ``N >= 1`` (``N = 1`` gives ``[sigma_max]``).
        sigma_min, sigma_max: ``0 < sigma_min < sigma_max`` (may be traced).
        rho: ``> 0``; larger concentrates the steps at small sigma (EDM uses 7).

    Returns:
        ``[N]`` float32, decreasing from ``sigma_max`` to ``sigma_min`` (no trailing zero).

    Raises:
        ValueError: for ``N < 1``, ``rho <= 0`` or a bad sigma range.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if _concrete(sigma_min, sigma_max) and not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max, got sigma_min="
                         f"{sigma_min}, sigma_max={sigma_max}.")
    if _concrete(rho) and not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}.")
    ramp = jnp.linspace(0.0, 1.0, int(num_steps)) if num_steps > 1 else jnp.zeros(1)
    lo, hi = jnp.asarray(sigma_min) ** (1.0 / rho), jnp.asarray(sigma_max) ** (1.0 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).astype(jnp.float32)


def capped_top(schedule, sigma_max):
    """The largest step ``k`` with ``sigma_k <= sigma_max`` (``T - 1`` when all are), as int.

    A prior sample ``n ~ N(0, I)`` is then read as the VP state at ``k``: it lacks the signal
    ``sqrt(alpha_bar_k) x_0``, which is ``x_0 / sqrt(1 + sigma_k^2)`` (1.2 % of it at 80).

    Raises:
        ValueError: if ``sigma_max < sigma_0`` (no trained level lies below the cap).
    """
    with jax.ensure_compile_time_eval():
        sigmas = np.asarray(discrete_sigmas(schedule), np.float64)
    top = int(np.searchsorted(sigmas, float(sigma_max), side="right")) - 1
    if top < 0:
        raise ValueError(f"sigma_max={sigma_max} is below the schedule's smallest noise level "
                         f"sigma_0={sigmas[0]:.4g}.")
    return min(top, sigmas.shape[0] - 1)


def denoiser_setup(denoise, schedule, x_start, options, settings, t_start, default_spacing):
    """Denoiser, sigma grid and the VE-scaled start ``x_start / sqrt(alpha_bar_top)``.

    ``settings``: the entry's :class:`SigmaGridOptions` (a subclass instance)."""
    denoiser = ddpm_denoiser(denoise, schedule, options.pred_type, clip_bounds(options.clip_x0))
    t_top = check_t_start(t_start, schedule.num_timesteps)
    if t_start is None and settings.sigma_max is not None:
        t_top = capped_top(schedule, settings.sigma_max)
    sigmas = sigma_grid(schedule, settings.num_steps, settings.sigma_spacing or default_spacing,
                        t_top, settings.rho)
    return denoiser, sigmas, x_start / schedule.sqrt_alphas_cumprod[t_top]


def score_setup(denoise, schedule, sde, x_start, options, t_start):
    """Score of the SDE's time, the start in SDE scale, and its time ``t0`` (at ``sigma_top``)."""
    score = ddpm_score(denoise, schedule, sde, options.pred_type, clip_bounds(options.clip_x0))
    t_top = check_t_start(t_start, schedule.num_timesteps)
    t0 = time_for_sigma(sde, discrete_sigmas(schedule)[t_top])
    m0, _ = marginal_coefficients(sde, t0)
    return score, x_start / schedule.sqrt_alphas_cumprod[t_top] * m0, t0


def vp_hook(step_hook, schedule):
    """A registry hook as a hook of the sigma-space samplers (VE scale <-> VP scale)."""
    if step_hook is None:
        return None

    def hook(x, x0_pred, sigma_next, key):
        scale = 1.0 / jnp.sqrt(1.0 + sigma_next**2)
        t_prev = jnp.where(sigma_next > 0, nearest_timestep(schedule, sigma_next), -1)
        return step_hook(x * scale, x0_pred, t_prev, key) / scale

    return hook


def sde_hook(step_hook, schedule, sde):
    """A registry hook as a hook of the SDE-time samplers (SDE scale <-> VP scale)."""
    if step_hook is None:
        return None
    to_vp = vp_hook(step_hook, schedule)

    def hook(x, x0_pred, t_next, key):
        m, s = marginal_coefficients(sde, jnp.maximum(t_next, 1e-12))
        sigma = jnp.where(t_next > 0, s / m, 0.0)
        m = jnp.where(t_next > 0, m, 1.0)
        return to_vp(x / m, x0_pred, sigma, key) * m

    return hook


def _concrete(*values):
    return all(isinstance(v, (int, float)) for v in values)
