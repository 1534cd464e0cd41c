"""Samplers: one module per sampler family, a registry that dispatches, and the chain's loop.

Every sampler takes a denoiser callable, never a model. Discrete-time samplers take

    denoise(x, t) -> prediction,    x: [B, ...] float,  t: [B] int32,

where the prediction is of ``pred_type`` (``eps``, ``x0``, ``v`` or ``score``; see
:func:`diffusion_jax.diffusion.to_x0_and_eps`). Conditioning, guidance and the model's
parameters are closed over by the caller. Langevin samplers take a score function instead.

Each sampler is one ``lax.scan`` over its steps (:func:`.chain.scan`), so the denoiser is traced
once and the whole chain compiles to one XLA program. Per-step randomness is
``jax.random.fold_in(key, i)`` with ``i`` the step index (0 for the first, noisiest step).

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

Layout
------
* :mod:`.registry`: :data:`SAMPLERS`, :func:`register`, :func:`run` (the only dispatcher: the
  CLI, every application, the pipelines, the training-time sample grid, the scripts and the
  benchmarks go through it), :func:`run_with_status`, :func:`check_sampler`,
  :func:`check_options`, :func:`num_evaluations`, and :class:`SamplerOptions` composed from the
  entries' options (:func:`make_options`, :func:`options_from_config`, :func:`parse_options`
  for ``NAME=VALUE`` text from the command line or the web app).
* :mod:`.options`: :func:`~.options.option` (how a setting is declared) and the settings
  several entries share; :mod:`.chain`: the loop that also finds the first non-finite step
  (:func:`check_finite`).
* One module per family, each holding its algorithm, its options dataclass (defaults, checks),
  its count of network evaluations and its registry entry: :mod:`.ddpm` (``ddpm``), :mod:`.ddim`
  (``ddim``), :mod:`.edm` (``edm_heun``), :mod:`.dpm_solver` (``dpm_solver_pp``), :mod:`.pc`
  (``pc``; predictors and correctors in tables), :mod:`.probability_flow`
  (``probability_flow``), :mod:`.langevin` (``langevin``); :mod:`.continuous` holds what the
  continuous-time ones share (noise grids, SDE settings, discrete-model adapters).
* diffusers' schedulers, on their exact grids (:mod:`._sigma_steps`): :mod:`.euler`
  (``euler``), :mod:`.euler_ancestral` (``euler_ancestral``), :mod:`.dpmpp_2m` (``dpmpp_2m``,
  ``dpmpp_2m_sde``), :mod:`.unipc` (``unipc``); a Stable Diffusion checkpoint's ``scheduler_config.json`` selects one
  (:func:`diffusion_jax.convert.scheduler.checkpoint_sampler`).
* The flow samplers :mod:`.flow_euler` (``flow_euler``), :mod:`.flow_heun` (``flow_heun``)
  and :mod:`.flow_dpm_solver` (``flow_dpm_solver``, DPM-Solver++(2M) in flow time) integrate a
  flow-matching model's velocity ``v(x, t float [B])`` on diffusers' flow grid
  (:mod:`._flow`); they are registered with ``flow=True`` and :func:`run` hands them the
  denoiser's ``velocity`` (a non-flow model is refused by name). Every other entry runs a
  flow model too, through its discrete-step x0 view
  (:func:`~diffusion_jax.sde.parameterization.discrete_view`).

A registered function has the uniform signature

    fn(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None) -> x_0

* ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]`` of ``options.pred_type``;
  a model, its condition and guidance are closed over (:mod:`diffusion_jax.denoisers`).
  :func:`run` sets ``options.pred_type`` from a denoiser that declares one
  (``denoise.pred_type``, a :class:`~diffusion_jax.denoisers.Denoiser`; :func:`for_denoiser`).
* ``schedule``: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
* ``x_start``: float ``[B, ...]``, the chain's start (``N(0, I)``, or a noised image at
  ``t_start``).
* ``key``: PRNG key; per-step keys are ``fold_in(key, i)``.
* ``options``: :class:`SamplerOptions` (a pytree: its float settings, :data:`TRACED_FIELDS`,
  are leaves, so they may be traced and changing them does not recompile; the rest is static).
* ``t_start``: static int, start the chain at that step (SDEdit); only for entries registered
  with ``supports_t_start=True``. ``step_hook(x_prev, x0_pred, t_prev, key) -> x_prev`` runs
  after every step (inpainting, ILVR); only with ``supports_step_hook=True``.

Adding a sampler
----------------
One new file in this package (it is imported, registered and its settings composed into
:class:`SamplerOptions` when the package loads), plus its test. For example
``diffusion_jax/samplers/sigma_euler.py``, Euler steps of the probability-flow ODE in sigma (the
file ``tests/test_sampler_registry.py`` adds to a copy of the package)::

    import dataclasses

    import jax.numpy as jnp

    from diffusion_jax.samplers import chain
    from diffusion_jax.samplers._checks import check_non_negative
    from diffusion_jax.samplers.continuous import SigmaGridOptions, denoiser_setup
    from diffusion_jax.samplers.options import option, read
    from diffusion_jax.samplers.registry import register


    @dataclasses.dataclass(frozen=True)
    class EulerOptions(SigmaGridOptions):          # num_steps, sigma_spacing, rho, sigma_max
        euler_scale: float = option(1.0, "slope scale.", check=check_non_negative, traced=True)


    @register("sigma_euler", options=EulerOptions, supports_step_hook=False)  # NFE: num_steps
    def sigma_euler(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
        settings = read(EulerOptions, options)
        denoiser, sigmas, x = denoiser_setup(denoise, schedule, x_start, options, settings,
                                             t_start, "karras")
        nexts = jnp.concatenate([sigmas[1:], jnp.zeros(1)])

        def body(x, s):
            sigma, sigma_next = s
            d = (x - denoiser(x, jnp.full(x.shape[:1], sigma))) / sigma
            return x + settings.euler_scale * (sigma_next - sigma) * d, None

        x, _ = chain.scan(body, x, (sigmas, nexts), levels=sigmas, level_name="sigma")
        return x

``make_options(euler_scale=0.5)``, ``--sampler=sigma_euler --sampler_option=euler_scale=0.5``,
:func:`num_evaluations` and ``config.sample.euler_scale`` (read when a config has it; a line in
``configs/default.py`` makes it a ``--config.sample`` flag) then work, and
``--sampler=ddim --sampler_option=euler_scale=0.5`` is refused (:func:`check_options`). A
setting another entry already declares is reused by inheriting its group (as
``SigmaGridOptions`` above), never declared twice.

Options are built once from ``config.sample`` (+ ``config.diffusion.pred_type``) and flags by
:func:`options_from_config`; a flag left unset (``None``) keeps the config's value, and
``config.sample`` only overrides the defaults the entries declare.
"""
import importlib
import pkgutil

from diffusion_jax.samplers import chain, registry
from diffusion_jax.samplers.chain import ChainStatus, check_finite

# Today's registration order (the CLI's choices and error messages list samplers in it); any
# other family module of the package is imported after these, by name.
_FAMILIES = ("ddpm", "ddim", "edm", "dpm_solver", "pc", "probability_flow", "langevin")
_CORE = ("chain", "continuous", "options", "registry")
for _name in _FAMILIES + tuple(sorted(
        m.name for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in _FAMILIES + _CORE)):
    importlib.import_module(f"{__name__}.{_name}")
registry.compose()

# pylint: disable=wrong-import-position
from diffusion_jax.samplers.ddim import DDIM_SPACINGS, ddim_sample, ddim_step, ddim_timesteps
from diffusion_jax.samplers.ddpm import DDPM_VARIANCES, ddpm_sample, ddpm_step
from diffusion_jax.samplers.langevin import annealed_langevin_sample, langevin_sample
from diffusion_jax.samplers.registry import (SAMPLERS, TRACED_FIELDS, SamplerEntry,
                                             SamplerOptions, check_options, check_sampler,
                                             config_defaults, for_denoiser, make_options,
                                             num_evaluations, options_from_config,
                                             parse_options, register, run,
                                             run_with_status)
