"""diffusion_jax: diffusion models in JAX / Flax NNX.

Import the pieces you need, e.g. ``from diffusion_jax import schedules, samplers``;
importing the package itself loads nothing heavy.
"""

__version__ = "0.1.0"
