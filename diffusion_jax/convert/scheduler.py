"""``scheduler/scheduler_config.json`` -> this project's diffusion settings, as diffusers reads it.

The noise process a checkpoint was trained with is fixed by the betas; the scheduler class the
config names (PNDM, DDIM, Euler, ...) only picks a sampler, which is ours to choose. So this
module keeps what defines the process and the DDIM-style inference grid:

* betas (diffusers' formulas, float32)::

      linear:            linspace(beta_start, beta_end, T)
      scaled_linear:     linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2
      squaredcos_cap_v2: beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999),
                         abar(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2
      sigmoid:           sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
      trained_betas:     as given

  then, with ``rescale_betas_zero_snr``, Lin et al. (2023) Algorithm 1 (``sqrt(abar)`` shifted
  to 0 at the last step and rescaled to keep the first);
* the prediction type (epsilon / v_prediction / sample -> eps / v / x0), ``clip_sample`` and
  its range, the DDPM variance, and ``set_alpha_to_one`` (the alpha-bar DDIM steps to after
  the last timestep);
* ``timestep_spacing`` (leading / trailing / linspace) with ``steps_offset``:
  `inference_timesteps` is the exact list ``DDIMScheduler.set_timesteps`` makes and
  `ddim_alphas` the ``(alpha_bar_t, alpha_bar_prev)`` pairs its ``step`` uses.

The class the config names, with its sampling fields, picks the checkpoint's default sampler
(`checkpoint_sampler`): Euler, Euler-ancestral, DPM-Solver++ multistep and UniPC map onto the
registry entries that reproduce them (``euler``, ``euler_ancestral``, ``dpmpp_2m`` /
``dpmpp_2m_sde``, ``unipc``);
DDIM, PNDM and DDPM configs run ``ddim`` on diffusers' DDIM timesteps; any other class, or a
field value with no equivalent here, is an error naming it.

Note: this project's own ``schedules.sigmoid`` is a different ramp; a diffusers ``sigmoid``
config gets diffusers' betas here.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

PRED_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DDPM_VARIANCE = {"fixed_small": "posterior", "fixed_small_log": "posterior",
                 "fixed_large": "beta", "fixed_large_log": "beta"}
SPACINGS = ("leading", "trailing", "linspace")
# diffusers schedule name -> this project's name for the same betas (None: only explicit betas).
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine", "sigmoid": None}

_READ = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
         "prediction_type", "clip_sample", "clip_sample_range", "set_alpha_to_one",
         "steps_offset", "timestep_spacing", "rescale_betas_zero_snr", "variance_type"}
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
# Options of other scheduler classes that only shape *their* sampling loop (our samplers take
# their own options), or thresholding settings that are inert while thresholding is off.
_SAMPLER_ONLY = {"skip_prk_steps", "interpolation_type", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max",
                 "timestep_type", "final_sigmas_type", "solver_order", "algorithm_type",
                 "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped",
                 "use_lu_lambdas", "variance_type_dpm", "dynamic_thresholding_ratio",
                 "sample_max_value", "sde_type", "predict_x0", "solver_p", "flow_shift",
                 "noise_sampler_seed", "s_noise", "rho", "disable_corrector", "time_shift_type"}
# Options that change the noise levels themselves (flow matching, resolution-dependent
# shifts): only their inert values are accepted.
_FIXED = {"thresholding": (False, None), "use_dynamic_shifting": (False, None),
          "shift_terminal": (None,), "use_flow_sigmas": (False, None)}


# diffusers scheduler classes whose config describes a DDPM-style beta schedule: any of them
# defines the same diffusion (their own sampling loop is replaced by this project's samplers).
SCHEDULER_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                     "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
                     "DEISMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
                     "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler")


# Classes whose sampler is ddim on diffusers' DDIM timesteps (DDIM exactly; PNDM and DDPM keep
# this project's long-standing choice: their own loops, PLMS and ancestral DDPM over a few
# steps, are not implemented here).
DDIM_CLASSES = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler")
# Mapped class -> (sampler, {sampling field: diffusers' default}) of the fields carried over.
_GRID = {"timestep_spacing": "linspace", "steps_offset": 0}
_SIGMAS = {"use_karras_sigmas": False, "final_sigmas_type": "zero"}
MAPPED_CLASSES = {
    "EulerDiscreteScheduler": ("euler", {**_GRID, **_SIGMAS}),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", _GRID),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", {**_GRID, **_SIGMAS, "solver_order": 2,
                                                 "lower_order_final": True}),
    "UniPCMultistepScheduler": ("unipc", {**_GRID, **_SIGMAS, "solver_order": 2,
                                          "lower_order_final": True}),
}
# Fields of a mapped class that are only supported at these values (the first is diffusers'
# default); a field the class does not have is ignored, as diffusers ignores it.
_PINNED = {
    "EulerDiscreteScheduler": {
        "interpolation_type": ("linear",), "timestep_type": ("discrete",),
        "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
        "sigma_min": (None,), "sigma_max": (None,), "rescale_betas_zero_snr": (False,)},
    "EulerAncestralDiscreteScheduler": {"rescale_betas_zero_snr": (False,)},
    "DPMSolverMultistepScheduler": {
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_order": (2, 1),
        "solver_type": ("midpoint",), "euler_at_final": (False,),
        "lambda_min_clipped": (-math.inf,), "variance_type": (None,),
        "use_lu_lambdas": (False,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "rescale_betas_zero_snr": (False,)},
    "UniPCMultistepScheduler": {
        "solver_type": ("bh2",), "predict_x0": (True,), "solver_order": (2, 1),
        "disable_corrector": ([],), "solver_p": (None,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "sigma_min": (None,), "sigma_max": (None,),
        "rescale_betas_zero_snr": (False,)},
}


class SchedulerSettings(NamedTuple):
    """The diffusion a converted checkpoint was trained with.

    Attributes:
        betas: ``[T]`` float32.
        alphas_cumprod: ``[T]`` float32, ``prod_{s<=t} (1 - beta_s)``.
        final_alpha_cumprod: alpha-bar after the last DDIM step (1 with ``set_alpha_to_one``,
            else ``alphas_cumprod[0]``).
        num_train_timesteps: T.
        pred_type: "eps" | "v" | "x0".
        schedule: this project's schedule name for the same betas, or None when only ``betas``
            describes them (sigmoid, trained or rescaled betas).
        beta_start, beta_end: the configured beta range.
        clip_sample: clip the predicted x0 to ``[-clip_sample_range, clip_sample_range]``.
        clip_sample_range: see ``clip_sample``.
        ddpm_variance: "posterior" (fixed_small) or "beta" (fixed_large).
        timestep_spacing: "leading" | "trailing" | "linspace".
        steps_offset: added to leading timesteps.
    """
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    num_train_timesteps: int
    pred_type: str
    schedule: str | None
    beta_start: float
    beta_end: float
    clip_sample: bool
    clip_sample_range: float
    ddpm_variance: str
    timestep_spacing: str
    steps_offset: int


def scheduler_settings(config: dict[str, Any]) -> SchedulerSettings:
    """Reads a diffusers scheduler config (the parsed ``scheduler_config.json``).

    Missing fields take diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` defaults (T = 1000,
    linear 1e-4..0.02, epsilon, clip_sample True, set_alpha_to_one True, leading, offset 0).

    Raises:
        ValueError: an unknown scheduler class or field, an unsupported value (thresholding,
            learned variances, flow-matching shifts, an unknown schedule / prediction type /
            spacing), naming it.
    """
    cls = config.get("_class_name", "DDIMScheduler")
    if cls not in SCHEDULER_CLASSES:
        hint = (" (a flow-matching scheduler: rectified-flow models are not supported yet)"
                if "FlowMatch" in str(cls) else "")
        raise ValueError(f"scheduler: _class_name={cls!r} is not a supported diffusers scheduler"
                         f"{hint}; supported: {list(SCHEDULER_CLASSES)}")
    unknown = sorted(set(config) - _READ - _BOOKKEEPING - _SAMPLER_ONLY - set(_FIXED))
    if unknown:
        raise ValueError(f"scheduler: unsupported config field(s) {unknown}")
    for field, allowed in _FIXED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise ValueError(f"scheduler: {field}={config[field]!r} is not supported; "
                             f"supported: {list(allowed)}")
    get = config.get
    num, start, end = (_number(config, field, cast, default) for field, cast, default in
                       (("num_train_timesteps", int, 1000), ("beta_start", float, 1e-4),
                        ("beta_end", float, 0.02)))
    name, trained = get("beta_schedule", "linear"), get("trained_betas")
    betas = _betas(name, trained, num, start, end)
    rescale = bool(get("rescale_betas_zero_snr", False))
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
    return SchedulerSettings(
        betas=betas, alphas_cumprod=alphas_cumprod,
        final_alpha_cumprod=1.0 if get("set_alpha_to_one", True) else float(alphas_cumprod[0]),
        num_train_timesteps=num,
        pred_type=_choice("prediction_type", get("prediction_type", "epsilon"), PRED_TYPES),
        schedule=None if trained is not None or rescale else SCHEDULE_NAMES[name],
        beta_start=start, beta_end=end, clip_sample=bool(get("clip_sample", True)),
        clip_sample_range=float(get("clip_sample_range", 1.0)),
        ddpm_variance=_choice("variance_type", get("variance_type") or "fixed_small",
                              DDPM_VARIANCE),
        timestep_spacing=_choice("timestep_spacing", get("timestep_spacing", "leading"),
                                 {s: s for s in SPACINGS}),
        steps_offset=int(get("steps_offset", 0)))


def diffusers_betas(name: str, num: int, beta_start: float, beta_end: float) -> np.ndarray:
    """``[num]`` float32 betas of a diffusers ``beta_schedule`` (formulas in the module docstring).

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "linear":
        return np.linspace(beta_start, beta_end, num, dtype=np.float32)
    if name == "scaled_linear":
        return np.square(np.linspace(beta_start**0.5, beta_end**0.5, num, dtype=np.float32))
    if name == "squaredcos_cap_v2":
        abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - abar((i + 1) / num) / abar(i / num), 0.999)
                           for i in range(num)], np.float32)
    if name == "sigmoid":
        ramp = np.linspace(-6.0, 6.0, num, dtype=np.float32).astype(np.float64)
        betas = 1.0 / (1.0 + np.exp(-ramp)) * (beta_end - beta_start) + beta_start
        return betas.astype(np.float32)
    raise ValueError(f"unknown diffusers beta_schedule {name!r}; expected one of "
                     f"{sorted(SCHEDULE_NAMES)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last alpha-bar is 0, keeping the first (Lin et al. 2023, Algorithm 1).

    ``r = sqrt(abar)``; ``r' = (r - r_T) * r_0 / (r_0 - r_T)``; ``abar' = r'^2``;
    ``beta'_0 = 1 - abar'_0``, ``beta'_t = 1 - abar'_t / abar'_{t-1}``. ``[T] -> [T]`` float32.
    """
    betas = np.asarray(betas, np.float32)
    root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    abar = np.square(root)
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def inference_timesteps(settings: SchedulerSettings, num_steps: int) -> np.ndarray:
    """The timesteps diffusers' ``DDIMScheduler.set_timesteps(num_steps)`` makes, first to last.

    With ``T = num_train_timesteps`` and ``n = num_steps``:
    leading ``[(n-1-i) * (T // n) + steps_offset]``; trailing ``round(arange(T, 0, -T/n)) - 1``;
    linspace ``round(linspace(0, T-1, n))`` reversed.

    Returns:
        ``[n]`` int64, decreasing.

    Raises:
        ValueError: ``num_steps`` outside ``[1, T]``, or a leading timestep pushed past ``T - 1``
            by ``steps_offset`` (where diffusers would index past its tables).
    """
    total = settings.num_train_timesteps
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={total}]")
    if settings.timestep_spacing == "linspace":
        return np.linspace(0, total - 1, num_steps).round()[::-1].astype(np.int64)
    if settings.timestep_spacing == "leading":
        ratio = total // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + settings.steps_offset
        if ts[0] >= total:
            raise ValueError(f"leading spacing with steps_offset={settings.steps_offset} and "
                             f"num_steps={num_steps} gives timestep {ts[0]} >= {total}")
        return ts
    ratio = total / num_steps
    return np.round(np.arange(total, 0, -ratio)).astype(np.int64) - 1


def ddim_prev_timesteps(settings: SchedulerSettings, num_steps: int) -> np.ndarray:
    """Where each DDIM step of diffusers' ``DDIMScheduler.step`` lands: ``t - T // n``.

    diffusers uses this rule whatever the spacing (so with trailing spacing the last step may
    land on a timestep >= 0 rather than on the final alpha-bar).

    Returns:
        ``[n]`` int64 in sampling order; -1 marks "use ``final_alpha_cumprod``".
    """
    prev = inference_timesteps(settings, num_steps) - settings.num_train_timesteps // num_steps
    return np.maximum(prev, -1)


def ddim_alphas(settings: SchedulerSettings, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha_bar_t, alpha_bar_prev)`` of each DDIM step, as diffusers' ``DDIMScheduler.step``.

    Returns:
        Two ``[n]`` float32 arrays, in sampling order (see `ddim_prev_timesteps`).
    """
    ts = inference_timesteps(settings, num_steps)
    prev = ddim_prev_timesteps(settings, num_steps)
    ac = settings.alphas_cumprod
    alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], settings.final_alpha_cumprod)
    return ac[ts].astype(np.float32), alpha_prev.astype(np.float32)


def checkpoint_sampler(config: dict[str, Any], source: str = "scheduler_config.json"
                       ) -> tuple[str, dict[str, Any]]:
    """The registry sampler and its options that reproduce the config's own scheduler.

    Args:
        config: the parsed ``scheduler_config.json``.
        source: the file's path, for error messages.

    Returns:
        ``(sampler name, {SamplerOptions field: value})``: ``("ddim", {})`` for the classes of
        :data:`DDIM_CLASSES`; for :data:`MAPPED_CLASSES` the grid fields (diffusers' class
        defaults where the config has none) and ``clip_x0=None`` (these schedulers never clip).

    Raises:
        ValueError: naming ``source``, the field and the supported values, for a class with no
            sampler here or a field value the sampler does not implement.
    """
    cls = config.get("_class_name", "DDIMScheduler")
    if cls in DDIM_CLASSES:
        return "ddim", {}
    if cls not in MAPPED_CLASSES:
        raise ValueError(f"{source}: _class_name={cls!r} has no equivalent sampler here; "
                         f"supported: {list(DDIM_CLASSES) + list(MAPPED_CLASSES)} (or choose "
                         "a sampler explicitly)")
    for field, allowed in _PINNED[cls].items():
        value = config.get(field, allowed[0])
        if value not in allowed:
            raise ValueError(f"{source}: {cls} {field}={value!r} is not supported; supported: "
                             f"{list(allowed)}")
    name, defaults = MAPPED_CLASSES[cls]
    fields = {field: config.get(field, default) for field, default in defaults.items()}
    if fields.get("use_karras_sigmas") and cls == "DPMSolverMultistepScheduler" and \
            config.get("beta_schedule") == "squaredcos_cap_v2":
        raise ValueError(f"{source}: {cls} use_karras_sigmas=True with beta_schedule="
                         "'squaredcos_cap_v2' (fractional timesteps) is not supported; "
                         "supported: use_karras_sigmas=False")
    if config.get("algorithm_type") == "sde-dpmsolver++":
        name = "dpmpp_2m_sde"
    return name, {**fields, "clip_x0": None}


def project_overrides(settings: SchedulerSettings) -> dict[str, Any]:
    """The ``config`` fields of this project that describe the same diffusion.

    Returns:
        ``{"diffusion.num_timesteps", "diffusion.pred_type", "diffusion.beta_start",
        "diffusion.beta_end", "sample.clip_x0"}`` and ``"diffusion.schedule"`` when the betas
        have a project schedule name (else use ``settings.betas`` directly).
    """
    out = {"diffusion.num_timesteps": settings.num_train_timesteps,
           "diffusion.pred_type": settings.pred_type,
           "diffusion.beta_start": settings.beta_start, "diffusion.beta_end": settings.beta_end,
           "sample.clip_x0": settings.clip_sample}
    if settings.schedule is not None:
        out["diffusion.schedule"] = settings.schedule
    return out


def _number(config: dict[str, Any], field: str, cast, default):
    """``cast(config[field])`` (or the default); a ValueError naming the field if it is no number."""
    value = config.get(field, default)
    try:
        return cast(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scheduler: {field}={value!r} is not a number") from e


def _betas(name: str, trained, num: int, start: float, end: float) -> np.ndarray:
    """``[num]`` betas of ``trained_betas`` or of the named schedule, each checked in [0, 1).

    Raises:
        ValueError: an unknown schedule, ``num < 1``, or betas of another length or outside
            [0, 1) (e.g. a negative ``beta_end``), naming the fields.
    """
    if num < 1:
        raise ValueError(f"scheduler: num_train_timesteps={num} must be >= 1")
    if trained is None and name not in SCHEDULE_NAMES:
        raise ValueError(f"scheduler: unsupported beta_schedule={name!r}; supported: "
                         f"{sorted(SCHEDULE_NAMES)}")
    source = ("trained_betas" if trained is not None else
              f"beta_schedule={name!r}, beta_start={start}, beta_end={end}")
    if trained is None and not (0 <= start < 1 and 0 <= end < 1):
        raise ValueError(f"scheduler: {source}: beta_start and beta_end must lie in [0, 1)")
    try:
        betas = (np.asarray(trained, np.float32) if trained is not None
                 else diffusers_betas(name, num, start, end))
    except (TypeError, ValueError) as e:
        raise ValueError(f"scheduler: trained_betas is not a list of numbers ({e})") from e
    if betas.shape != (num,) or not np.all((betas >= 0) & (betas < 1)):
        span = f" in [{betas.min():.4g}, {betas.max():.4g}]" if betas.size else ""
        raise ValueError(f"scheduler: the betas of {source} must be num_train_timesteps={num} "
                         f"values in [0, 1); got {betas.size}{span}")
    return betas


def _choice(field: str, value, table: dict):
    if value not in table:
        raise ValueError(f"scheduler: unsupported {field}={value!r}; supported: {sorted(table)}")
    return table[value]
