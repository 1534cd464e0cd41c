"""Shared set-up of the training-system tests (test_sharding, test_train, test_checkpoint, test_cli).

* puts the repository root on ``sys.path`` (``configs`` is a top-level package there);
* turns on jax's persistent compilation cache in one temp directory, so a train step
  compiled by one test (or subprocess) is loaded, not recompiled, by the next;
* `micro_config`: tiny.py (a one-level UNet that compiles in seconds) on a chosen mesh.
"""

import os
import sys
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "diffusion_jax_test_jax_cache")
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top


def micro_config(data_axis: int = -1, fsdp: int = 1):
    """tiny.py on the mesh ``data_axis x fsdp`` (the default: all 8 devices data-parallel,
    the same program run_train.py compiles in test_cli.py)."""
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp = data_axis, fsdp
    return config


def subprocess_env() -> dict:
    """Environment for ``run_train.py`` / ``run_sample.py`` subprocesses: same fake devices
    (XLA_FLAGS from conftest.py) and the shared compilation cache."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    return env
