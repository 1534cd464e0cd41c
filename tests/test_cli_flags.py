"""diffusion_jax/cli/flags.py: the shared flags and the one preamble of every entry point."""
import os
import subprocess
import sys

import pytest
from absl import flags as absl_flags

from diffusion_jax.cli import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("prog, expected", [
    (None, "FATAL ValueError: first; second"),
    ("run_sample.py", "run_sample.py: error: first; second")])
def test_error_line_is_one_line(prog, expected):
    assert flags.error_line(ValueError("first\n  second\n"), prog) == expected


def test_shared_flags_have_one_name_and_default():
    fv = absl_flags.FlagValues()
    for define in (flags.define_workdir, flags.define_checkpoint, flags.define_step,
                   flags.define_out, flags.define_seed, flags.define_steps, flags.define_sampler,
                   flags.define_compilation_cache):
        define(flag_values=fv)
    fv(["prog", "--workdir", "W", "--steps=3", "--sampler", "ddim"])
    assert (fv.workdir, fv.checkpoint, fv.step, fv.out, fv.seed, fv.steps, fv.sampler) == (
        "W", None, None, None, 0, 3, "ddim")
    with pytest.raises(absl_flags.IllegalFlagValueError):
        fv(["prog", "--sampler=not_a_sampler"])


@pytest.mark.parametrize("script, args, needle", [
    # A bad --config.* key of run_sample.py (it used to end in a traceback).
    ("run_sample.py", ["--checkpoint=.", "--out=unused", "--config.diffusion.num_timestepz=3"],
     "FATAL Flags parsing error: unknown config field 'num_timestepz'"),
    # --compilation_cache_dir naming a file (every entry point enables the cache the same way).
    ("run_eval.py", ["--samples=none.npz", "--compilation_cache_dir=README.md"],
     "FATAL ValueError: compilation_cache_dir="),
    ("run_train.py", ["--config=configs/tiny.py", "--workdir=unused",
                      "--compilation_cache_dir=README.md"],
     "FATAL ValueError: compilation_cache_dir="),
    ("run_sample.py", ["--workdir=unused", "--out=unused", "positional"], "Unexpected arguments"),
])
def test_entry_points_end_bad_input_with_one_line(script, args, needle):
    proc = _run(script, *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not os.path.exists(os.path.join(REPO, "unused"))
