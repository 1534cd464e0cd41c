"""Forward process, its posterior, and conversions between prediction targets.

With ``a = sqrt(alpha_bar_t)`` and ``b = sqrt(1 - alpha_bar_t)`` (so ``a^2 + b^2 = 1``):

    x_t   = a x_0 + b eps                       (forward sample)
    v     = a eps - b x_0                       (velocity, Salimans & Ho 2022)
    score = grad_{x_t} log q(x_t | x_0) = -eps / b

so ``x_0 = a x_t - b v`` and ``eps = b x_t + a v``. Arrays are ``[B, ...]`` (images
``[B, H, W, C]``); ``t`` is int ``[B]``; ``alpha_bar`` arguments broadcast against ``x``
(e.g. ``[B, 1, 1, 1]``).
"""
import jax.numpy as jnp

from diffusion_jax.schedules import extract

PRED_TYPES = ("eps", "x0", "v", "score")


def q_sample(sched, x0, t, noise):
    """Samples ``x_t ~ q(x_t | x_0)``.

    ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise``.

    Args:
        sched: a :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` clean data.
        t: ``[B]`` int timesteps.
        noise: ``[B, ...]`` standard normal noise.

    Returns:
        x_t: ``[B, ...]``.

    Raises:
        ValueError: ``x0`` and ``noise`` differ in shape or are not floating point, or ``t``
            is not integer ``[B]`` / ``[]`` (trace-time checks); ``t`` outside ``[0, T)`` when
            its values are known (see `schedules.extract` for what happens under ``jit``).
    """
    _check_batch_args(x0, noise, t)
    return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_mean_variance(sched, x0, t):
    """Mean and variance of ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``.

    Args:
        sched: a :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` clean data.
        t: ``[B]`` int timesteps.

    Returns:
        ``(mean [B, ...], var [B, 1, ..., 1], log_var [B, 1, ..., 1])``.
    """
    mean = extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
    var = extract(jnp.square(sched.sqrt_one_minus_alphas_cumprod), t, x0.ndim)
    return mean, var, jnp.log(var)


def q_posterior(sched, x0, x_t, t):
    """Gaussian posterior ``q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)``.

    ``mu~_t = coef1_t x_0 + coef2_t x_t`` with
    ``coef1_t = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t)``,
    ``coef2_t = (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)`` and
    ``beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``. At ``t = 0`` the mean is ``x_0``
    and the variance 0; the returned log-variance is clipped there to ``log beta~_1``.

    Args:
        sched: a :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, ...]`` clean data (or a prediction of it).
        x_t: ``[B, ...]`` noisy data at step ``t``.
        t: ``[B]`` int timesteps.

    Returns:
        ``(mean [B, ...], var [B, 1, ..., 1], log_var_clipped [B, 1, ..., 1])``.
    """
    nd = x_t.ndim
    mean = (extract(sched.posterior_mean_coef1, t, nd) * x0
            + extract(sched.posterior_mean_coef2, t, nd) * x_t)
    return (mean, extract(sched.posterior_variance, t, nd),
            extract(sched.posterior_log_variance_clipped, t, nd))


def to_x0_and_eps(pred, x_t, alpha_bar, pred_type):
    """Converts a model prediction of ``pred_type`` into ``(x_0, eps)`` given ``x_t``.

    Args:
        pred: ``[B, ...]`` prediction of ``eps``, ``x0``, ``v`` or ``score``.
        x_t: ``[B, ...]`` noisy input the prediction was made from.
        alpha_bar: ``alpha_bar_t`` broadcastable to ``x_t``, e.g. ``[B, 1, 1, 1]``.
        pred_type: one of ``eps``, ``x0``, ``v``, ``score``.

    Returns:
        ``(x0 [B, ...], eps [B, ...])`` with ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``.

    Raises:
        ValueError: if ``pred_type`` is unknown.
    """
    _check_pred_type(pred_type)
    if pred_type == "eps":
        return x0_from_eps(x_t, pred, alpha_bar), pred
    if pred_type == "x0":
        return pred, eps_from_x0(x_t, pred, alpha_bar)
    if pred_type == "v":
        return x0_from_v(x_t, pred, alpha_bar), eps_from_v(x_t, pred, alpha_bar)
    eps = eps_from_score(pred, alpha_bar)
    return x0_from_eps(x_t, eps, alpha_bar), eps


def from_x0_and_eps(x0, eps, alpha_bar, pred_type):
    """The regression target of ``pred_type`` for the pair ``(x_0, eps)``.

    ``eps -> eps``, ``x0 -> x_0``, ``v -> sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0``,
    ``score -> -eps / sqrt(1 - alpha_bar)``.

    Args:
        x0: ``[B, ...]`` clean data.
        eps: ``[B, ...]`` the noise that made ``x_t``.
        alpha_bar: ``alpha_bar_t`` broadcastable to ``x0``.
        pred_type: one of ``eps``, ``x0``, ``v``, ``score``.

    Returns:
        ``[B, ...]`` target.

    Raises:
        ValueError: if ``pred_type`` is unknown.
    """
    _check_pred_type(pred_type)
    if pred_type == "eps":
        return eps
    if pred_type == "x0":
        return x0
    if pred_type == "v":
        return v_from_x0_eps(x0, eps, alpha_bar)
    return score_from_eps(eps, alpha_bar)


def x0_from_eps(x_t, eps, alpha_bar):
    """``x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``; shapes as ``x_t``."""
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def eps_from_x0(x_t, x0, alpha_bar):
    """``eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)``; shapes as ``x_t``."""
    return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_from_x0_eps(x0, eps, alpha_bar):
    """``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0``; shapes as ``x0``."""
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(x_t, v, alpha_bar):
    """``x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v``; shapes as ``x_t``."""
    return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def eps_from_v(x_t, v, alpha_bar):
    """``eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v``; shapes as ``x_t``."""
    return jnp.sqrt(1.0 - alpha_bar) * x_t + jnp.sqrt(alpha_bar) * v


def score_from_eps(eps, alpha_bar):
    """``score = grad log q(x_t | x_0) = -eps / sqrt(1 - alpha_bar)``; shapes as ``eps``."""
    return -eps / jnp.sqrt(1.0 - alpha_bar)


def eps_from_score(score, alpha_bar):
    """``eps = -sqrt(1 - alpha_bar) score``; shapes as ``score``."""
    return -jnp.sqrt(1.0 - alpha_bar) * score


def _check_pred_type(pred_type):
    if pred_type not in PRED_TYPES:
        raise ValueError(f"Unknown pred_type {pred_type!r}; expected one of {PRED_TYPES}.")


def _check_batch_args(x0, noise, t):
    """Static (trace-time) checks of q_sample's shapes and dtypes."""
    x0, noise, t = jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)
    if x0.ndim < 1 or x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape [B, ...], got {x0.shape} and "
                         f"{noise.shape}.")
    if not (jnp.issubdtype(x0.dtype, jnp.floating) and jnp.issubdtype(noise.dtype, jnp.floating)):
        raise ValueError(f"x0 and noise must be floating point, got {x0.dtype} and {noise.dtype}.")
    if t.ndim == 1 and t.shape[0] not in (1, x0.shape[0]):
        raise ValueError(f"t has {t.shape[0]} timesteps for a batch of {x0.shape[0]}.")
