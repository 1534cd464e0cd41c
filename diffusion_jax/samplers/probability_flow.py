"""Probability-flow ODE sampling (Song et al., 2021, eq. 13) and the registry entry
``probability_flow``.

The flow ``dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)`` (:mod:`diffusion_jax.sde.ode`) is
integrated from a prior sample down to ``sde_eps`` with a fixed-step method (``euler``,
``heun``, ``rk4``: :data:`EVALUATIONS_PER_STEP` network evaluations per step, plus one for the
final Tweedie step) or an adaptive one (``tsit5``, ``dopri5``: diffrax with a PID controller,
a count that depends on the tolerance and the data).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import check_positive, check_positive_int, one_of
from diffusion_jax.samplers.continuous import (SDEOptions, SigmaCapOptions, capped_top,
                                               score_setup, sde_hook)
from diffusion_jax.samplers.options import option, read
from diffusion_jax.samplers.registry import register
from diffusion_jax.sde._util import check_choice, expand
from diffusion_jax.sde.adapters import sde_for_schedule
from diffusion_jax.sde.ode import (FIXED_METHODS, METHODS, odeint_adaptive, odeint_fixed,
                                   probability_flow_drift)
from diffusion_jax.sde.sdes import check_sde, marginal_coefficients

EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}


@dataclasses.dataclass(frozen=True)
class ProbabilityFlowOptions(SDEOptions, SigmaCapOptions):
    """Settings of ``probability_flow`` (``num_steps``: fixed steps)."""
    method: str = option("rk4", "ODE method: ``euler``, ``heun``, ``rk4`` (fixed step) or "
                         "``tsit5``, ``dopri5`` (adaptive, diffrax PID controller).",
                         check=one_of(METHODS))
    rtol: float = option(1e-5, "adaptive ODE relative tolerance.", check=check_positive,
                         traced=True)
    atol: float = option(1e-5, "adaptive ODE absolute tolerance.", check=check_positive,
                         traced=True)
    max_steps: int = option(4096, "cap on the adaptive solver's steps.",
                            check=check_positive_int)


def ode_sample(score_fn, sde, x_init, key=None, *, method="rk4", num_steps=50, eps=1e-3,
               t_start=1.0, rtol=1e-5, atol=1e-5, max_steps=4096, denoise_final=True,
               step_hook=None):
    """Samples by integrating the probability-flow ODE from ``t_start`` down to ``eps``.

    Fixed-step methods use the uniform grid ``linspace(t_start, eps, num_steps + 1)``; with
    ``denoise_final`` the result is Tweedie's ``(x + s^2 score(x, eps)) / m`` at ``eps`` (one more
    score evaluation), else ``x_eps``. Network evaluations: ``num_steps`` times 1 / 2 / 4 for
    euler / heun / rk4; adaptive methods choose their own steps.

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``.
        sde: the SDE whose flow is integrated.
        x_init: ``[B, ...]`` sample of ``q_{t_start}``.
        key: PRNG key for ``step_hook`` (deterministic otherwise; may be ``None``).
        method: ``euler``, ``heun``, ``rk4``, ``tsit5`` or ``dopri5``.
        num_steps: static number of fixed steps (ignored by adaptive methods).
        eps: final time.
        t_start: starting time (``1`` from the prior).
        rtol, atol, max_steps: adaptive controller settings.
        denoise_final: apply the final Tweedie step.
        step_hook: fixed-step methods only: ``step_hook(x, t_next, key) -> x`` after each step,
            and with ``denoise_final`` once more after it with ``t_next = 0`` (clean data).

    Returns:
        ``[B, ...]`` samples; all NaN when the adaptive solve fails (``max_steps`` reached, e.g.
        on a NaN in the flow), which the checked entry points report
        (:func:`~.chain.check_finite`).

    Raises:
        ValueError: for an unknown method, ``num_steps < 1``, ``eps`` / ``t_start`` out of order,
            or a ``step_hook`` with an adaptive method.
    """
    check_sde(sde)
    check_choice("method", method, METHODS)
    if isinstance(eps, (int, float)) and isinstance(t_start, (int, float)) and not (
            0.0 <= eps < t_start <= 1.0):
        raise ValueError(f"need 0 <= eps < t_start <= 1, got eps={eps}, t_start={t_start}.")
    drift = probability_flow_drift(sde, score_fn)
    if method in FIXED_METHODS:
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
        ts = jnp.linspace(t_start, eps, int(num_steps) + 1, dtype=jnp.float32)
        x = odeint_fixed(drift, x_init, ts, method, step_hook, key,
                         scan=functools.partial(chain.scan, levels=ts[:-1], level_name="time"))
    else:
        if step_hook is not None:
            raise ValueError(f"step_hook is not supported by the adaptive method {method!r}.")
        x, _ = odeint_adaptive(drift, x_init, jnp.float32(t_start), jnp.float32(eps),
                               method=method, rtol=rtol, atol=atol, max_steps=max_steps,
                               throw=False,
                               report=lambda failed: chain.record_step(num_steps=0, failed=failed))
    if not denoise_final:
        return x
    t_b = jnp.full((x.shape[0],), eps, jnp.float32)
    m, s = marginal_coefficients(sde, t_b)
    x = (x + expand(s**2, x.ndim) * score_fn(x, t_b)) / expand(m, x.ndim)
    if step_hook is not None:
        x = step_hook(x, jnp.float32(0.0), jax.random.fold_in(key, int(num_steps)))
    chain.record_step(level=eps, level_name="time")
    return x


def _evaluations(options, num_timesteps):
    """``num_steps`` times 1 / 2 / 4 plus the final Tweedie step; ``None`` when adaptive."""
    del num_timesteps
    settings = read(ProbabilityFlowOptions, options)
    per_step = EVALUATIONS_PER_STEP.get(settings.method)
    return None if per_step is None else settings.num_steps * per_step + 1


@register("probability_flow", options=ProbabilityFlowOptions, evaluations=_evaluations)
def probability_flow(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """Probability-flow ODE sampling (:func:`ode_sample`) of ``options.sde`` on a discrete
    model, the registry's ``probability_flow``.

    ``step_hook`` (fixed-step methods only; adaptive ones raise) gets ``x0_pred = x_prev``
    (the ODE state carries no separate prediction).
    """
    settings = read(ProbabilityFlowOptions, options)
    sde = sde_for_schedule(schedule, settings.sde)
    if t_start is None and settings.sigma_max is not None:
        # From the prior at the capped level, as edm_heun / dpm_solver_pp start.
        t_start = capped_top(schedule, settings.sigma_max)
    score, x_sde, t0 = score_setup(denoise, schedule, sde, x_start, options, t_start)
    hook = None
    if step_hook is not None:
        to_sde = sde_hook(step_hook, schedule, sde)
        hook = lambda x, t_next, hook_key: to_sde(x, x, t_next, hook_key)
    return ode_sample(score, sde, x_sde, key, method=settings.method,
                      num_steps=settings.num_steps, eps=settings.sde_eps,
                      t_start=1.0 if t_start is None else t0, rtol=settings.rtol,
                      atol=settings.atol, max_steps=settings.max_steps, step_hook=hook)
