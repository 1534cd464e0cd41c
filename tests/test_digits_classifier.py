"""The offline digits metric: classifier accuracy, digit-FD scale, confidence statistics."""
import os

import numpy as np
import pytest

from diffusion_jax import digits_classifier as dc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits_cache"))


@pytest.fixture(scope="module")
def metric(cache_dir):
    return dc.DigitsMetric(seed=0, cache_dir=cache_dir)


def test_classifier_accuracy_on_held_out_digits(metric):
    _, _, test_x, test_y = metric.halves(8)
    assert metric.accuracy(test_x, test_y) >= 0.9


def test_data_vs_data_fd_is_far_below_data_vs_noise(metric):
    reference = metric.reference(8)
    real = reference["train_vs_test"]
    noise = np.random.default_rng(0).uniform(-1, 1, size=(899, 8, 8, 1))
    noisy = metric(noise)
    assert real["digit_fd"] < 0.05 * noisy["digit_fd"]
    assert real["confidence_share"] >= 0.9 and reference["test_half"]["confidence_share"] >= 0.9
    assert noisy["confidence_share"] < 0.6
    # Real digits spread evenly over the 10 classes.
    assert real["class_entropy"] == pytest.approx(np.log(10.0), abs=0.01)
    assert reference["classifier_test_accuracy"] >= 0.9


def test_a_single_digit_class_is_detected(metric):
    _, _, test_x, test_y = metric.halves(8)
    zeros = metric(test_x[test_y == 0])
    assert zeros["class_entropy"] < 0.1
    assert zeros["class_histogram"][0] > 0.97
    assert zeros["digit_fd"] > 20 * metric.reference(8)["train_vs_test"]["digit_fd"]


def test_larger_images_are_compared_at_their_own_size(metric):
    # The 16x16 halves come from the data pipeline (bilinear upsampling); area-averaged back
    # to 8x8 they are still recognised, and data-vs-data FD stays small at that size.
    _, _, test16, test_y = metric.halves(16)
    assert test16.shape[1:] == (16, 16, 1)
    assert metric.accuracy(test16, test_y) >= 0.9
    assert metric.reference(16)["train_vs_test"]["digit_fd"] < 5.0


def test_to_digit_inputs_undoes_nearest_upsampling():
    x = np.random.default_rng(1).uniform(-1, 1, size=(3, 8, 8, 1)).astype(np.float32)
    up = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
    rgb = np.repeat(up, 3, axis=-1)
    np.testing.assert_allclose(dc.to_digit_inputs(rgb), x.reshape(3, 64), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        dc.to_digit_inputs(np.zeros((1, 12, 12, 1)))


def test_confidence_statistics_by_hand():
    probs = np.array([[0.95, 0.05, 0.0], [0.2, 0.8, 0.0], [0.0, 0.05, 0.95], [0.1, 0.0, 0.9]])
    stats = dc.confidence_statistics(probs)
    assert stats["confidence_share"] == pytest.approx(0.75)
    assert stats["mean_max_prob"] == pytest.approx((0.95 + 0.8 + 0.95 + 0.9) / 4)
    assert stats["class_histogram"] == pytest.approx([0.25, 0.25, 0.5])
    assert stats["class_entropy"] == pytest.approx(-2 * 0.25 * np.log(0.25) - 0.5 * np.log(0.5))


def test_cached_classifier_is_saved_and_read_back(metric, cache_dir, tmp_path):
    (name,) = os.listdir(cache_dir)
    with np.load(os.path.join(cache_dir, name)) as data:
        params = dict(data)
    params["head/bias"] = params["head/bias"] + 100.0 * np.eye(dc.NUM_CLASSES)[3]
    np.savez(tmp_path / name, **params)
    tampered = dc.DigitsMetric(seed=0, cache_dir=str(tmp_path))
    x = metric.halves(8)[2][:50]
    feats, _ = metric.features_and_probs(x)
    feats2, probs2 = tampered.features_and_probs(x)
    np.testing.assert_array_equal(feats, feats2)
    assert np.all(probs2.argmax(-1) == 3)  # the edited file, not a retrained model, was used


def test_corrupt_cache_is_reported_and_replaced(metric, cache_dir, tmp_path, capsys):
    (name,) = os.listdir(cache_dir)
    corrupt = tmp_path / name
    with open(os.path.join(cache_dir, name), "rb") as f:
        corrupt.write_bytes(f.read()[:200])  # a truncated copy
    rebuilt = dc.DigitsMetric(seed=0, cache_dir=str(tmp_path))
    x = metric.halves(8)[2][:50]
    np.testing.assert_allclose(rebuilt.features_and_probs(x)[0], metric.features_and_probs(x)[0],
                               rtol=1e-5, atol=1e-6)  # retrained with the same seed
    assert f"classifier cache '{corrupt}' is unreadable" in capsys.readouterr().err
    with np.load(corrupt) as data:  # rewritten with the retrained parameters
        assert "head/bias" in data.files
