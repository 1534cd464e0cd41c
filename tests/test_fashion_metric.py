"""Fashion faithfulness + FD: the classifier against sklearn, real images beat degraded ones.

CI has no Fashion-MNIST, so the tests write IDX files of a synthetic 10-class image set (class
templates of smoothed noise, per-image contrast and pixel noise); the real data set is scored
too when Debian's ``dataset-fashion-mnist`` is installed.
"""
import gzip
import os
import struct

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from diffusion_jax import fashion_metric as fm
from diffusion_jax import idx


def _write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + array.tobytes(), mtime=0))


def _synthetic(n, seed):
    rng = np.random.default_rng(seed)
    templates = gaussian_filter(np.random.default_rng(99).normal(size=(10, 28, 28)),
                                sigma=(0, 2.5, 2.5))
    templates = templates / np.abs(templates).max(axis=(1, 2), keepdims=True)
    labels = np.arange(n) % 10
    contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1))
    images = 128 + 100 * contrast * templates[labels] + rng.normal(0, 25, size=(n, 28, 28))
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    for stem, n, seed in (("train", 2000, 0), ("t10k", 500, 1)):
        images, labels = _synthetic(n, seed)
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return str(root)


def test_ridge_classifier_matches_sklearn_ridge(folder):
    from sklearn.linear_model import Ridge

    x, y = _synthetic(400, 5)
    clf = fm.fit_fashion_classifier(x, y)
    inputs = fm.to_inputs(x)
    ref = Ridge(alpha=fm.RIDGE, fit_intercept=False).fit(
        np.concatenate([inputs, np.ones((400, 1))], axis=1), 2.0 * np.eye(10)[y] - 1.0)
    np.testing.assert_allclose(clf.logits(inputs), ref.predict(
        np.concatenate([inputs, np.ones((400, 1))], axis=1)), atol=1e-8)
    # the PCA basis is orthonormal and ordered by explained variance
    np.testing.assert_allclose(clf.components.T @ clf.components, np.eye(fm.PCA_DIM), atol=1e-8)
    var = np.var((inputs - clf.mean) @ clf.components, axis=0)
    assert np.all(np.diff(var) <= 1e-9)


def test_real_images_beat_noise_blur_and_collapse(folder):
    metric = fm.FashionMetric(folder)
    ref = metric.reference()
    assert ref["reference_accuracy"] > 0.9
    for name, images in fm.degraded(metric.test_x).items():
        got = metric(images, metric.test_y)
        assert got["fashion_fd"] > 3 * ref["fashion_fd"] + 1.0, name
        if name != "blur":  # blurring keeps the class of smooth synthetic templates
            assert got["faithfulness"] < 0.5 * ref["reference_accuracy"], name
    # float images in [-1, 1] at 32x32 (the t2i training resolution) score like the uint8 ones
    up = np.stack([fm._resize(im[..., None], 32) for im in metric.test_x])
    as_float = up[..., None].astype(np.float32) / 127.5 - 1.0
    got = metric(as_float, metric.test_y)
    ref32 = metric.reference(32)
    assert got["faithfulness"] == pytest.approx(ref32["reference_accuracy"])
    assert got["fashion_fd"] == pytest.approx(ref32["fashion_fd"], rel=1e-6)


def test_faithfulness_counts_prompted_class(folder):
    metric = fm.FashionMetric(folder)
    images = metric.test_x[:100]
    pred = np.asarray(metric(images)["class_histogram"])
    assert pred.sum() == 100
    wrong = (metric.test_y[:100] + 1) % 10
    assert metric(images, wrong)["faithfulness"] < 0.1
    # Per class: the prompted class's share, matching a hand count; absent classes are None.
    labels = metric.test_y[:100].copy()
    pred = metric.classifier.features(fm.to_inputs(images))[:, -10:].argmax(1)
    labels[labels == 3] = 4
    got = metric(images, labels)
    for k in range(10):
        expect = None if k == 3 else float(np.mean(pred[labels == k] == k))
        assert got["faithfulness_by_class"][k] == expect, k
    assert got["faithfulness"] == pytest.approx(np.mean(pred == labels))
    with pytest.raises(ValueError, match="labels"):
        metric(images, np.full(100, 10))
    with pytest.raises(ValueError, match="images"):
        fm.to_inputs(np.zeros((2, 28, 27, 1), np.uint8))


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        fm.FashionMetric(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(idx.FASHION_DIR), reason="dataset-fashion-mnist absent")
def test_on_real_fashion_mnist():
    metric = fm.FashionMetric(max_test=2000)
    ref = metric.reference()
    assert 0.78 < ref["reference_accuracy"] < 0.86
    for name, images in fm.degraded(metric.test_x).items():
        got = metric(images, metric.test_y)
        assert got["fashion_fd"] > 10 * ref["fashion_fd"], name
        assert got["faithfulness"] < ref["reference_accuracy"] - 0.1, name


def _run_eval(*args):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(repo, "run_eval.py"), *args],
                          capture_output=True, text=True, cwd=repo, timeout=300)


def test_run_eval_fashion_and_clip_score_flags(folder, tmp_path):
    import json

    metric = fm.FashionMetric(folder)
    up = np.stack([fm._resize(im[..., None], 32) for im in metric.test_x])[..., None]
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=up, labels=metric.test_y.astype(np.int32))
    proc = _run_eval(f"--samples={samples}", "--metric=fashion", f"--fashion_dir={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    # real test images as samples score exactly like the reference at their side
    assert result["faithfulness"] == pytest.approx(result["reference"]["reference_accuracy"])
    assert result["fashion_fd"] == pytest.approx(result["reference"]["fashion_fd"], rel=1e-6)
    proc = _run_eval(f"--samples={samples}", "--metric=clip_score")
    assert proc.returncode != 0 and "--clip_workdir" in proc.stderr
    proc = _run_eval(f"--samples={samples}", "--metric=fashion", f"--fashion_dir={tmp_path}")
    assert proc.returncode == 1 and "FileNotFoundError" in proc.stderr
