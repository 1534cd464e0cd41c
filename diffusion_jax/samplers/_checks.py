"""Argument checks shared by the samplers' options and functions; each error names the field."""
import jax.numpy as jnp

from diffusion_jax.sde._util import check_choice


def one_of(choices):
    """A check that the value is one of ``choices``."""
    return lambda field, value: check_choice(field, value, choices)


def optional(check):
    """``check`` for any value but ``None``."""
    return lambda field, value: None if value is None else check(field, value)


def check_positive(field, value):
    """``value > 0`` (checked for Python numbers only: a traced value passes)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{field} must be > 0, got {value}.")


def check_non_negative(field, value):
    """``value >= 0`` (Python numbers only)."""
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"{field} must be >= 0, got {value}.")


def check_positive_int(field, value):
    """``value`` an integer ``>= 1``."""
    if int(value) != value or value < 1:
        raise ValueError(f"{field} must be an integer >= 1, got {value!r}.")


def check_eta(field, value):
    """DDIM's ``eta`` in ``[0, 1]`` (Python numbers only)."""
    if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{field} must lie in [0, 1], got {value}.")


def check_t_start(t_start, num_timesteps):
    """Returns the first timestep, ``T - 1`` or a validated ``t_start``."""
    if t_start is None:
        return num_timesteps - 1
    if int(t_start) != t_start or not 0 <= t_start <= num_timesteps - 1:
        raise ValueError(
            f"t_start must be a static integer in [0, {num_timesteps - 1}], got {t_start!r}.")
    return int(t_start)


def check_x(x, field):
    """Raise ``ValueError`` unless ``x`` is a floating array ``[B, ...]`` (rank >= 1)."""
    dtype, ndim = getattr(x, "dtype", None), getattr(x, "ndim", 0)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or ndim < 1:
        raise ValueError(f"{field} must be a floating-point array [B, ...], got "
                         f"{dtype} with shape {getattr(x, 'shape', ())}.")


def call_denoiser(denoise, x, t):
    """``denoise(x, t)``, checked at trace time (static, so free under jit) to return ``x``'s
    shape: a wrong batch or rank would otherwise broadcast silently."""
    pred = denoise(x, t)
    if getattr(pred, "shape", None) != x.shape:
        raise ValueError(f"The denoiser returned shape {getattr(pred, 'shape', type(pred))} for x "
                         f"of shape {x.shape}; it must return a prediction of x's shape.")
    return pred
