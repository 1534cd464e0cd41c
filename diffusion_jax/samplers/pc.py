"""Predictor--corrector samplers of the reverse-time SDE (Song et al., 2021, Algorithms 1--3).

The reverse SDE of ``dx = f dt + g dW`` is ``dx = [f - g^2 score(x, t)] dt + g dW_bar``. The
sampler walks the grid ``t_i = linspace(1, eps, N)`` (``N = sde.num_scales``) and at each
``t_i`` runs ``n_corrector_steps`` corrector updates and then one predictor update:

Predictors (``x -> (x, x_mean)``, ``z ~ N(0, I)``):

* ``euler_maruyama``: ``x_mean = x - [f - g^2 s] / N``, ``x = x_mean + g sqrt(1 / N) z``.
* ``reverse_diffusion``: with :func:`~diffusion_jax.sde.sdes.discretize`'s ``(f_i, G_i)``,
  ``x_mean = x - f_i + G_i^2 s``, ``x = x_mean + G_i z``.
* ``ancestral`` (VP, VE): DDPM's ``x_mean = (x + beta_i s) / sqrt(1 - beta_i)``,
  ``x = x_mean + sqrt(beta_i) z``; SMLD's ``x_mean = x + (sigma_i^2 - sigma_{i-1}^2) s``,
  ``x = x_mean + sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2) z``.
* ``none``.

Correctors (``alpha_i = 1 - beta_i`` for VP / sub-VP, 1 for VE):

* ``langevin``: ``delta = 2 alpha_i (snr mean_b ||z_b|| / mean_b ||s_b||)^2``,
  ``x <- x + delta s + sqrt(2 delta) z``. As in score_sde the two norms are averaged over the
  batch: per-example norms are fine for images, but in low dimension ``||s_b||`` can be near 0
  for a single chain and the step explodes (the 2-D mixture test then fails).
* ``annealed_langevin``: the same update with ``delta = 2 alpha_i (snr s(t))^2``,
  ``s(t)`` the marginal std.
* ``none``.

The result is the last predictor's ``x_mean`` (``denoise_final``, score_sde's noise removal) or
``x``. One ``lax.scan`` over the grid; step ``i`` draws its noise from ``fold_in(key, i)``.

Predictors and correctors are the entries of the tables :data:`PREDICTORS` and
:data:`CORRECTORS` (a new one is one function and one row). The registry entry ``pc`` runs the
sampler on a discrete model (:mod:`.continuous`): ``num_steps`` grid points,
``num_steps (1 + n_corrector_steps)`` network evaluations (``num_steps`` without corrector).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import check_positive, check_positive_int
from diffusion_jax.samplers.continuous import SDEOptions, score_setup, sde_hook
from diffusion_jax.samplers.options import option, read
from diffusion_jax.samplers.registry import register
from diffusion_jax.sde._util import check_choice, expand
from diffusion_jax.sde.adapters import sde_for_schedule
from diffusion_jax.sde.sdes import (VESDE, SubVPSDE, VPSDE, check_sde, discrete_grid_index,
                                    discretize, drift_and_diffusion, marginal_coefficients,
                                    ve_grid_sigmas, vp_grid_beta)


class Update(NamedTuple):
    """A predictor or corrector of :data:`PREDICTORS` / :data:`CORRECTORS`.

    Attributes:
        fn: predictor ``fn(sde, x, t [B], score, key) -> (x, x_mean)``; corrector
            ``fn(sde, x, t [B], score, z, snr) -> step size [B]``; ``None`` for ``none``.
        uses_beta_i: it uses score_sde's VP discretisation ``beta_i = beta(t_i) / N``, which
            needs ``beta_i < 1`` (``num_steps > beta_max``) on a VP / sub-VP SDE.
    """
    fn: Callable | None
    uses_beta_i: bool


@dataclasses.dataclass(frozen=True)
class PCOptions(SDEOptions):
    """Settings of ``pc`` (``num_steps``: its grid points)."""
    predictor: str = option("reverse_diffusion", "PC predictor (a key of :data:`PREDICTORS`).",
                            check=lambda field, value: check_choice(field, value, PREDICTORS))
    corrector: str = option("langevin", "PC corrector (a key of :data:`CORRECTORS`).",
                            check=lambda field, value: check_choice(field, value, CORRECTORS))
    snr: float = option(0.16, "Langevin corrector signal-to-noise ratio (step size rule).",
                        check=check_positive, traced=True)
    n_corrector_steps: int = option(1, "corrector updates per PC step.",
                                    check=check_positive_int)


def pc_sample(score_fn, sde, x_init, key, *, predictor="reverse_diffusion", corrector="langevin",
              snr=0.16, n_corrector_steps=1, eps=1e-3, t_start=1.0, denoise_final=True,
              step_hook=None):
    """Predictor--corrector sampling from ``t_start`` down to ``eps`` (see the module docstring).

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``, the score of ``sde``'s marginals.
        sde: :class:`~diffusion_jax.sde.sdes.VESDE`, ``VPSDE`` or ``SubVPSDE``; ``num_scales`` is
            the number of grid points ``N`` (and of predictor steps from ``t = 1``).
        x_init: ``[B, ...]`` sample of ``q_{t_start}`` (the prior for ``t_start = 1``).
        key: PRNG key.
        predictor: one of :data:`PREDICTORS` (``ancestral`` needs VP or VE).
        corrector: one of :data:`CORRECTORS`.
        snr: corrector signal-to-noise ratio ``r > 0``.
        n_corrector_steps: static number of corrector updates per grid point (``>= 0``).
        eps: last time, ``0 < eps < t_start``.
        t_start: static Python float in ``(eps, 1]``: start on the grid's tail
            ``{t_i <= t_start}`` (SDEdit).
        denoise_final: return the last predictor's mean instead of its noisy sample.
        step_hook: optional ``step_hook(x, x0_pred, t_next, key) -> x`` after each predictor
            step; ``x0_pred = (x + s^2 score) / m`` (Tweedie at the step's start) and ``t_next``
            the next grid time (``0.0`` after the last step).

    Returns:
        ``x_0`` estimate ``[B, ...]``.

    Raises:
        ValueError: for an unknown predictor / corrector, ``ancestral`` with sub-VP, or bad
            ``snr``, ``n_corrector_steps``, ``eps`` or ``t_start``.
    """
    check_sde(sde)
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    if predictor == "ancestral" and isinstance(sde, SubVPSDE):
        raise ValueError("predictor 'ancestral' is defined for VPSDE and VESDE, not SubVPSDE.")
    if isinstance(snr, (int, float)) and not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}.")
    if int(n_corrector_steps) != n_corrector_steps or n_corrector_steps < 0:
        raise ValueError(f"n_corrector_steps must be an integer >= 0, got {n_corrector_steps!r}.")
    predict, step_size = PREDICTORS[predictor].fn, CORRECTORS[corrector].fn
    ts = jnp.asarray(sde_time_grid(sde.num_scales, eps, t_start))            # [S]
    t_nexts = jnp.concatenate([ts[1:], jnp.zeros((1,), jnp.float32)])
    batch = x_init.shape[0]

    def body(carry, inputs):
        x, _ = carry
        i, t, t_next = inputs
        step_key = jax.random.fold_in(key, i)
        t_b = jnp.full((batch,), t, jnp.float32)
        for c in range(n_corrector_steps if step_size is not None else 0):
            x = _correct(step_size, score_fn, sde, x, t_b, snr,
                         jax.random.fold_in(step_key, c + 1))
        noise_key, hook_key = jax.random.split(step_key)
        score = score_fn(x, t_b)
        x_new, x_mean = predict(sde, x, t_b, score, noise_key)
        if step_hook is not None:
            m, s = marginal_coefficients(sde, t_b)
            x0_pred = (x + expand(s**2, x.ndim) * score) / expand(m, x.ndim)
            x_new = step_hook(x_new, x0_pred, t_next, hook_key)
            x_mean = jnp.where(t_next > 0, x_mean, x_new)
        return (x_new, x_mean), None

    (x, x_mean), _ = chain.scan(body, (x_init, x_init), (jnp.arange(ts.shape[0]), ts, t_nexts),
                                levels=ts, level_name="time", state_of=lambda c: c[0])
    return x_mean if denoise_final else x


def _evaluations(options, num_timesteps):
    """One score per grid point, plus ``n_corrector_steps`` with a corrector."""
    del num_timesteps
    settings = read(PCOptions, options)
    correcting = CORRECTORS[settings.corrector].fn is not None
    return settings.num_steps * (1 + (settings.n_corrector_steps if correcting else 0))


@register("pc", options=PCOptions, evaluations=_evaluations)
def predictor_corrector(denoise, schedule, x_start, key, options, *, t_start=None,
                        step_hook=None):
    """Predictor--corrector sampling (:func:`pc_sample`) of ``options.sde`` on a discrete model,
    the registry's ``pc``.

    ``t_start`` needs a concrete schedule (its continuous start time fixes the grid's length).

    Raises:
        ValueError: for a VP / sub-VP SDE with ``num_steps <= beta_max`` and a predictor or
            corrector that uses score_sde's discretisation (``reverse_diffusion``,
            ``ancestral``, ``langevin``, ``annealed_langevin``: ``beta_i >= 1`` gives NaN).
    """
    settings = read(PCOptions, options)
    with jax.ensure_compile_time_eval():                    # concrete t0 also inside jax.jit
        sde = sde_for_schedule(schedule, settings.sde, settings.num_steps)
        _check_pc_steps(sde, settings.predictor, settings.corrector, settings.num_steps)
        score, x_sde, t0 = score_setup(denoise, schedule, sde, x_start, options, t_start)
    return pc_sample(score, sde, x_sde, key, predictor=settings.predictor,
                     corrector=settings.corrector, snr=settings.snr,
                     n_corrector_steps=settings.n_corrector_steps, eps=settings.sde_eps,
                     t_start=1.0 if t_start is None else float(t0),
                     step_hook=sde_hook(step_hook, schedule, sde))


def sde_time_grid(num_scales, eps=1e-3, t_start=1.0):
    """score_sde's grid ``linspace(1, eps, N)`` from its first point ``<= t_start``.

    Returns float32 ``[S]`` (numpy).

    Raises:
        ValueError: unless ``0 < eps < t_start <= 1`` (Python floats) and the tail is non-empty.
    """
    if not 0.0 < eps < t_start <= 1.0:
        raise ValueError(f"need 0 < eps < t_start <= 1, got eps={eps}, t_start={t_start}.")
    grid = np.linspace(1.0, eps, int(num_scales))
    return grid[grid <= t_start + 1e-7].astype(np.float32)


def _euler_maruyama(sde, x, t, score, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    f, g = drift_and_diffusion(sde, x, t)
    n = sde.num_scales
    x_mean = x - (f - expand(g**2, x.ndim) * score) / n
    return x_mean + expand(g / np.sqrt(n), x.ndim) * z, x_mean


def _reverse_diffusion(sde, x, t, score, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    f, big_g = discretize(sde, x, t)
    big_g = expand(big_g, x.ndim)
    x_mean = x - f + big_g**2 * score
    return x_mean + big_g * z, x_mean


def _ancestral(sde, x, t, score, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    idx = discrete_grid_index(sde, t)
    if isinstance(sde, VPSDE):
        beta = expand(vp_grid_beta(sde, idx), x.ndim)
        x_mean = (x + beta * score) / jnp.sqrt(1.0 - beta)
        return x_mean + jnp.sqrt(beta) * z, x_mean
    sigma, prev = (expand(v, x.ndim) for v in ve_grid_sigmas(sde, idx))
    x_mean = x + (sigma**2 - prev**2) * score
    return x_mean + jnp.sqrt(prev**2 * (sigma**2 - prev**2) / sigma**2) * z, x_mean


def _no_prediction(sde, x, t, score, key):
    del sde, t, score, key
    return x, x


def _langevin_step(sde, x, t, score, z, snr):
    """``snr mean_b ||z_b|| / mean_b ||s_b||`` (squared): score_sde's Langevin rule."""
    del sde, x, t
    return (snr * (jnp.mean(_norm(z)) / jnp.mean(_norm(score)))) ** 2


def _annealed_langevin_step(sde, x, t, score, z, snr):
    """``(snr s(t))^2`` with ``s(t)`` the marginal std."""
    del x, score, z
    _, std = marginal_coefficients(sde, t)
    return (snr * std) ** 2


PREDICTORS = {"euler_maruyama": Update(_euler_maruyama, False),
              "reverse_diffusion": Update(_reverse_diffusion, True),
              "ancestral": Update(_ancestral, True),
              "none": Update(_no_prediction, False)}
CORRECTORS = {"langevin": Update(_langevin_step, True),
              "annealed_langevin": Update(_annealed_langevin_step, True),
              "none": Update(None, False)}


def _correct(step_size, score_fn, sde, x, t, snr, key):
    """One corrector update at ``t [B]``: ``x + delta s + sqrt(2 delta) z`` with
    ``delta = 2 alpha_i step_size(...)`` (see the module docstring)."""
    score = score_fn(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    if isinstance(sde, VESDE):
        alpha = jnp.ones_like(t)
    else:
        alpha = 1.0 - vp_grid_beta(sde, discrete_grid_index(sde, t))
    step = expand(2.0 * alpha * step_size(sde, x, t, score, z, snr), x.ndim)
    return x + step * score + jnp.sqrt(2.0 * step) * z


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def _check_pc_steps(sde, predictor, corrector, num_steps):
    """score_sde's VP discretisation ``beta_i = beta(t_i) / N`` (used by the reverse-diffusion
    and ancestral predictors and the Langevin correctors) needs ``beta_i < 1``."""
    uses_beta_i = PREDICTORS[predictor].uses_beta_i or CORRECTORS[corrector].uses_beta_i
    if uses_beta_i and not isinstance(sde, VESDE) and float(sde.beta_max) >= num_steps:
        raise ValueError(
            f"pc with predictor {predictor!r} and corrector {corrector!r} on a VP / sub-VP SDE "
            f"needs num_steps > beta_max = {float(sde.beta_max):.3g} (else beta_i >= 1 gives "
            f"NaN); got num_steps={num_steps}. Use more steps, or predictor 'euler_maruyama' "
            "with corrector 'none'.")
