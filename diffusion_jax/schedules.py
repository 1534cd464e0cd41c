"""Noise schedules: discrete beta schedules, their derived arrays, and continuous-time marginals.

Discrete time follows the project convention: ``t`` is an integer index in ``{0, ..., T-1}``;
``x_t`` has ``alpha_bar = alphas_cumprod[t]`` and ``t = T-1`` is the noisiest step:

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
    alpha_bar_t = prod_{s<=t} (1 - beta_s).

The beta-schedule constructors take a static ``num_timesteps``; they compute in numpy float64 and
return ``jnp.float32`` arrays of shape ``[T]``. Everything else is pure ``jnp`` and works under
``jax.jit``, ``jax.vmap`` and ``jax.grad``.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def linear_beta_schedule(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """Linear betas of DDPM (Ho et al., 2020).

    ``beta_i = beta_start + (beta_end - beta_start) * i / (T - 1)`` for ``i = 0, ..., T-1``.

    Args:
        num_timesteps: static number of steps ``T``.
        beta_start: ``beta_0``.
        beta_end: ``beta_{T-1}``.

    Returns:
        betas: ``[T]`` float32.

    Example:
        >>> linear_beta_schedule(1000)[-1]   # 0.02
    """
    _check_num_timesteps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    return _to_f32(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def scaled_linear_beta_schedule(num_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """Linear in ``sqrt(beta)``, then squared (Stable Diffusion / latent diffusion).

    ``beta_i = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * i / (T - 1))^2``.

    Args:
        num_timesteps: static number of steps ``T``.
        beta_start: ``beta_0``.
        beta_end: ``beta_{T-1}``.

    Returns:
        betas: ``[T]`` float32.
    """
    _check_num_timesteps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    root = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_timesteps, dtype=np.float64)
    return _to_f32(root**2)


def cosine_beta_schedule(num_timesteps=1000, s=0.008, max_beta=0.999):
    """Cosine schedule of Nichol & Dhariwal (2021), defined through ``alpha_bar``.

    ``f(u) = cos(((u / T + s) / (1 + s)) * pi / 2)^2``, ``alpha_bar(u) = f(u) / f(0)`` and
    ``beta_i = min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta)`` for ``i = 0, ..., T-1``,
    so ``alphas_cumprod[t] = alpha_bar(t + 1)`` until the clip at ``max_beta`` takes effect.

    Args:
        num_timesteps: static number of steps ``T``.
        s: small offset that keeps ``beta_0`` from being vanishingly small.
        max_beta: upper clip on each beta, in (0, 1) (the last steps would otherwise reach 1).

    Returns:
        betas: ``[T]`` float32.
    """
    _check_num_timesteps(num_timesteps)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}.")
    u = np.arange(num_timesteps + 1, dtype=np.float64)
    f = np.cos((u / num_timesteps + s) / (1.0 + s) * np.pi / 2.0) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return _to_f32(np.minimum(betas, max_beta))


def sigmoid_beta_schedule(num_timesteps=1000, beta_start=1e-4, beta_end=0.02, start=-3.0,
                                                    end=3.0, tau=1.0):
    """Betas following a sigmoid ramp from ``beta_start`` to ``beta_end``.

    With ``u_i = start + (end - start) * i / (T - 1)`` and ``g(u) = sigmoid(u / tau)``,

    ``beta_i = beta_start + (beta_end - beta_start) * (g(u_i) - g(start)) / (g(end) - g(start))``,

    so the endpoints are exactly ``beta_start`` and ``beta_end`` and ``tau`` sets how sharply the
    ramp rises in the middle (the GeoDiff sigmoid schedule, normalised to hit its endpoints).

    Args:
        num_timesteps: static number of steps ``T``.
        beta_start: ``beta_0``.
        beta_end: ``beta_{T-1}``.
        start: left end of the sigmoid's input range.
        end: right end of the sigmoid's input range (``end > start``).
        tau: temperature (``tau > 0``).

    Returns:
        betas: ``[T]`` float32.
    """
    _check_num_timesteps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    if not end > start:
        raise ValueError(f"sigmoid schedule needs end > start, got start={start}, end={end}.")
    if not tau > 0:
        raise ValueError(f"sigmoid schedule needs tau > 0, got tau={tau}.")
    g = lambda u: 1.0 / (1.0 + np.exp(-u / tau))
    u = np.linspace(start, end, num_timesteps, dtype=np.float64)
    ramp = (g(u) - g(start)) / (g(end) - g(start))
    return _to_f32(beta_start + (beta_end - beta_start) * ramp)


BETA_SCHEDULES = {
        "linear": linear_beta_schedule,
        "scaled_linear": scaled_linear_beta_schedule,
        "cosine": cosine_beta_schedule,
        "sigmoid": sigmoid_beta_schedule,
}


def get_beta_schedule(name, num_timesteps, **kwargs):
    """Betas ``[T]`` float32 of the named schedule.

    Args:
        name: one of ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``.
        num_timesteps: static number of steps ``T``.
        **kwargs: forwarded to the schedule's constructor (e.g. ``beta_start``, ``beta_end``).

    Returns:
        betas: ``[T]`` float32.

    Raises:
        ValueError: if ``name`` is not a known schedule.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(
                f"Unknown beta schedule name {name!r}; expected one of {sorted(BETA_SCHEDULES)}.")
    return BETA_SCHEDULES[name](num_timesteps, **kwargs)


class DiscreteSchedule(NamedTuple):
    """Every per-step array a discrete diffusion needs; each is ``[T]`` float32.

    A NamedTuple, hence a pytree: it can be passed into and returned from ``jax.jit``.

    Attributes:
        betas: ``beta_t``.
        alphas: ``alpha_t = 1 - beta_t``.
        alphas_cumprod: ``alpha_bar_t = prod_{s<=t} alpha_s``.
        alphas_cumprod_prev: ``alpha_bar_{t-1}`` with ``alpha_bar_{-1} = 1``.
        sqrt_alphas_cumprod: ``sqrt(alpha_bar_t)``.
        sqrt_one_minus_alphas_cumprod: ``sqrt(1 - alpha_bar_t)``.
        log_snr: ``log(alpha_bar_t / (1 - alpha_bar_t))``.
        posterior_variance: ``beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``
          (0 at t=0).
        posterior_log_variance_clipped: ``log beta~_t`` with index 0 replaced by index 1, i.e.
            ``log [beta~_1, beta~_1, beta~_2, ...]`` (avoids ``log 0``).
        posterior_mean_coef1: ``beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t)`` (multiplies x_0).
        posterior_mean_coef2: ``(1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)``
          (multiplies x_t).
    """
    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_snr: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self):
        """Static number of steps ``T`` (a Python int, also under jit)."""
        return self.betas.shape[0]


def make_schedule(betas):
    """Derives every array of a :class:`DiscreteSchedule` from ``betas``.

    ``alpha_bar`` is computed as ``exp(cumsum(log1p(-beta)))`` and ``1 - alpha_bar`` as
    ``-expm1(cumsum(log1p(-beta)))``, which keeps ``1 - alpha_bar`` accurate in float32 when
    ``alpha_bar`` is close to 1 (small t).

    Args:
        betas: ``[T]`` with ``T >= 2``, each ``beta_t`` in ``(0, 1)`` except the last, which
            may be 1: a zero-terminal-SNR schedule (``alpha_bar_{T-1} = 0``, ``log_snr =
            -inf`` there), sampled from pure noise by x0- or v-predicting models with ddpm /
            ddim (``x0 = -v`` at that step).

    Returns:
        A :class:`DiscreteSchedule` of ``[T]`` float32 arrays.

    Raises:
        ValueError: if ``betas`` is not one-dimensional with at least two entries, or (when
            its values are known, i.e. outside ``jax.jit``) some beta is NaN or outside (0, 1)
            (the last outside (0, 1]).
    """
    betas = jnp.asarray(betas, jnp.float32)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must have shape [T] with T >= 2, got shape {betas.shape}.")
    if not isinstance(betas, jax.core.Tracer):
        values = np.asarray(betas)
        ok = (values > 0.0) & (values < 1.0)  # NaN fails both tests
        ok[-1] |= values[-1] == 1.0            # zero terminal SNR (Lin et al., 2023)
        bad = np.flatnonzero(~ok)
        if bad.size:
            raise ValueError(f"betas must lie in (0, 1), the last in (0, 1]; betas[{bad[0]}] = "
                             f"{values[bad[0]]} ({bad.size} bad entries).")
    log_alphas = jnp.log1p(-betas)
    log_alphas_cumprod = jnp.cumsum(log_alphas)
    alphas_cumprod = jnp.exp(log_alphas_cumprod)
    one_minus_ac = -jnp.expm1(log_alphas_cumprod)                        # 1 - alpha_bar_t
    alphas_cumprod_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), alphas_cumprod[:-1]])
    one_minus_ac_prev = jnp.concatenate([jnp.zeros((1,), jnp.float32), one_minus_ac[:-1]])
    posterior_variance = betas * one_minus_ac_prev / one_minus_ac
    return DiscreteSchedule(
            betas=betas,
            alphas=1.0 - betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=jnp.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=jnp.sqrt(one_minus_ac),
            log_snr=log_alphas_cumprod - jnp.log(one_minus_ac),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=jnp.log(
                    jnp.concatenate([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * jnp.sqrt(alphas_cumprod_prev) / one_minus_ac,
            posterior_mean_coef2=one_minus_ac_prev * jnp.exp(0.5 * log_alphas) / one_minus_ac,
    )


def schedule_from_config(diffusion_cfg):
    """The :class:`DiscreteSchedule` a ``config.diffusion`` section describes.

    ``betas = get_beta_schedule(schedule, num_timesteps, beta_start, beta_end)`` (the beta range
    is passed to the schedules that take one: ``linear``, ``scaled_linear``, ``sigmoid``).

    Args:
        diffusion_cfg: the ``config.diffusion`` section (``schedule``, ``num_timesteps``,
            ``beta_start``, ``beta_end``).

    Returns:
        A :class:`DiscreteSchedule` of ``[T]`` float32 arrays, ``T = num_timesteps``.

    Raises:
        ValueError: if ``diffusion_cfg.schedule`` is not a known schedule.
    """
    kwargs = {}
    if diffusion_cfg.schedule in ("linear", "scaled_linear", "sigmoid"):
        kwargs = dict(beta_start=diffusion_cfg.beta_start, beta_end=diffusion_cfg.beta_end)
    betas = get_beta_schedule(diffusion_cfg.schedule, diffusion_cfg.num_timesteps, **kwargs)
    return make_schedule(betas)


def extract(arr, t, ndim):
    """Gathers ``arr[t]`` and reshapes it to broadcast against a batch of rank ``ndim``.

    Args:
        arr: ``[T]`` per-step array.
        t: ``[B]`` integer timesteps (a scalar gives shape ``[1, ..., 1]``).
        ndim: rank of the array to broadcast against, e.g. 4 for ``[B, H, W, C]``.

    Returns:
        ``[B, 1, ..., 1]`` with ``ndim`` dimensions in total.

    Raises:
        ValueError: ``t`` is not an integer array of rank <= 1 (checked at trace time), or,
            when ``t``'s values are known (outside ``jax.jit``), some ``t`` is outside
            ``[0, T)``. Under ``jax.jit`` the values are not checked and follow JAX's
            indexing rules: ``t >= T`` reads ``arr[T - 1]``, ``-T <= t < 0`` reads
            ``arr[T + t]`` and ``t < -T`` reads ``arr[0]``.
    """
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer) or t.ndim > 1:
        raise ValueError(f"t must be integer timesteps of shape [B] or [], got {t.dtype} "
                         f"{t.shape}.")
    if not isinstance(t, jax.core.Tracer) and t.size:
        values = np.asarray(t)
        if values.min() < 0 or values.max() >= arr.shape[0]:
            raise ValueError(f"timesteps t must lie in [0, T={arr.shape[0]}), got values in "
                             f"[{values.min()}, {values.max()}].")
    return jnp.reshape(arr[t], (-1,) + (1,) * (ndim - 1))


def _check_num_timesteps(num_timesteps):
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")


def _check_beta_range(beta_start, beta_end):
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(
                f"beta_start and beta_end must lie in (0, 1), got beta_start={beta_start}, "
                f"beta_end={beta_end}.")
    if beta_end < beta_start:
        raise ValueError(f"beta_end={beta_end} must be >= beta_start={beta_start} (noise grows "
                         f"with t).")


def _to_f32(x):
    return jnp.asarray(x, dtype=jnp.float32)
