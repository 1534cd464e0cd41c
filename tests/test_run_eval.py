"""run_eval.py as a user runs it: a subprocess on an npz of samples, JSON on stdout."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import digits_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_eval(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "run_eval.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_digits_metric_on_real_digits_reports_high_confidence(tmp_path):
    # "Samples" = the held-out real digits at 16x16, as uint8 like run_sample.py writes them.
    _, _, test_x, test_y = digits_classifier.load_digits_halves(0, image_size=16)
    images = np.round((test_x + 1.0) * 127.5).astype(np.uint8)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images, labels=test_y)
    out = tmp_path / "eval" / "digits.json"
    proc = _run_eval(f"--samples={samples}", "--metric=digits", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["metric"] == "digits" and result["num_samples"] == images.shape[0]
    # The samples are the held-out real digits, up to uint8 rounding: they score like the
    # real-vs-real reference.
    heldout = result["reference"]["heldout_vs_train"]
    assert result["confidence_share"] >= 0.75
    assert result["confidence_share"] == pytest.approx(heldout["confidence_share"], abs=0.02)
    assert result["digit_fd"] == pytest.approx(heldout["digit_fd"], rel=0.1)
    assert result["label_accuracy"] >= 0.94


def test_fid_without_weights_is_a_usage_error(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((2, 8, 8, 3), np.uint8))
    proc = _run_eval(f"--samples={samples}", "--metric=fid")
    assert proc.returncode != 0
    assert "--inception_weights" in proc.stderr
    # ... and says which file and where to get it
    assert ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth") in proc.stderr


def test_corrupt_samples_file_is_a_one_line_error(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((50, 8, 8, 1), np.uint8))
    with open(samples, "r+b") as f:
        f.truncate(os.path.getsize(samples) // 2)
    proc = _run_eval(f"--samples={samples}", "--metric=digits")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"FATAL ValueError: --samples file '{samples}' is not a readable .npz")
    assert "Traceback" not in proc.stderr


def test_ode_methods_and_fashion_path_come_from_the_library():
    """run_eval.py repeats neither the ODE solver list nor the Fashion-MNIST path: a solver
    added to ``sde.ode.METHODS`` and a moved ``idx.FASHION_DIR`` reach its flags."""
    probe = (
        "import json, runpy; from absl import flags\n"
        "from diffusion_jax import idx\n"
        "from diffusion_jax.sde import ode\n"
        "ode.METHODS = ode.METHODS + ('new_solver',); idx.FASHION_DIR = '/elsewhere'\n"
        "runpy.run_path('run_eval.py', run_name='probe')\n"
        "print(json.dumps([flags.FLAGS['ode_method'].parser.enum_values, "
        "flags.FLAGS['fashion_dir'].default]))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods, fashion_dir = json.loads(proc.stdout.strip().splitlines()[-1])
    assert methods == ["euler", "heun", "rk4", "tsit5", "dopri5", "new_solver"]
    assert fashion_dir == "/elsewhere"
