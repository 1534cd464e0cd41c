"""Small helpers shared by the modules of :mod:`diffusion_jax.sde` (shapes, argument checks)."""
import jax.numpy as jnp


def per_example(v, batch):
    """A scalar or ``B`` values (any shape with ``B`` entries) as float32 ``[B]``."""
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(v, jnp.float32), (-1,)), (batch,))


def expand(v, ndim):
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dimensions, to broadcast against ``[B, ...]``."""
    return jnp.reshape(v, (-1,) + (1,) * (ndim - 1))


def sum_over_non_batch(x):
    """``[B, ...]`` -> ``[B]``."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def check_choice(field, value, choices):
    """Raises ``ValueError`` naming ``field`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Unknown {field} {value!r}; expected one of {list(choices)}.")
