"""DDIM (Song, Meng & Ermon, 2021): timesteps, the step, the chain and the registry entry ``ddim``.

``eta = 0`` is the deterministic sampler; ``eta = 1`` with consecutive steps is DDPM with the
posterior variance. ``num_steps`` network evaluations.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import PRED_TYPES
from diffusion_jax.samplers._checks import (check_choice, check_eta, check_t_start, check_x,
                                            one_of)
from diffusion_jax.samplers._discrete import predict_x0_eps, run_chain, with_dynamic_threshold
from diffusion_jax.samplers.options import StepsOptions, ThresholdOptions, option, read
from diffusion_jax.samplers.registry import register
from diffusion_jax.sde.adapters import clip_bounds

DDIM_SPACINGS = ("uniform", "quadratic")


@dataclasses.dataclass(frozen=True)
class DDIMOptions(StepsOptions, ThresholdOptions):
    """Settings of ``ddim``."""
    eta: float = option(0.0, "DDIM noise scale in [0, 1] (0: deterministic).", check=check_eta,
                        traced=True)
    spacing: str = option("uniform", "DDIM timestep spacing, ``uniform`` or ``quadratic`` (read "
                          "from ``config.sample.spacing`` when a config has one).",
                          check=one_of(DDIM_SPACINGS), config=None)
    timesteps: tuple[tuple[int, int], ...] | None = option(
        None, "``None``, or DDIM's explicit ``((t_0, t_prev_0), (t_1, t_prev_1), ...)`` pairs "
        "(``t_prev = -1``: ``alpha_bar = 1``), overriding ``num_steps`` and ``spacing`` (e.g. "
        "the steps of a diffusers ``DDIMScheduler``).",
        convert=lambda pairs: _check_timestep_pairs(pairs), kind=tuple, config=None)
    clip_keeps_eps: bool = option(
        False, "with ``clip_x0``, keep the model's raw eps in the direction term (diffusers' "
        "``DDIMScheduler``) instead of re-deriving it from the clipped x0.", convert=bool,
        config=None)

    @staticmethod
    def resolve(values):
        """Explicit ``timesteps`` fix ``num_steps`` (one step per pair)."""
        if values["timesteps"] is not None:
            values["num_steps"] = len(values["timesteps"])


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
    check_choice("spacing", spacing, DDIM_SPACINGS)
    t_top = check_t_start(t_start, num_timesteps)
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
    check_choice("pred_type", pred_type, PRED_TYPES)
    check_eta("eta", eta)
    clip_x0 = clip_bounds(clip_x0)
    t_b = jnp.full((x_t.shape[0],), t, jnp.int32)                          # [B]
    x0_pred, eps_pred = predict_x0_eps(denoise, sched, x_t, t_b, pred_type, clip_x0,
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
    check_x(x_T, "x_T")
    check_choice("pred_type", pred_type, PRED_TYPES)
    check_eta("eta", eta)
    clip_x0 = clip_bounds(clip_x0)
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

    return run_chain(step, x_T, key, ts, t_prevs, step_hook, return_trajectory)


@register("ddim", options=DDIMOptions)
def ddim(denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """:func:`ddim_sample`, the registry's ``ddim``; from ``t_start`` it takes
    ``min(num_steps, t_start + 1)`` steps, the most a chain from there can have (with
    ``options.timesteps``: the pairs with ``t <= t_start``)."""
    settings = read(DDIMOptions, options)
    num_steps = settings.num_steps if t_start is None else min(settings.num_steps, t_start + 1)
    denoise, pred_type = with_dynamic_threshold(denoise, schedule, options.pred_type,
                                                settings.dynamic_threshold)
    return ddim_sample(denoise, schedule, x_start, key, num_steps=num_steps, eta=settings.eta,
                       spacing=settings.spacing, pred_type=pred_type,
                       clip_x0=options.clip_x0, t_start=t_start, step_hook=step_hook,
                       timesteps=settings.timesteps, clip_keeps_eps=settings.clip_keeps_eps)


def _explicit_timesteps(pairs, num_timesteps, t_start):
    """``(ts [S], t_prevs [S])`` int32 of checked ``(t, t_prev)`` pairs, those with
    ``t <= t_start`` when ``t_start`` is given."""
    pairs = np.asarray(_check_timestep_pairs(pairs), np.int64)
    if pairs.max() > num_timesteps - 1:
        raise ValueError(f"timesteps reach {pairs.max()}, past the schedule's last step "
                         f"{num_timesteps - 1}.")
    if t_start is not None:
        pairs = pairs[pairs[:, 0] <= check_t_start(t_start, num_timesteps)]
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
