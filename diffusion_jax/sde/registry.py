"""The continuous samplers behind the sampler registry's contract for discrete DDPM models.

Each function has the registry's signature

    fn(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None) -> x0,

with ``denoise(x [B, H, W, C], t int32 [B])`` a discrete-time model output of type
``options.pred_type`` under ``schedule`` (:class:`~diffusion_jax.schedules.DiscreteSchedule`),
``x_start`` a sample of ``q(x_t)`` at ``t = t_start`` (default ``T - 1``; ``N(0, I)`` there) in
the model's VP scale, and ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev`` called after each
step with ``x_prev`` in VP scale and ``t_prev`` the discrete step nearest to the new noise level
(``-1`` at the end). The model becomes a denoiser of VE noise level with
:func:`~diffusion_jax.sde.adapters.ddpm_denoiser` (nearest discrete step), or a score of an SDE's
time with :func:`~diffusion_jax.sde.adapters.ddpm_score`.

``options`` is any object with ``num_steps``, ``pred_type`` and ``clip_x0`` attributes; the
solver-specific ones are read with these defaults when absent or ``None`` (the sampler
registry's :class:`~diffusion_jax.samplers.SamplerOptions` has them all):

* :func:`edm_heun`: ``rho=7``, ``sigma_spacing="karras"``, ``churn=0`` (S_churn),
  ``s_tmin=0``, ``s_tmax=inf``, ``s_noise=1``, ``dynamic_threshold=None``.
  ``2 num_steps - 1`` network evaluations.
* :func:`dpm_solver_pp`: ``order=2``, ``sigma_spacing="log"``, ``rho=7``,
  ``dynamic_threshold=None``. ``num_steps`` evaluations. (Uniform timesteps put a long last
  step in ``log sigma`` after short ones; the multistep extrapolation then overshoots: on
  Gaussian data from ``t = 300`` with 10 steps, 2M's error is 0.19 with ``uniform`` spacing,
  0.015 with ``log``, 0.025 with ``karras``, against DDIM's 0.13.)
* :func:`predictor_corrector`: ``sde="vp"``, ``predictor="reverse_diffusion"``,
  ``corrector="langevin"``, ``snr=0.16``, ``n_corrector_steps=1``, ``sde_eps=1e-3``;
  ``num_steps`` grid points, ``num_steps (1 + n_corrector_steps)`` evaluations.
* :func:`probability_flow`: ``sde="vp"``, ``method="rk4"`` (``euler``, ``heun``, ``rk4``,
  ``tsit5``, ``dopri5``), ``sde_eps=1e-3``, ``rtol=1e-5``, ``atol=1e-5``, ``max_steps=4096``;
  fixed-step evaluations ``num_steps`` times 1 / 2 / 4, plus one for the final Tweedie step.

Sigma spacings (from ``sigma_0`` of the schedule to that of ``t_start``): ``karras`` (EDM's
``rho`` ramp), ``uniform`` (the DDIM timesteps ``round(linspace(t_start, 0, N))``, exactly on the
model's grid), ``log`` (uniform in ``log sigma``).
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sde.adapters import (clip_bounds, ddpm_denoiser, ddpm_score, discrete_sigmas,
                                        nearest_timestep)
from diffusion_jax.sde.dpm_solver import dpm_solver_pp_sample
from diffusion_jax.sde.edm import edm_sample, karras_sigmas
from diffusion_jax.sde.ode import ode_sample
from diffusion_jax.sde.pc import pc_sample
from diffusion_jax.sde.sdes import (VESDE, SubVPSDE, VPSDE, marginal_coefficients,
                                    time_for_sigma)

SIGMA_SPACINGS = ("karras", "uniform", "log")


def edm_heun(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """EDM's Heun sampler (:func:`~diffusion_jax.sde.edm.edm_sample`) on a discrete model."""
    denoiser, sigmas, x_ve = _denoiser_setup(denoise, schedule, x_start, options, t_start,
                                             "karras")
    return edm_sample(denoiser, sigmas, x_ve, key, s_churn=_opt(options, "churn", 0.0),
                      s_tmin=_opt(options, "s_tmin", 0.0),
                      s_tmax=_opt(options, "s_tmax", float("inf")),
                      s_noise=_opt(options, "s_noise", 1.0),
                      dynamic_threshold=_opt(options, "dynamic_threshold", None),
                      step_hook=_vp_hook(step_hook, schedule))


def dpm_solver_pp(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """DPM-Solver++ (:func:`~diffusion_jax.sde.dpm_solver.dpm_solver_pp_sample`), 2M by default."""
    denoiser, sigmas, x_ve = _denoiser_setup(denoise, schedule, x_start, options, t_start,
                                             "log")
    return dpm_solver_pp_sample(denoiser, sigmas, x_ve, key, order=_opt(options, "order", 2),
                                dynamic_threshold=_opt(options, "dynamic_threshold", None),
                                step_hook=_vp_hook(step_hook, schedule))


def predictor_corrector(denoise, schedule, x_start, key, options, *, t_start=None,
                        step_hook=None):
    """Predictor--corrector sampling (:func:`~diffusion_jax.sde.pc.pc_sample`) of ``options.sde``.

    ``t_start`` needs a concrete schedule (its continuous start time fixes the grid's length).

    Raises:
        ValueError: for a VP / sub-VP SDE with ``num_steps <= beta_max`` and a predictor or
            corrector that uses score_sde's discretisation (``reverse_diffusion``,
            ``ancestral``, ``langevin``, ``annealed_langevin``: ``beta_i >= 1`` gives NaN).
    """
    with jax.ensure_compile_time_eval():                    # concrete t0 also inside jax.jit
        sde = sde_for_schedule(schedule, _opt(options, "sde", "vp"), options.num_steps)
        predictor = _opt(options, "predictor", "reverse_diffusion")
        corrector = _opt(options, "corrector", "langevin")
        _check_pc_steps(sde, predictor, corrector, options.num_steps)
        score, x_sde, t0 = _score_setup(denoise, schedule, sde, x_start, options, t_start)
    return pc_sample(score, sde, x_sde, key,
                     predictor=predictor,
                     corrector=corrector,
                     snr=_opt(options, "snr", 0.16),
                     n_corrector_steps=_opt(options, "n_corrector_steps", 1),
                     eps=_opt(options, "sde_eps", 1e-3),
                     t_start=1.0 if t_start is None else float(t0),
                     step_hook=_sde_hook(step_hook, schedule, sde))


def probability_flow(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """Probability-flow ODE sampling (:func:`~diffusion_jax.sde.ode.ode_sample`) of ``options.sde``.

    ``step_hook`` (fixed-step methods only) gets ``x0_pred = x_prev`` (the ODE state carries no
    separate prediction).
    """
    sde = sde_for_schedule(schedule, _opt(options, "sde", "vp"))
    if t_start is None and _opt(options, "sigma_max", None) is not None:  # start from the prior at the capped level, as edm_heun / dpm_solver_pp do
        t_start = capped_top(schedule, options.sigma_max)
    score, x_sde, t0 = _score_setup(denoise, schedule, sde, x_start, options, t_start)
    hook = None
    if step_hook is not None:
        sde_hook = _sde_hook(step_hook, schedule, sde)
        hook = lambda x, t_next, hook_key: sde_hook(x, x, t_next, hook_key)
    return ode_sample(score, sde, x_sde, key, method=_opt(options, "method", "rk4"),
                      num_steps=options.num_steps, eps=_opt(options, "sde_eps", 1e-3),
                      t_start=1.0 if t_start is None else t0,
                      rtol=_opt(options, "rtol", 1e-5), atol=_opt(options, "atol", 1e-5),
                      max_steps=_opt(options, "max_steps", 4096), step_hook=hook)


def sde_for_schedule(schedule, name="vp", num_scales=1000):
    """The continuous SDE that matches a discrete schedule.

    VP / sub-VP: ``beta_min = T beta_0``, ``beta_max = T beta_{T-1}`` (exact for the linear
    schedule, whose ``beta_i`` are ``beta(t_i) / T``; for other schedules only the time
    parameterisation differs, since the model is queried by noise level). VE: ``sigma_min`` and
    ``sigma_max`` are the schedule's first and last
    :func:`~diffusion_jax.sde.adapters.discrete_sigmas`.

    Raises:
        ValueError: for an unknown ``name``.
    """
    t = schedule.num_timesteps
    if name in ("vp", "subvp"):
        cls = VPSDE if name == "vp" else SubVPSDE
        return cls(t * schedule.betas[0], t * schedule.betas[-1], int(num_scales))
    if name == "ve":
        sigmas = discrete_sigmas(schedule)
        return VESDE(sigmas[0], sigmas[-1], int(num_scales))
    raise ValueError(f"Unknown sde {name!r}; expected one of ['subvp', 've', 'vp'].")


def sigma_grid(schedule, num_steps, spacing="karras", t_start=None, rho=7.0):
    """Decreasing noise levels ``[num_steps]`` from ``t_start``'s (default ``T - 1``) to sigma_0.

    Raises:
        ValueError: for an unknown spacing, ``num_steps < 1`` or a bad ``t_start``.
    """
    if spacing not in SIGMA_SPACINGS:
        raise ValueError(f"Unknown sigma_spacing {spacing!r}; expected one of "
                         f"{list(SIGMA_SPACINGS)}.")
    t_top = _t_top(schedule, t_start)
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


def _denoiser_setup(denoise, schedule, x_start, options, t_start, default_spacing):
    """Denoiser, sigma grid and the VE-scaled start ``x_start / sqrt(alpha_bar_top)``."""
    denoiser = ddpm_denoiser(denoise, schedule, options.pred_type, clip_bounds(options.clip_x0))
    t_top = _t_top(schedule, t_start)
    if t_start is None and _opt(options, "sigma_max", None) is not None:
        t_top = capped_top(schedule, options.sigma_max)
    sigmas = sigma_grid(schedule, options.num_steps,
                        _opt(options, "sigma_spacing", default_spacing), t_top,
                        _opt(options, "rho", 7.0))
    return denoiser, sigmas, x_start / schedule.sqrt_alphas_cumprod[t_top]


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


def _score_setup(denoise, schedule, sde, x_start, options, t_start):
    """Score of the SDE's time, the start in SDE scale, and its time ``t0`` (at ``sigma_top``)."""
    score = ddpm_score(denoise, schedule, sde, options.pred_type, clip_bounds(options.clip_x0))
    t_top = _t_top(schedule, t_start)
    t0 = time_for_sigma(sde, discrete_sigmas(schedule)[t_top])
    m0, _ = marginal_coefficients(sde, t0)
    return score, x_start / schedule.sqrt_alphas_cumprod[t_top] * m0, t0


def _vp_hook(step_hook, schedule):
    """A registry hook as a hook of the sigma-space samplers (VE scale <-> VP scale)."""
    if step_hook is None:
        return None

    def hook(x, x0_pred, sigma_next, key):
        scale = 1.0 / jnp.sqrt(1.0 + sigma_next**2)
        t_prev = jnp.where(sigma_next > 0, nearest_timestep(schedule, sigma_next), -1)
        return step_hook(x * scale, x0_pred, t_prev, key) / scale

    return hook


def _sde_hook(step_hook, schedule, sde):
    """A registry hook as a hook of the SDE-time samplers (SDE scale <-> VP scale)."""
    if step_hook is None:
        return None
    vp_hook = _vp_hook(step_hook, schedule)

    def hook(x, x0_pred, t_next, key):
        m, s = marginal_coefficients(sde, jnp.maximum(t_next, 1e-12))
        sigma = jnp.where(t_next > 0, s / m, 0.0)
        m = jnp.where(t_next > 0, m, 1.0)
        return vp_hook(x / m, x0_pred, sigma, key) * m

    return hook


def _check_pc_steps(sde, predictor, corrector, num_steps):
    """score_sde's VP discretisation ``beta_i = beta(t_i) / N`` (used by the reverse-diffusion
    and ancestral predictors and the Langevin correctors) needs ``beta_i < 1``."""
    uses_beta_i = (predictor in ("reverse_diffusion", "ancestral")
                   or corrector in ("langevin", "annealed_langevin"))
    if uses_beta_i and not isinstance(sde, VESDE) and float(sde.beta_max) >= num_steps:
        raise ValueError(
            f"pc with predictor {predictor!r} and corrector {corrector!r} on a VP / sub-VP SDE "
            f"needs num_steps > beta_max = {float(sde.beta_max):.3g} (else beta_i >= 1 gives "
            f"NaN); got num_steps={num_steps}. Use more steps, or predictor 'euler_maruyama' "
            "with corrector 'none'.")


def _opt(options, name, default):
    """``options.name``, or ``default`` when it is missing or ``None``."""
    value = getattr(options, name, None)
    return default if value is None else value


def _t_top(schedule, t_start):
    num = schedule.num_timesteps
    if t_start is None:
        return num - 1
    if int(t_start) != t_start or not 0 <= t_start <= num - 1:
        raise ValueError(f"t_start must be a static integer in [0, {num - 1}], got {t_start!r}.")
    return int(t_start)
