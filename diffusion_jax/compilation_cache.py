"""JAX's persistent compilation cache: compiled XLA programs kept on disk between runs.

A second ``run_sample.py`` / ``run_train.py`` / ``run_eval.py`` with the same shapes, config
and jax version loads the compiled executable from the cache instead of compiling again (the
cache key hashes the HLO, the compile options, the backend and the jax/XLA versions, so a
changed program simply misses). Works on CPU as well as GPU/TPU with jax >= 0.4.30.

Only programs whose compilation took at least ``jax_persistent_cache_min_compile_time_secs``
(jax's default 1 s; settable through the environment variable of the same name in upper case)
are written, so the many tiny eager-op programs do not fill the directory.
"""

import os

import jax

ENV_VAR = "DIFFUSION_JAX_CACHE"
FLAG_HELP = (
    "Directory of JAX's persistent compilation cache (compiled programs reused by later runs "
    f"with the same shapes). Default: ${ENV_VAR}, else $JAX_COMPILATION_CACHE_DIR, else "
    "~/.cache/diffusion_jax/jax_cache; "
    "'' turns the cache off.")


def default_dir() -> str:
    """``$DIFFUSION_JAX_CACHE`` if set, else a directory already given to jax (e.g. by its own
    ``JAX_COMPILATION_CACHE_DIR`` variable), else ``~/.cache/diffusion_jax/jax_cache``."""
    return (os.environ.get(ENV_VAR) or jax.config.jax_compilation_cache_dir
            or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "jax_cache"))


def enable(cache_dir: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``cache_dir``; call before compiling.

    Args:
        cache_dir: the cache directory (created if missing); ``None`` means `default_dir()`;
            ``""`` disables the persistent cache for this process.

    Returns:
        The directory in use, or ``None`` when disabled.

    Raises:
        ValueError: ``cache_dir`` exists and is not a directory.
    """
    if cache_dir == "":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_dir()))
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"compilation_cache_dir={cache_dir!r} exists and is not a directory.")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    return cache_dir
