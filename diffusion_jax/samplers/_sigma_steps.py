"""What the diffusers-style samplers share (:mod:`.euler`, :mod:`.euler_ancestral`,
:mod:`.dpmpp_2m`, :mod:`.unipc`): their timestep / noise-level grid, its options, and the model as a
denoiser of VE noise level called at the grid's own timesteps.

The grid is exactly the one diffusers' ``set_timesteps`` builds (so a checkpoint's
``scheduler_config.json`` reproduces diffusers' output). With ``T`` training steps, ``n`` steps
and ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` of the training schedule:

* timesteps, ``k`` the step family (``euler``: Euler / Euler-ancestral; ``multistep``:
  DPM-Solver++ / UniPC, which take ``n + 1`` points and drop the last):

  ``linspace``: euler ``linspace(0, T - 1, n)`` reversed (fractional);
  multistep ``round(linspace(0, T - 1, n + 1))`` reversed, without its last (0);
  ``leading``: ``arange(m) * (T // m)`` reversed ``+ steps_offset`` (``m = n``, or ``n + 1``
  dropping the last for multistep);
  ``trailing``: ``round(arange(T, 0, -T / n)) - 1``;

* sigmas: ``sigma_t`` interpolated linearly at those timesteps; or with ``use_karras_sigmas``
  Karras et al.'s ramp ``(s_max^(1/7) + i / (n - 1) (s_min^(1/7) - s_max^(1/7)))^7`` (euler:
  between the interpolated first and last sigmas; multistep: between ``sigma_{T-1}`` and
  ``sigma_0``), the timesteps then being where ``log sigma_t`` (linear between steps) reaches
  each sigma (rounded for multistep);
* then one last sigma: ``0`` (``final_sigmas_type = zero``) or ``sigma_0`` (``sigma_min``).

The model sees ``x_vp = x / sqrt(1 + sigma^2)`` at the grid's timestep (``int32`` when they are
all whole numbers, else ``float32``, as diffusers passes them) and its prediction is read with
``alpha_bar = 1 / (1 + sigma^2)`` of the grid's sigma.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import to_x0_and_eps
from diffusion_jax.samplers._checks import call_denoiser, one_of
from diffusion_jax.samplers.options import StepsOptions, option
from diffusion_jax.sde.adapters import clip_bounds

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")


def _check_offset(field, value):
    if int(value) != value or value < 0:
        raise ValueError(f"{field} must be an integer >= 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class StepGridOptions(StepsOptions):
    """The grid of the diffusers-style samplers (euler, euler_ancestral, dpmpp_2m,
    dpmpp_2m_sde, unipc); defaults are diffusers' class defaults."""
    timestep_spacing: str = option(
        "linspace", "diffusers' ``timestep_spacing``: ``linspace``, ``leading`` or ``trailing``.",
        check=one_of(TIMESTEP_SPACINGS), config=None)
    steps_offset: int = option(0, "diffusers' ``steps_offset``, added to ``leading`` timesteps.",
                               check=_check_offset, convert=int, config=None)
    use_karras_sigmas: bool = option(
        False, "Karras et al.'s noise levels (rho 7) instead of the interpolated ones.",
        convert=bool, config=None)
    final_sigmas_type: str = option(
        "zero", "the last noise level: ``zero`` or ``sigma_min`` (the schedule's ``sigma_0``).",
        check=one_of(FINAL_SIGMAS), config=None)


def step_grid(alphas_cumprod, settings, family):
    """``(timesteps [n], sigmas [n + 1])`` of diffusers' ``set_timesteps`` (module docstring).

    Args:
        alphas_cumprod: ``[T]`` the training schedule's alpha-bar (concrete).
        settings: a :class:`StepGridOptions`.
        family: ``euler`` or ``multistep``.

    Returns:
        ``timesteps`` float64 ``[n]`` (decreasing) and ``sigmas`` float32 ``[n + 1]``.

    Raises:
        ValueError: a bad ``num_steps`` or a timestep past ``T - 1``.
    """
    ac = np.asarray(alphas_cumprod, np.float32)
    train_sigmas = ((1.0 - ac) / ac) ** 0.5                                 # [T] float32
    ts = grid_timesteps(ac.shape[0], settings.num_steps, settings.timestep_spacing,
                        settings.steps_offset, family)
    sigmas = np.interp(ts, np.arange(ac.shape[0]), train_sigmas)
    if settings.use_karras_sigmas:
        ends = (sigmas[0], sigmas[-1]) if family == "euler" else (train_sigmas[-1],
                                                                  train_sigmas[0])
        hi, lo = (float(v) for v in ends)
        ramp = np.linspace(0.0, 1.0, settings.num_steps)
        sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        ts = sigma_to_timestep(sigmas, np.log(train_sigmas))
        ts = ts.round() if family == "multistep" else ts
    last = train_sigmas[0] if settings.final_sigmas_type == "sigma_min" else 0.0
    return ts.astype(np.float64), np.concatenate([sigmas, [last]]).astype(np.float32)


def grid_timesteps(num_train, num_steps, spacing, steps_offset, family):
    """The ``[n]`` float64 timesteps of ``spacing`` (module docstring), before Karras sigmas.

    Raises:
        ValueError: ``num_steps`` outside ``[1, T]`` or a timestep past ``T - 1``.
    """
    if int(num_steps) != num_steps or not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be an integer in [1, {num_train}], got {num_steps!r}.")
    extra = 1 if family == "multistep" else 0
    if spacing == "linspace" and extra:
        ts = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "linspace":
        ts = np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1]
    elif spacing == "leading":
        count = num_steps + extra
        ts = (np.arange(count) * (num_train // count)).round()[::-1][:num_steps] + steps_offset
    else:
        ts = np.arange(num_train, 0, -num_train / num_steps).round() - 1
    ts = np.asarray(ts, np.float64)
    if ts.max() > num_train - 1:
        raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={steps_offset} gives "
                         f"timestep {ts.max():g}, past the schedule's last step {num_train - 1}.")
    return ts


def sigma_to_timestep(sigmas, log_train_sigmas):
    """The fractional timesteps where ``log sigma_t`` (linear between steps) equals
    ``log sigmas`` (diffusers' ``_sigma_to_t``): ``[n] -> [n]`` float64."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_train_sigmas[:, None]                  # [T, n]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def grid_setup(denoise, schedule, options, settings, family):
    """``(denoiser, timesteps, sigmas)``: the model as ``D(x, sigma, t) -> x0`` and the grid as
    jax arrays (timesteps ``[n]`` int32 when all whole, else float32; sigmas ``[n + 1]``).

    Raises:
        ValueError: a traced schedule (the grid is built in numpy), or a bad grid setting.
    """
    try:
        with jax.ensure_compile_time_eval():
            ac = np.asarray(schedule.alphas_cumprod, np.float32)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError("the diffusers-style samplers need a concrete schedule (close over it "
                         "instead of passing it traced).") from err
    ts, sigmas = step_grid(ac, settings, family)
    whole = bool(np.all(ts == np.round(ts)))
    ts = jnp.asarray(ts, jnp.int32 if whole else jnp.float32)
    bounds = clip_bounds(options.clip_x0)

    def denoiser(x, sigma, t):
        alpha_bar = 1.0 / (1.0 + sigma**2)
        x_vp = x * jnp.sqrt(alpha_bar)
        pred = call_denoiser(denoise, x_vp, jnp.full((x.shape[0],), t, ts.dtype))
        x0, _ = to_x0_and_eps(pred.astype(jnp.float32), x_vp, alpha_bar, options.pred_type)
        return x0 if bounds is None else jnp.clip(x0, *bounds)

    return denoiser, ts, jnp.asarray(sigmas)
