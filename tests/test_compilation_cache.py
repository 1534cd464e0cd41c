"""Persistent compilation cache: a second run_sample.py with the same shapes compiles nothing."""

import os
import subprocess
import sys

import jax
import pytest

from training_fixtures import REPO, subprocess_env
from diffusion_jax import compilation_cache


def _run(script, *args, env):
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _entries(cache_dir):
    return set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train")
    _run("run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.train.num_steps=2", env=subprocess_env())
    return workdir


@pytest.mark.slow
def test_second_sample_run_loads_every_program_from_the_cache(trained_workdir, tmp_path):
    cache = tmp_path / "cache"
    env = subprocess_env()
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache every program, however small
    args = [f"--workdir={trained_workdir}", "--sampler=ddim", "--steps=3", "--num_samples=8",
            f"--compilation_cache_dir={cache}"]
    _run("run_sample.py", *args, f"--out={tmp_path}/a", env=env)
    first = _entries(cache)
    assert any(name.startswith("jit_") for name in first), first  # the sampling chain was written
    _run("run_sample.py", *args, f"--out={tmp_path}/b", env=env)
    assert _entries(cache) == first  # every program of the second run was a cache hit
    # A different shape is a different program: the cache grows.
    _run("run_sample.py", *args[:-2], "--num_samples=16", f"--compilation_cache_dir={cache}",
         f"--out={tmp_path}/c", env=env)
    assert _entries(cache) > first


@pytest.mark.slow
def test_empty_cache_dir_turns_the_cache_off(trained_workdir, tmp_path):
    env = subprocess_env()
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env[compilation_cache.ENV_VAR] = str(tmp_path / "default_cache")
    _run("run_sample.py", f"--workdir={trained_workdir}", "--sampler=ddim", "--steps=3",
         "--num_samples=8", "--compilation_cache_dir=", f"--out={tmp_path}/a", env=env)
    assert not _entries(tmp_path / "default_cache")


def test_enable_resolves_directories(tmp_path, monkeypatch):
    saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / "from_env"))
        assert compilation_cache.enable(None) == str(tmp_path / "from_env")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "from_env")
        assert os.path.isdir(tmp_path / "from_env")
        assert compilation_cache.enable(str(tmp_path / "flag")) == str(tmp_path / "flag")
        assert compilation_cache.enable("") is None
        assert not jax.config.jax_enable_compilation_cache
        (tmp_path / "file").write_text("x")
        with pytest.raises(ValueError, match="not a directory"):
            compilation_cache.enable(str(tmp_path / "file"))
    finally:
        jax.config.update("jax_enable_compilation_cache", saved[0])
        jax.config.update("jax_compilation_cache_dir", saved[1])
