"""Samplers: DDPM ancestral sampling, DDIM, (annealed) Langevin dynamics, and the registry.

Every sampler takes a denoiser callable, never a model. Discrete-time samplers take

    denoise(x, t) -> prediction,    x: [B, ...] float,  t: [B] int32,

where the prediction is of ``pred_type`` (``eps``, ``x0``, ``v`` or ``score``; see
:func:`diffusion_jax.diffusion.to_x0_and_eps`). Conditioning, guidance and the model's
parameters are closed over by the caller. Langevin samplers take a score function instead.

Each sampler is one ``lax.scan`` over its steps, so the denoiser is traced once and the whole
chain compiles to one XLA program. Per-step randomness is ``jax.random.fold_in(key, i)`` with
``i`` the step index (0 for the first, noisiest step).

Jitting: the samplers are plain functions (not decorated with ``jax.jit``). The callables
(``denoise``, ``score_fn``, ``step_hook``) and the Python arguments that fix the program's
structure (``num_steps``, ``spacing``, ``pred_type``, ``variance``, ``clip_x0``, ``t_start``,
``n_steps_each``, ``denoise_final``, ``return_trajectory``) must be static; the schedule,
``x_T``, ``sigmas``, the key and ``eta`` / ``step_lr`` / ``step_size`` may be traced (their
range checks then only run for Python numbers). Bind the static ones with ``functools.partial``::

    sample = jax.jit(functools.partial(ddim_sample, denoise, num_steps=50, eta=0.0))
    x0 = sample(sched, x_T, key)

or call the sampler inside your own jitted function, e.g. one that takes the model parameters
as an argument and builds ``denoise`` from them (this keeps parameters out of the compiled
constants).

The registry
------------
Registered: ``ddpm``, ``ddim``, ``langevin`` (here) and the continuous-time solvers of
:mod:`diffusion_jax.sde.registry` (``edm_heun``, ``dpm_solver_pp``, ``pc``,
``probability_flow``), whose settings are fields of :class:`SamplerOptions` too;
:func:`num_evaluations` gives each one's network evaluations.

:data:`SAMPLERS` maps a name to a :class:`SamplerEntry`; it is the only dispatcher (the CLI,
every application, the training-time sample grid, the figure script and the benchmarks go
through :func:`run`). A registered function has the uniform signature

    fn(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None) -> x_0

* ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]`` of ``options.pred_type``;
  a model, its condition and guidance are closed over (:mod:`diffusion_jax.denoisers`).
* ``schedule``: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
* ``x_start``: float ``[B, ...]``, the chain's start (``N(0, I)``, or a noised image at
  ``t_start``).
* ``key``: PRNG key; per-step keys are ``fold_in(key, i)``.
* ``options``: :class:`SamplerOptions` (a pytree: its float settings, :data:`TRACED_FIELDS`,
  are leaves, so they may be traced and changing them does not recompile; the rest is static).
* ``t_start``: static int, start the chain at that step (SDEdit); only for entries registered
  with ``supports_t_start=True``. ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev`` runs
  after every step (inpainting, ILVR); only with ``supports_step_hook=True``.

A new sampler is one decorated function::

    @samplers.register("my_solver", supports_t_start=False, supports_step_hook=False)
    def _my_solver(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
        ...

Options are built once from ``config.sample`` (+ ``config.diffusion.pred_type``) and flags by
:func:`options_from_config`; a flag left unset (``None``) keeps the config's value.

Non-finite chains
-----------------
Every registered sampler runs its steps with :func:`diffusion_jax.sde.chain.scan`, which also
carries the index of the first step whose state holds a NaN or Inf (the samples are
bit-identical to a plain ``lax.scan``). :func:`run_with_status` returns that status with the
samples, and :func:`check_finite` names the step in its error, e.g. ``sampler 'ddim' produced
non-finite values (NaN/Inf) in 4 of 4 samples (indices [0, 1, 2, 3]), first at step 7 of 10
(t=33); ...``. Steps are numbered from 1 (the noisiest) to ``N``; the level is the discrete
``t``, the VE noise level ``sigma`` or the SDE ``time`` the step started from.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax.diffusion import PRED_TYPES, q_posterior, to_x0_and_eps
from diffusion_jax.schedules import extract
from diffusion_jax.sde import chain, parameterization
from diffusion_jax.sde import registry as sde_registry
from diffusion_jax.sde.adapters import clip_bounds as _clip_bounds
from diffusion_jax.sde.adapters import dynamic_threshold as threshold_x0
from diffusion_jax.sde.ode import METHODS as ODE_METHODS
from diffusion_jax.sde.pc import CORRECTORS, PREDICTORS
from diffusion_jax.sde.sdes import SDE_NAMES

DDPM_VARIANCES = ("posterior", "beta")
DDIM_SPACINGS = ("uniform", "quadratic")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Settings of a registered sampler; a pytree whose float settings (:data:`TRACED_FIELDS`)
    are leaves (traceable: changing them does not recompile), all other fields static.

    Attributes:
        num_steps: DDIM steps / Langevin noise levels / SDE solver steps (DDPM always takes
            every step). Network evaluations per solver: see :data:`NFE_PER_STEP`.
        eta: DDIM noise scale in [0, 1] (0: deterministic).
        spacing: DDIM timestep spacing, ``uniform`` or ``quadratic``.
        pred_type: what the denoiser predicts: ``eps``, ``x0``, ``v`` or ``score``.
        clip_x0: ``None`` or ``(lo, hi)`` (``True``: ``(-1, 1)``), clip of the predicted x0.
        variance: DDPM reverse variance, ``posterior`` or ``beta``.
        langevin_steps_each: Langevin updates per noise level.
        langevin_step_lr: Langevin step size at the last level.
        timesteps: ``None``, or DDIM's explicit ``((t_0, t_prev_0), (t_1, t_prev_1), ...)``
            pairs (``t_prev = -1``: ``alpha_bar = 1``), overriding ``num_steps`` and
            ``spacing`` (e.g. the steps of a diffusers ``DDIMScheduler``).
        clip_keeps_eps: with ``clip_x0``, DDIM keeps the model's raw eps in the direction term
            (diffusers' ``DDIMScheduler``) instead of re-deriving it from the clipped x0.
        dynamic_threshold: ``None`` or Imagen's percentile ``p`` in (0, 1]: every x0
            prediction becomes ``clip(x0, -s, s) / s``, ``s = max(quantile_p(|x0|), 1)``
            (ddpm, ddim, edm_heun, dpm_solver_pp).
        sigma_spacing: noise-level grid of edm_heun / dpm_solver_pp: ``karras``, ``uniform``
            or ``log``; ``None``: the solver's default (karras / log).
        rho: Karras grid exponent (``sigma_i^(1/rho)`` uniform).
        sigma_max: ``None`` or a cap on the top noise level of edm_heun / dpm_solver_pp /
            probability_flow: from the prior, their grid (the ODE: its time interval) starts at the largest trained ``sigma_k <= sigma_max`` instead
            of ``sigma_{T-1}`` (EDM uses 80; a cosine schedule's ``sigma_{T-1}`` is ~2e4, where
            a Heun step to the next level is off by ``(sigma - sigma_next) / 2`` times the
            change of slope). Ignored when starting part-way (``t_start``).
        churn: EDM's ``S_churn`` (0: deterministic Heun).
        s_tmin, s_tmax: churn only for ``s_tmin <= sigma <= s_tmax``.
        s_noise: EDM's ``S_noise`` (scale of the churn noise).
        order: DPM-Solver++ multistep order, 1, 2 or 3.
        sde: ``vp``, ``subvp`` or ``ve``: the SDE of ``pc`` / ``probability_flow``.
        predictor: PC predictor (:data:`~diffusion_jax.sde.pc.PREDICTORS`).
        corrector: PC corrector (:data:`~diffusion_jax.sde.pc.CORRECTORS`).
        snr: Langevin corrector signal-to-noise ratio (step size rule).
        n_corrector_steps: corrector updates per PC step.
        sde_eps: last time of the SDE / ODE solvers (``t`` from ``t_start`` down to ``sde_eps``).
        method: probability-flow ODE method: ``euler``, ``heun``, ``rk4`` (fixed step) or
            ``tsit5``, ``dopri5`` (adaptive, diffrax PID controller).
        rtol, atol: adaptive ODE tolerances.
        max_steps: cap on the adaptive solver's steps.
    """
    num_steps: int = 50
    eta: float = 0.0
    spacing: str = "uniform"
    pred_type: str = "eps"
    clip_x0: tuple[float, float] | None = None
    variance: str = "posterior"
    langevin_steps_each: int = 5
    langevin_step_lr: float = 2e-5
    timesteps: tuple[tuple[int, int], ...] | None = None
    clip_keeps_eps: bool = False
    dynamic_threshold: float | None = None
    sigma_spacing: str | None = None
    rho: float = 7.0
    sigma_max: float | None = None
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    order: int = 2
    sde: str = "vp"
    predictor: str = "reverse_diffusion"
    corrector: str = "langevin"
    snr: float = 0.16
    n_corrector_steps: int = 1
    sde_eps: float = 1e-3
    method: str = "rk4"
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096


TRACED_FIELDS = ("eta", "langevin_step_lr", "rho", "churn", "s_tmin", "s_tmax", "s_noise", "snr",
                 "rtol", "atol")
jax.tree_util.register_dataclass(
    SamplerOptions, data_fields=list(TRACED_FIELDS),
    meta_fields=[f.name for f in dataclasses.fields(SamplerOptions)
                 if f.name not in TRACED_FIELDS])


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    """One registered sampler: its function and what it supports."""
    fn: Callable
    supports_t_start: bool
    supports_step_hook: bool


SAMPLERS: dict[str, SamplerEntry] = {}


def register(name, *, supports_t_start=True, supports_step_hook=True):
    """Decorator adding ``fn`` to :data:`SAMPLERS` under ``name`` (see the module docstring).

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorate(fn):
        if name in SAMPLERS:
            raise ValueError(f"A sampler named {name!r} is already registered.")
        SAMPLERS[name] = SamplerEntry(fn, supports_t_start, supports_step_hook)
        return fn

    return decorate


def check_sampler(name, *, t_start=False, step_hook=False):
    """Raise ``ValueError`` unless ``name`` is registered and supports what is asked.

    Call it where the request is parsed (a CLI, an application's entry) so a bad combination
    fails before any model is traced.

    Args:
        name: sampler name.
        t_start: whether the caller starts the chain part-way (SDEdit).
        step_hook: whether the caller needs a per-step hook (inpainting, ILVR).
    """
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {list(SAMPLERS)}.")
    entry = SAMPLERS[name]
    if t_start and not entry.supports_t_start:
        raise ValueError(f"sampler {name!r} cannot start part-way (t_start); use one of "
                         f"{[n for n, e in SAMPLERS.items() if e.supports_t_start]}.")
    if step_hook and not entry.supports_step_hook:
        raise ValueError(f"sampler {name!r} has no per-step hook (inpainting, ILVR); use one of "
                         f"{[n for n, e in SAMPLERS.items() if e.supports_step_hook]}.")


def run(name, denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """Run the registered sampler ``name``: ``x_start [B, ...] -> x_0 [B, ...]``.

    Args:
        name: a key of :data:`SAMPLERS`.
        denoise, schedule, x_start, key, options, t_start, step_hook: see the module docstring.

    Returns:
        ``x_0 [B, ...]``.

    Raises:
        ValueError: unknown sampler, an unsupported ``t_start`` / ``step_hook``, a bad
            ``x_start`` (integer dtype, rank < 1), or a denoiser whose output does not have
            the shape of its input (checked at trace time for every registered sampler).

    Example:
        >>> options = options_from_config(config, num_steps=25)
        >>> x0 = jax.jit(lambda k, o: run("ddim", denoise, sched, x_T, k, o))(key, options)
    """
    check_sampler(name, t_start=t_start is not None, step_hook=step_hook is not None)
    _check_x(x_start, "x_start")
    # One shape check for every entry: a wrong batch or rank must not broadcast silently.
    checked = lambda x, t: _call_denoiser(denoise, x, t)
    return SAMPLERS[name].fn(checked, schedule, x_start, key, options, t_start=t_start,
                             step_hook=step_hook)


def run_with_status(name, denoise, schedule, x_start, key, options, *, t_start=None,
                    step_hook=None):
    """:func:`run` that also returns where the chain first went non-finite.

    Every registered sampler runs its steps through :func:`diffusion_jax.sde.chain.scan`, which
    carries the index of the first step whose state holds a NaN or Inf; this collects those of
    the call. Traceable (call it inside your jitted function and return the status with the
    samples); the samples are bit-identical to :func:`run`'s.

    Args:
        name, denoise, schedule, x_start, key, options, t_start, step_hook: as for :func:`run`.

    Returns:
        ``(x_0 [B, ...], status)`` with ``status`` a :class:`~diffusion_jax.sde.chain.ChainStatus`
        (a pytree; ``first_bad = -1`` when the chain stayed finite) for :func:`check_finite`.

    Example:
        >>> x0, status = jax.jit(lambda k: run_with_status("ddim", denoise, sched, x_T, k,
        ...                                                 options))(key)
        >>> check_finite(np.asarray(x0), "ddim", status)
    """
    with chain.recording() as records:
        x0 = run(name, denoise, schedule, x_start, key, options, t_start=t_start,
                 step_hook=step_hook)
    return x0, chain.combine(records)


def options_from_config(config, **overrides):
    """The :class:`SamplerOptions` of ``config.sample`` and ``config.diffusion.pred_type``
    (``x0`` for a continuous-time ``diffusion.kind``).

    Overrides whose value is ``None`` are ignored (an unset flag keeps the config's value), so
    a CLI passes its flags straight through: ``options_from_config(config, num_steps=FLAGS.steps,
    eta=FLAGS.eta)``. ``config.sample.clip_x0`` may be a bool or a ``(lo, hi)`` pair.

    Args:
        config: a config with ``sample`` (``num_steps``, ``eta``, ``clip_x0``,
            ``ddpm_variance``, ``langevin_steps_each``, ``langevin_step_lr``, optionally
            ``spacing``) and ``diffusion.pred_type``.
        **overrides: any :class:`SamplerOptions` field.

    Returns:
        Validated :class:`SamplerOptions`.

    Raises:
        ValueError: for an unknown override or an invalid value (naming the field).
    """
    sample_cfg = config.sample
    values = dict(num_steps=sample_cfg.num_steps, eta=sample_cfg.eta,
                  spacing=sample_cfg.get("spacing", "uniform"),
                  pred_type=_sampling_pred_type(config.diffusion), clip_x0=sample_cfg.clip_x0,
                  variance=sample_cfg.ddpm_variance,
                  langevin_steps_each=sample_cfg.langevin_steps_each,
                  langevin_step_lr=sample_cfg.langevin_step_lr)
    # Solver settings added later: configs saved in older checkpoints lack them.
    for field in dataclasses.fields(SamplerOptions):
        if field.name not in values:
            values[field.name] = sample_cfg.get(field.name, field.default)
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"Unknown sampler option(s) {unknown}; expected some of {list(values)}.")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_options(**values)


def _sampling_pred_type(diffusion_cfg):
    """``diffusion.pred_type``, or ``x0`` for a continuous-time model: its sampler-facing
    denoiser is :func:`~diffusion_jax.sde.parameterization.discrete_view`, an x0-predictor."""
    if parameterization.kind_of(diffusion_cfg) != "discrete":
        return "x0"
    return diffusion_cfg.pred_type


def make_options(**fields):
    """:class:`SamplerOptions` from ``fields``, validated, with ``clip_x0`` normalised.

    Raises:
        ValueError: naming the first invalid field.
    """
    options = SamplerOptions(**fields)
    _check_positive_int("num_steps", options.num_steps)
    _check_eta(options.eta)
    _check_choice("spacing", options.spacing, DDIM_SPACINGS)
    _check_choice("pred_type", options.pred_type, PRED_TYPES)
    _check_choice("variance", options.variance, DDPM_VARIANCES)
    _check_positive_int("langevin_steps_each", options.langevin_steps_each)
    _check_positive("langevin_step_lr", options.langevin_step_lr)
    _check_solver_options(options)
    clip = _clip_bounds(options.clip_x0)
    timesteps = _check_timestep_pairs(options.timesteps)
    num_steps = int(options.num_steps) if timesteps is None else len(timesteps)
    threshold = options.dynamic_threshold
    return dataclasses.replace(options, num_steps=num_steps, clip_x0=clip, timesteps=timesteps,
                               clip_keeps_eps=bool(options.clip_keeps_eps),
                               dynamic_threshold=None if threshold is None else float(threshold))


def check_finite(samples, sampler, status=None):
    """Raise ``FloatingPointError`` if host array ``samples [B, ...]`` has a NaN or Inf.

    The message names the sampler, the affected samples and, given the chain's ``status``
    (from :func:`run_with_status`), the step at which the chain first went non-finite
    (1-based, ``step k of N``, with its time or noise level): a non-finite output is never
    written as an image.

    Args:
        samples: host array ``[B, ...]``.
        sampler: the sampler's name.
        status: optional :class:`~diffusion_jax.sde.chain.ChainStatus` of the chain.
    """
    samples = np.asarray(samples)
    bad = ~np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1)
    if bad.any():
        which = np.nonzero(bad)[0]
        raise FloatingPointError(
            f"sampler {sampler!r} produced non-finite values (NaN/Inf) in {which.size} of "
            f"{samples.shape[0]} samples (indices {which[:10].tolist()}){_where_bad(status)}; "
            "check the model's parameters, the condition (e.g. a label outside "
            "[0, num_classes)) and the settings.")


def _where_bad(status):
    """``, first at step k of N (t=...)`` for the error of non-finite samples (see
    :mod:`diffusion_jax.sde.chain`); ``""`` without a status."""
    if status is None:
        return ""
    first_bad, n = int(np.asarray(status.first_bad)), status.num_steps
    if first_bad >= 0 and n == 0:
        return (", first in the adaptive ODE solve, which failed (a NaN/Inf in the flow, or "
                "max_steps reached)")
    if first_bad >= 0:
        return f", first at step {first_bad + 1} of {n}" + _level_text(
            status.level_name, float(np.asarray(status.level)))
    if status.tail_checked:
        return ", after the chain (its steps stayed finite)"
    # Every checked step stayed finite: the last step (its result unchecked) or what followed.
    last = _level_text(status.level_name, float(np.asarray(status.last_level)))
    if n == 0:
        return f", first in the final denoising step after the adaptive ODE solve{last}"
    return f", first at step {n} of {n}{last} (the last step, or after the chain)"


def _level_text(name, level):
    return "" if not name or np.isnan(level) else f" ({name}={level:.4g})"


def ddpm_step(denoise, sched, x_t, t, key, *, pred_type="eps", variance="posterior", clip_x0=None):
    """One ancestral step ``x_t -> x_{t-1}`` of DDPM (Ho et al., 2020).

    The denoiser's prediction gives ``x0_pred`` (clipped to ``clip_x0`` if set); the step samples
    from the Gaussian with the mean of the forward posterior ``q(x_{t-1} | x_t, x0_pred)``:

        mu = coef1_t * x0_pred + coef2_t * x_t,
        x_{t-1} = mu + [t > 0] * sigma_t * z,   z ~ N(0, I),

    with ``sigma_t^2 = beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)`` for
    ``variance="posterior"`` or ``sigma_t^2 = beta_t`` for ``variance="beta"``. No noise is added
    at ``t = 0``, where ``mu = x0_pred``. Without clipping, ``mu`` equals the familiar
    ``(x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t)``.

    Args:
        denoise: ``denoise(x [B, ...], t [B] int32) -> prediction [B, ...]`` of ``pred_type``.
        sched: :class:`diffusion_jax.schedules.DiscreteSchedule`.
        x_t: ``[B, ...]`` current sample at step ``t``.
        t: scalar int (may be traced), ``0 <= t <= T-1``.
        key: PRNG key for ``z``.
        pred_type: what ``denoise`` predicts: ``eps``, ``x0``, ``v`` or ``score``.
        variance: ``posterior`` (``beta~_t``) or ``beta`` (``beta_t``).
        clip_x0: ``None`` or ``(lo, hi)``: clip ``x0_pred`` to ``[lo, hi]`` before the posterior
            mean. ``True`` means ``(-1, 1)``, the image range; ``False`` means ``None``.

    Returns:
        ``(x_prev [B, ...], x0_pred [B, ...])``.

    Raises:
        ValueError: for an unknown ``pred_type`` or ``variance`` or a malformed ``clip_x0``.
    """
    _check_choice("pred_type", pred_type, PRED_TYPES)
    _check_choice("variance", variance, DDPM_VARIANCES)
    clip_x0 = _clip_bounds(clip_x0)
    t_b = jnp.full((x_t.shape[0],), t, jnp.int32)                          # [B]
    x0_pred, _ = _predict_x0_eps(denoise, sched, x_t, t_b, pred_type, clip_x0)
    mean, _, _ = q_posterior(sched, x0_pred, x_t, t_b)
    var_table = sched.posterior_variance if variance == "posterior" else sched.betas
    std = jnp.sqrt(extract(var_table, t_b, x_t.ndim))                      # [B, 1, ..., 1]
    z = jax.random.normal(key, x_t.shape, x_t.dtype)
    x_prev = mean + jnp.where(t > 0, std, 0.0) * z
    return x_prev, x0_pred


def ddpm_sample(denoise, sched, x_T, key, *, pred_type="eps", variance="posterior", clip_x0=None,
                t_start=None, step_hook=None, return_trajectory=False):
    """DDPM ancestral sampling: :func:`ddpm_step` for ``t = t_start, ..., 0`` in one ``lax.scan``.

    Step ``i`` (``t = t_start - i``) draws ``z`` with ``fold_in(key, i)`` (split into the noise key
    and the hook's key). After each step, ``x_{t-1} = step_hook(x_{t-1}, x0_pred, t - 1, hook_key)``
    if a hook is given (``t - 1 = -1`` after the last step).

    Args:
        denoise: ``denoise(x [B, ...], t [B] int32) -> prediction [B, ...]``.
        sched: :class:`diffusion_jax.schedules.DiscreteSchedule` with ``T`` steps.
        x_T: ``[B, ...]`` starting sample at step ``t_start`` (``N(0, I)`` for ``t_start = T-1``).
        key: PRNG key.
        pred_type: ``eps``, ``x0``, ``v`` or ``score``.
        variance: ``posterior`` (``beta~_t``) or ``beta`` (``beta_t``).
        clip_x0: ``None``, ``(lo, hi)`` or ``True`` (``(-1, 1)``); see :func:`ddpm_step`.
        t_start: static int in ``[0, T-1]``; the chain starts at this step (SDEdit).
            Default ``T-1``.
        step_hook: optional ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev``
            (inpainting, ILVR).
        return_trajectory: also return every ``x_{t-1}`` (after the hook).

    Returns:
        ``x_0 [B, ...]``, or ``(x_0, trajectory [S, B, ...])`` with ``S = t_start + 1`` and
        ``trajectory[i]`` the sample after step ``i``.

    Raises:
        ValueError: for a bad ``pred_type``, ``variance``, ``clip_x0`` or ``t_start``.

    Example:
        >>> sched = make_schedule(linear_beta_schedule(1000))
        >>> sample = jax.jit(functools.partial(ddpm_sample, denoise, variance="beta"))
        >>> x0 = sample(sched, jax.random.normal(key, (16, 32, 32, 3)), key)   # [16, 32, 32, 3]
    """
    _check_x(x_T, "x_T")
    _check_choice("pred_type", pred_type, PRED_TYPES)
    _check_choice("variance", variance, DDPM_VARIANCES)
    clip_x0 = _clip_bounds(clip_x0)
    t_top = _check_t_start(t_start, sched.num_timesteps)
    ts = jnp.arange(t_top, -1, -1, dtype=jnp.int32)                        # [S] descending

    def step(x, t, t_prev, step_key):
        return ddpm_step(denoise, sched, x, t, step_key, pred_type=pred_type, variance=variance,
                         clip_x0=clip_x0)

    return _run_chain(step, x_T, key, ts, ts - 1, step_hook, return_trajectory)


def ddim_timesteps(num_timesteps, num_steps, spacing="uniform", t_start=None):
    """The descending timestep subsequence ``[t_0 > t_1 > ... > t_{S-1}]`` DDIM visits.

    With ``t_top = T - 1`` (or ``t_start``) and ``u_i = (S - 1 - i) / (S - 1)`` going from 1 to 0:

    * ``uniform``: ``t_i = round(u_i * t_top)``, evenly spaced from ``t_top`` to 0.
    * ``quadratic``: ``t_i = floor(u_i^2 * t_q)`` with ``t_q = 0.8 T`` as in the DDIM repository,
      ``(linspace(0, sqrt(0.8 T), S))^2``, or ``t_q = t_start`` when ``t_start`` is given (so the
      chain starts at the noise level of its input). Dense near ``t = 0``.

    Timesteps that rounding makes equal are pushed apart by one (``t_i >= t_{i+1} + 1``), so all
    ``S`` are distinct and still lie in ``[0, t_top]``. ``S = 1`` gives ``[t_top]``. The sampler
    takes its last step from ``t_{S-1}`` (0 when ``S >= 2``) to ``alpha_bar = 1``.

    Args:
        num_timesteps: ``T`` of the schedule.
        num_steps: ``S``, with ``1 <= S <= t_top + 1``.
        spacing: ``uniform`` or ``quadratic``.
        t_start: optional int in ``[0, T-1]``, the first (noisiest) timestep.

    Returns:
        ``[S]`` int32, strictly decreasing.

    Raises:
        ValueError: if ``num_steps`` or ``t_start`` is out of range or ``spacing`` unknown.

    Example:
        >>> ddim_timesteps(1000, 4)          # [999, 666, 333, 0]
    """
    _check_choice("spacing", spacing, DDIM_SPACINGS)
    t_top = _check_t_start(t_start, num_timesteps)
    if int(num_steps) != num_steps or not 1 <= num_steps <= t_top + 1:
        raise ValueError(
            f"num_steps must be an integer in [1, {t_top + 1}] (at most one step per timestep "
            f"from t={t_top} down to 0), got {num_steps!r}.")
    u = np.linspace(1.0, 0.0, num_steps) if num_steps > 1 else np.ones(1)
    if spacing == "uniform":
        ts = np.floor(u * t_top + 0.5)
    else:
        t_q = 0.8 * num_timesteps if t_start is None else t_start
        ts = np.floor(u**2 * t_q)
    # Reversed (ascending) r_j = j + running max of (ts_j - j) makes r_j >= r_{j-1} + 1.
    asc = ts[::-1].astype(np.int64)
    j = np.arange(num_steps)
    asc = j + np.maximum.accumulate(asc - j)
    return jnp.asarray(asc[::-1], jnp.int32)


def ddim_step(denoise, sched, x_t, t, t_prev, key, *, eta=0.0, pred_type="eps", clip_x0=None,
              clip_keeps_eps=False):
    """One DDIM step ``x_t -> x_{t_prev}`` (Song, Meng & Ermon, 2021, eq. 12).

    With ``a = alpha_bar_t``, ``a' = alpha_bar_{t_prev}`` (``a' = 1`` when ``t_prev < 0``) and the
    denoiser's ``(x0_pred, eps_pred)``:

        sigma = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a'),
        x_prev = sqrt(a') x0_pred + sqrt(1 - a' - sigma^2) eps_pred + sigma z,   z ~ N(0, I).

    ``eta = 0`` is the deterministic DDIM; ``eta = 1`` with consecutive steps is DDPM with the
    posterior variance. If ``clip_x0`` is set, ``x0_pred`` is clipped and ``eps_pred`` recomputed
    from it, ``eps_pred = (x_t - sqrt(a) x0_pred) / sqrt(1 - a)``, so the two stay consistent
    (with ``clip_keeps_eps`` the model's raw eps is kept instead, as diffusers' DDIM does).

    Args:
        denoise: ``denoise(x [B, ...], t [B] int32) -> prediction [B, ...]``.
        sched: :class:`diffusion_jax.schedules.DiscreteSchedule`.
        x_t: ``[B, ...]``.
        t: scalar int (may be traced), current step.
        t_prev: scalar int (may be traced), target step ``< t``; ``-1`` means ``alpha_bar = 1``.
            With ``eta = 0``, ``t_prev > t`` is allowed too: the same update then runs the
            deterministic map backwards in noise level (DDIM inversion).
        key: PRNG key for ``z`` (unused when ``eta = 0``, but must be given).
        eta: ``0 <= eta <= 1``, scales the noise.
        pred_type: ``eps``, ``x0``, ``v`` or ``score``.
        clip_x0: ``None``, ``(lo, hi)`` or ``True`` (``(-1, 1)``).
        clip_keeps_eps: keep the unclipped eps in the direction term (see above).

    Returns:
        ``(x_prev [B, ...], x0_pred [B, ...], eps_pred [B, ...])``.

    Raises:
        ValueError: for a bad ``eta``, ``pred_type`` or ``clip_x0``.
    """
    _check_choice("pred_type", pred_type, PRED_TYPES)
    _check_eta(eta)
    clip_x0 = _clip_bounds(clip_x0)
    t_b = jnp.full((x_t.shape[0],), t, jnp.int32)                          # [B]
    x0_pred, eps_pred = _predict_x0_eps(denoise, sched, x_t, t_b, pred_type, clip_x0,
                                        keep_eps=clip_keeps_eps)
    a = sched.alphas_cumprod[t]
    a_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    sigma = eta * jnp.sqrt(jnp.maximum((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev), 0.0))
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0))
    x_prev = jnp.sqrt(a_prev) * x0_pred + dir_coef * eps_pred
    if not (isinstance(eta, (int, float)) and eta == 0):
        x_prev = x_prev + sigma * jax.random.normal(key, x_t.shape, x_t.dtype)
    return x_prev, x0_pred, eps_pred


def ddim_sample(denoise, sched, x_T, key, *, num_steps=50, eta=0.0, spacing="uniform",
                pred_type="eps", clip_x0=None, t_start=None, step_hook=None,
                return_trajectory=False, timesteps=None, clip_keeps_eps=False):
    """DDIM sampling along :func:`ddim_timesteps` in one ``lax.scan``.

    Step ``i`` goes from ``t_i`` to ``t_{i+1}`` (to ``t_prev = -1``, i.e. ``alpha_bar = 1``, after
    the last) with :func:`ddim_step`, noise from ``fold_in(key, i)``, then applies ``step_hook``.

    Args:
        denoise: ``denoise(x [B, ...], t [B] int32) -> prediction [B, ...]``.
        sched: :class:`diffusion_jax.schedules.DiscreteSchedule` with ``T`` steps.
        x_T: ``[B, ...]`` starting sample at step ``t_0`` (``T - 1``, ``0.8 T`` for quadratic
            spacing, or ``t_start``).
        key: PRNG key.
        num_steps: static ``S`` in ``[1, T]``.
        eta: ``0`` (deterministic) to ``1``.
        spacing: ``uniform`` or ``quadratic``.
        pred_type: ``eps``, ``x0``, ``v`` or ``score``.
        clip_x0: ``None``, ``(lo, hi)`` or ``True`` (``(-1, 1)``).
        t_start: static int in ``[0, T-1]``, first timestep (SDEdit).
        step_hook: optional ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev``.
        return_trajectory: also return the sample after each step.
        timesteps: optional explicit ``(t, t_prev)`` pairs in sampling order (``t_prev = -1``:
            ``alpha_bar = 1``); replaces ``num_steps`` / ``spacing``. With ``t_start`` only
            the pairs with ``t <= t_start`` run.
        clip_keeps_eps: see :func:`ddim_step`.

    Returns:
        ``x_0 [B, ...]`` or ``(x_0, trajectory [S, B, ...])``.

    Raises:
        ValueError: for a bad ``num_steps``, ``spacing``, ``eta``, ``pred_type``, ``clip_x0``,
        ``t_start`` or ``timesteps``.

    Example:
        >>> sample = jax.jit(functools.partial(ddim_sample, denoise, num_steps=50, clip_x0=True))
        >>> x0, traj = ddim_sample(denoise, sched, x_T, key, num_steps=10, return_trajectory=True)
        >>> traj.shape                                                     # (10, *x_T.shape)
    """
    _check_x(x_T, "x_T")
    _check_choice("pred_type", pred_type, PRED_TYPES)
    _check_eta(eta)
    clip_x0 = _clip_bounds(clip_x0)
    if timesteps is None:
        ts = ddim_timesteps(sched.num_timesteps, num_steps, spacing, t_start)     # [S]
        t_prevs = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    else:
        ts, t_prevs = _explicit_timesteps(timesteps, sched.num_timesteps, t_start)

    def step(x, t, t_prev, step_key):
        x_prev, x0_pred, _ = ddim_step(denoise, sched, x, t, t_prev, step_key, eta=eta,
                                       pred_type=pred_type, clip_x0=clip_x0,
                                       clip_keeps_eps=clip_keeps_eps)
        return x_prev, x0_pred

    return _run_chain(step, x_T, key, ts, t_prevs, step_hook, return_trajectory)


def annealed_langevin_sample(score_fn, sigmas, x_init, key, *, n_steps_each=100, step_lr=2e-5,
                             denoise_final=True, return_trajectory=False):
    """Annealed Langevin dynamics of NCSN (Song & Ermon, 2019, Algorithm 1).

    For each noise level ``sigma_i`` (decreasing, ``i = 0, ..., L-1``) the step size is
    ``alpha_i = step_lr * sigma_i^2 / sigma_{L-1}^2`` and ``n_steps_each`` updates are made:

        x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z,   z ~ N(0, I).

    The ``L * n_steps_each`` updates are one flattened ``lax.scan``; update ``k`` (level
    ``k // n_steps_each``) draws ``z`` with ``fold_in(key, k)``. With ``denoise_final`` a last
    Tweedie step removes the smallest noise: ``x <- x + sigma_{L-1}^2 s(x, sigma_{L-1})``.

    Args:
        score_fn: ``score_fn(x [B, ...], sigma [B]) -> score [B, ...]``, an estimate of
            ``grad_x log p_sigma(x)`` for the data convolved with ``N(0, sigma^2 I)``.
        sigmas: ``[L]`` decreasing noise levels (e.g. :func:`diffusion_jax.sde.sdes.geometric_sigmas`).
        x_init: ``[B, ...]`` starting point (NCSN uses uniform noise; ``sigma_0 * N(0, I)`` works).
        key: PRNG key.
        n_steps_each: static number of updates per level, ``>= 1``.
        step_lr: ``epsilon > 0``, the step size at the last level.
        denoise_final: apply the final Tweedie denoising step.
        return_trajectory: also return every iterate.

    Returns:
        ``x [B, ...]``, or ``(x, trajectory [L * n_steps_each (+1 with denoise_final), B, ...])``
        whose last entry is ``x``.

    Raises:
        ValueError: if ``sigmas`` is not ``[L]``, ``n_steps_each < 1`` or ``step_lr <= 0``.

    Example:
        >>> sigmas = geometric_sigmas(50.0, 0.01, 232)
        >>> x = annealed_langevin_sample(score_fn, sigmas, sigmas[0] * noise, key, n_steps_each=5)
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must have shape [L] with L >= 1, got shape {sigmas.shape}.")
    _check_x(x_init, "x_init")
    _check_positive_int("n_steps_each", n_steps_each)
    _check_positive("step_lr", step_lr)
    batch = x_init.shape[0]
    levels = jnp.repeat(jnp.arange(sigmas.shape[0]), n_steps_each)          # [L * n]
    step_sizes = step_lr * (sigmas / sigmas[-1]) ** 2                        # [L]

    def body(x, inputs):
        k, level = inputs
        sigma_b = jnp.full((batch,), sigmas[level], jnp.float32)
        score = _call_denoiser(score_fn, x, sigma_b)
        x = _langevin_update(x, score, step_sizes[level], jax.random.fold_in(key, k))
        return x, (x if return_trajectory else None)

    x, traj = chain.scan(body, x_init, (jnp.arange(levels.shape[0]), levels),
                         levels=sigmas[levels], level_name="sigma")
    if denoise_final:
        x = x + sigmas[-1] ** 2 * score_fn(x, jnp.full((batch,), sigmas[-1], jnp.float32))
        chain.record_step(level=sigmas[-1], level_name="sigma")
        if return_trajectory:
            traj = jnp.concatenate([traj, x[None]], axis=0)
    return (x, traj) if return_trajectory else x


def langevin_sample(score_fn, x_init, key, *, step_size, num_steps):
    """Unadjusted Langevin dynamics for a fixed target ``p``.

        x <- x + (delta / 2) grad log p(x) + sqrt(delta) z,   z ~ N(0, I),

    repeated ``num_steps`` times in one ``lax.scan``, step ``k`` drawing ``z`` with
    ``fold_in(key, k)``. Its stationary law approaches ``p`` as ``delta -> 0`` (for a Gaussian
    with variance ``s^2`` it is Gaussian with variance ``s^2 / (1 - delta / (4 s^2))``).

    Args:
        score_fn: ``score_fn(x [B, ...]) -> grad_x log p(x) [B, ...]``.
        x_init: ``[B, ...]``.
        key: PRNG key.
        step_size: ``delta > 0``.
        num_steps: static number of updates, ``>= 1``.

    Returns:
        ``x [B, ...]`` after ``num_steps`` updates.

    Raises:
        ValueError: if ``step_size <= 0`` or ``num_steps < 1``.
    """
    _check_positive("step_size", step_size)
    _check_positive_int("num_steps", num_steps)

    def body(x, k):
        return _langevin_update(x, score_fn(x), step_size, jax.random.fold_in(key, k)), None

    x, _ = lax.scan(body, x_init, jnp.arange(num_steps))
    return x


@register("ddpm")
def _ddpm_entry(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """:func:`ddpm_sample` over every step (``options.num_steps`` does not apply)."""
    denoise, pred_type = _with_dynamic_threshold(denoise, schedule, options)
    return ddpm_sample(denoise, schedule, x_start, key, pred_type=pred_type,
                       variance=options.variance, clip_x0=options.clip_x0, t_start=t_start,
                       step_hook=step_hook)


@register("ddim")
def _ddim_entry(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """:func:`ddim_sample`; from ``t_start`` it takes ``min(num_steps, t_start + 1)`` steps, the
    most a chain from there can have (with ``options.timesteps``: the pairs with
    ``t <= t_start``)."""
    num_steps = options.num_steps if t_start is None else min(options.num_steps, t_start + 1)
    denoise, pred_type = _with_dynamic_threshold(denoise, schedule, options)
    return ddim_sample(denoise, schedule, x_start, key, num_steps=num_steps, eta=options.eta,
                       spacing=options.spacing, pred_type=pred_type,
                       clip_x0=options.clip_x0, t_start=t_start, step_hook=step_hook,
                       timesteps=options.timesteps, clip_keeps_eps=options.clip_keeps_eps)


# The continuous-time solvers of diffusion_jax.sde (discrete models enter through its adapters).
register("edm_heun")(sde_registry.edm_heun)
register("dpm_solver_pp")(sde_registry.dpm_solver_pp)
# A part-way start needs the schedule concrete (closed over, not a jit argument).
register("pc")(sde_registry.predictor_corrector)
# step_hook only with the fixed-step methods (euler / heun / rk4); adaptive ones raise.
register("probability_flow")(sde_registry.probability_flow)


def num_evaluations(name, options, num_timesteps=1000):
    """Network evaluations of one run of sampler ``name`` from ``N(0, I)``.

    ddpm: ``T``; ddim, dpm_solver_pp: ``num_steps``; langevin: ``num_steps *
    langevin_steps_each + 1``; edm_heun: ``2 num_steps - 1`` (the last step is Euler); pc:
    ``num_steps (1 + n_corrector_steps)`` (``num_steps`` without corrector); probability_flow:
    ``num_steps`` times 1 / 2 / 4 (euler / heun / rk4) + 1 (the final Tweedie step), ``None``
    for the adaptive methods (their count depends on the tolerance and the data).

    Raises:
        ValueError: for an unknown sampler.
    """
    check_sampler(name)
    n = options.num_steps
    if name == "ddpm":
        return int(num_timesteps)
    if name == "langevin":
        return n * options.langevin_steps_each + 1
    if name == "edm_heun":
        return 2 * n - 1
    if name == "pc":
        return n * (1 + (options.n_corrector_steps if options.corrector != "none" else 0))
    if name == "probability_flow":
        per_step = {"euler": 1, "heun": 2, "rk4": 4}.get(options.method)
        return None if per_step is None else n * per_step + 1
    return n


@register("langevin", supports_t_start=False, supports_step_hook=False)
def _langevin_entry(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """:func:`annealed_langevin_sample` on the variance-exploding view of a VP denoiser.

    The ``L = num_steps`` levels are the DDIM timesteps ``t_l`` with
    ``sigma_l = sqrt((1 - ab_{t_l}) / ab_{t_l})``; the chain starts at ``sigma_0 x_start`` and
    its result (a clean-image estimate) is clipped when ``clip_x0`` is set.
    """
    del t_start, step_hook  # unsupported: run() rejects them
    ts = ddim_timesteps(schedule.num_timesteps, options.num_steps)            # [L] descending
    alpha_bar = schedule.alphas_cumprod[ts]
    sigmas = jnp.sqrt((1.0 - alpha_bar) / alpha_bar)                          # [L] decreasing
    score_fn = _ve_score_fn(denoise, schedule, ts, sigmas, options.pred_type)
    y = annealed_langevin_sample(score_fn, sigmas, sigmas[0] * x_start, key,
                                 n_steps_each=options.langevin_steps_each,
                                 step_lr=options.langevin_step_lr)
    return y if options.clip_x0 is None else jnp.clip(y, *options.clip_x0)


def _ve_score_fn(denoise, schedule, ts, sigmas, pred_type):
    """A VP (DDPM) denoiser as the score of the variance-exploding variable y = x_t / sqrt(ab_t).

    ``y = x_0 + sigma eps`` with ``sigma_t = sqrt((1 - ab_t) / ab_t)``, so
    ``score(y, sigma_t) = -eps(sqrt(ab_t) y, t) / sigma_t``. ``sigma [B]`` must be one of
    ``sigmas [L]`` (the levels at timesteps ``ts [L]``).
    """

    def score_fn(y, sigma):
        level = jnp.argmin(jnp.abs(sigmas[None, :] - sigma[:, None]), axis=1)  # [B]
        t = ts[level]
        alpha_bar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (y.ndim - 1))
        x_t = jnp.sqrt(alpha_bar) * y
        _, eps = to_x0_and_eps(_call_denoiser(denoise, x_t, t), x_t, alpha_bar, pred_type)
        return -eps / sigma.reshape(alpha_bar.shape)

    return score_fn


def _with_dynamic_threshold(denoise, schedule, options):
    """``(denoise, pred_type)``, or with ``options.dynamic_threshold`` an x0-denoiser whose
    predictions are dynamically thresholded (the eps used by the step then follows them)."""
    if options.dynamic_threshold is None:
        return denoise, options.pred_type

    def x0_denoise(x, t):
        alpha_bar = extract(schedule.alphas_cumprod, t, x.ndim)
        x0, _ = to_x0_and_eps(_call_denoiser(denoise, x, t), x, alpha_bar, options.pred_type)
        return threshold_x0(x0, options.dynamic_threshold)

    return x0_denoise, "x0"


def _run_chain(step, x, key, ts, t_prevs, step_hook, return_trajectory):
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


def _predict_x0_eps(denoise, sched, x_t, t_b, pred_type, clip_x0, keep_eps=False):
    """``(x0, eps)`` from the denoiser at ``t_b`` [B]; with ``clip_x0``, eps follows clipped x0
    unless ``keep_eps``."""
    alpha_bar = extract(sched.alphas_cumprod, t_b, x_t.ndim)               # [B, 1, ..., 1]
    x0, eps = to_x0_and_eps(_call_denoiser(denoise, x_t, t_b), x_t, alpha_bar, pred_type)
    if clip_x0 is not None:
        clipped, eps_clipped = to_x0_and_eps(jnp.clip(x0, *clip_x0), x_t, alpha_bar, "x0")
        x0, eps = clipped, (eps if keep_eps else eps_clipped)
    return x0, eps


def _explicit_timesteps(pairs, num_timesteps, t_start):
    """``(ts [S], t_prevs [S])`` int32 of checked ``(t, t_prev)`` pairs, those with
    ``t <= t_start`` when ``t_start`` is given."""
    pairs = np.asarray(_check_timestep_pairs(pairs), np.int64)
    if pairs.max() > num_timesteps - 1:
        raise ValueError(f"timesteps reach {pairs.max()}, past the schedule's last step "
                         f"{num_timesteps - 1}.")
    if t_start is not None:
        pairs = pairs[pairs[:, 0] <= _check_t_start(t_start, num_timesteps)]
        if not len(pairs):
            raise ValueError(f"no timestep pair starts at or below t_start={t_start}.")
    return jnp.asarray(pairs[:, 0], jnp.int32), jnp.asarray(pairs[:, 1], jnp.int32)


def _check_timestep_pairs(pairs):
    """``None`` or ``pairs`` as a tuple of int pairs ``(t, t_prev)`` with ``0 <= t``,
    ``-1 <= t_prev <= t`` (``t_prev = t`` is an identity step); else ``ValueError``."""
    if pairs is None:
        return None
    pairs = tuple((int(t), int(t_prev)) for t, t_prev in pairs)
    if not pairs or any(not (t >= 0 and -1 <= t_prev <= t) for t, t_prev in pairs):
        raise ValueError(f"timesteps must be a non-empty list of (t, t_prev) pairs with "
                         f"t >= 0 and -1 <= t_prev <= t, got {pairs!r}.")
    return pairs


def _call_denoiser(denoise, x, t):
    """``denoise(x, t)``, checked at trace time (static, so free under jit) to return ``x``'s
    shape: a wrong batch or rank would otherwise broadcast silently."""
    pred = denoise(x, t)
    if getattr(pred, "shape", None) != x.shape:
        raise ValueError(f"The denoiser returned shape {getattr(pred, 'shape', type(pred))} for x "
                         f"of shape {x.shape}; it must return a prediction of x's shape.")
    return pred


def _check_x(x, field):
    """Raise ``ValueError`` unless ``x`` is a floating array ``[B, ...]`` (rank >= 1)."""
    dtype, ndim = getattr(x, "dtype", None), getattr(x, "ndim", 0)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or ndim < 1:
        raise ValueError(f"{field} must be a floating-point array [B, ...], got "
                         f"{dtype} with shape {getattr(x, 'shape', ())}.")


def _langevin_update(x, score, step_size, key):
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x + 0.5 * step_size * score + jnp.sqrt(step_size) * noise


def _check_choice(field, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {field} {value!r}; expected one of {list(choices)}.")


def _check_t_start(t_start, num_timesteps):
    """Returns the first timestep, ``T - 1`` or a validated ``t_start``."""
    if t_start is None:
        return num_timesteps - 1
    if int(t_start) != t_start or not 0 <= t_start <= num_timesteps - 1:
        raise ValueError(
            f"t_start must be a static integer in [0, {num_timesteps - 1}], got {t_start!r}.")
    return int(t_start)


def _check_solver_options(options):
    """Validate the SDE / EDM / DPM-Solver++ settings of ``options`` (naming the field)."""
    threshold = options.dynamic_threshold
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and 0.0 < threshold <= 1.0):
        raise ValueError(f"dynamic_threshold must be None or a percentile in (0, 1], got "
                         f"{threshold!r}.")
    if options.sigma_spacing is not None:
        _check_choice("sigma_spacing", options.sigma_spacing, sde_registry.SIGMA_SPACINGS)
    if options.sigma_max is not None and not (isinstance(options.sigma_max, (int, float))
                                              and options.sigma_max > 0):
        raise ValueError(f"sigma_max must be None or > 0, got {options.sigma_max!r}.")
    _check_choice("order", options.order, (1, 2, 3))
    _check_choice("sde", options.sde, sorted(SDE_NAMES))
    _check_choice("predictor", options.predictor, PREDICTORS)
    _check_choice("corrector", options.corrector, CORRECTORS)
    _check_choice("method", options.method, ODE_METHODS)
    for field in ("rho", "snr", "rtol", "atol", "s_noise"):
        _check_positive(field, getattr(options, field))
    for field in ("churn", "s_tmin"):
        value = getattr(options, field)
        if isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"{field} must be >= 0, got {value}.")
    if isinstance(options.sde_eps, (int, float)) and not 0.0 <= options.sde_eps < 1.0:
        raise ValueError(f"sde_eps must lie in [0, 1), got {options.sde_eps}.")
    _check_positive_int("n_corrector_steps", options.n_corrector_steps)
    _check_positive_int("max_steps", options.max_steps)


def _check_eta(eta):
    if isinstance(eta, (int, float)) and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}.")


def _check_positive(field, value):
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{field} must be > 0, got {value}.")


def _check_positive_int(field, value):
    if int(value) != value or value < 1:
        raise ValueError(f"{field} must be an integer >= 1, got {value!r}.")
