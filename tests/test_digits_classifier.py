"""The offline digits metric: calibration, typicality, and that poor samples score clearly worse."""
import numpy as np
import pytest

from diffusion_jax import digits_classifier as dc


@pytest.fixture(scope="module")
def metric():
    return dc.DigitsMetric(seed=0)


@pytest.fixture(scope="module")
def real(metric):
    """Scores of the real held-out half against the train half (the best a model can do)."""
    return metric.reference(8)["heldout_vs_train"]


@pytest.fixture(scope="module")
def degraded(metric):
    return dc.degraded_digits(metric, seed=0)


def test_degraded_digits_are_what_they_say(metric, degraded):
    train_x, train_y, test_x, test_y = metric.halves(8)
    for k in (0, 5):
        np.testing.assert_allclose(degraded["class_means"][test_y == k],
                                   np.broadcast_to(train_x[train_y == k].mean(0),
                                                   ((test_y == k).sum(), 8, 8, 1)), rtol=1e-6)
    changed = degraded["stroke"] != test_x
    assert changed.reshape(len(test_x), -1).sum(1).max() <= 4
    assert np.all(degraded["stroke"][changed] == 1.0)
    # Blur lowers the mean squared difference between neighbouring pixels.
    def roughness(x):
        return np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2)
    assert roughness(degraded["blurred"]) < 0.6 * roughness(test_x)
    assert degraded["noise"].min() >= -1.0 and degraded["noise"].max() <= 1.0


def test_classifier_accuracy_and_calibration_on_held_out_digits(metric):
    _, _, test_x, test_y = metric.halves(8)
    _, probs, typical = metric.features_and_probs(test_x)
    correct = probs.argmax(-1) == test_y
    max_prob = probs.max(-1)
    assert correct.mean() >= 0.94
    # Calibrated: mean confidence matches accuracy, and so it does within confidence bins (ECE).
    assert abs(max_prob.mean() - correct.mean()) < 0.03
    bins = np.minimum((max_prob * 10).astype(int), 9)
    ece = sum(abs(correct[bins == b].mean() - max_prob[bins == b].mean()) * np.mean(bins == b)
              for b in np.unique(bins))
    assert ece < 0.04
    # The typical range holds the central 98 % of held-out calibration distances.
    assert 0.95 <= typical.mean() <= 1.0


@pytest.mark.parametrize("name", ["blurred", "class_means", "noise", "stroke"])
def test_degraded_digits_score_clearly_worse_than_real(metric, real, degraded, name):
    scores = metric(degraded[name])
    assert scores["confidence_share"] <= real["confidence_share"] - 0.15
    assert scores["digit_fd"] >= 5.0 * real["digit_fd"]


def test_real_held_out_digits_score_best(metric, real, degraded):
    assert real["confidence_share"] >= 0.75 and real["typical_share"] >= 0.95
    assert real["digit_fd"] < 1.5
    assert real["class_entropy"] == pytest.approx(np.log(10.0), abs=0.01)
    others = [metric(images) for images in degraded.values()]
    assert real["confidence_share"] > max(o["confidence_share"] for o in others)
    assert real["digit_fd"] < min(o["digit_fd"] for o in others)


def test_mode_collapse_is_caught_by_typicality_not_by_the_classifier(metric, degraded):
    # Class means are the most confidently classified images there are; only the typicality
    # test (distance to the class mean far below that of real digits) rejects them.
    scores = metric(degraded["class_means"])
    assert scores["classifier_confidence_share"] > 0.99
    assert scores["typical_share"] < 0.02


def test_a_single_digit_class_is_detected(metric, real):
    _, _, test_x, test_y = metric.halves(8)
    zeros = metric(test_x[test_y == 0])
    assert zeros["class_entropy"] < 0.1
    assert zeros["class_histogram"][0] > 0.97
    assert zeros["digit_fd"] > 20 * real["digit_fd"]


def test_larger_images_are_compared_at_their_own_size(metric):
    # 16x16 halves come from the data pipeline (bilinear upsampling); the classifier for that
    # size is fit on them area-averaged back to 8x8, so real digits score as well as at 8x8.
    _, _, test16, test_y = metric.halves(16)
    assert test16.shape[1:] == (16, 16, 1)
    reference = metric.reference(16)
    assert reference["classifier_test_accuracy"] >= 0.94
    assert reference["heldout_vs_train"]["confidence_share"] >= 0.75
    assert reference["heldout_vs_train"]["digit_fd"] < 1.5
    assert metric.classifier(16) is not metric.classifier(8)
    assert metric.classifier(16) is dc.DigitsMetric(seed=0).classifier(16)  # cached in memory


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_the_generating_temperature(true_t):
    # Labels drawn from softmax(z / T0): the maximum-likelihood temperature is T0 up to
    # sampling error (about 3 % at N = 4000).
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.normal(size=(4000, 5))
    z = logits / true_t
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = (probs.cumsum(-1) > rng.uniform(size=(4000, 1))).argmax(-1)
    assert dc.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)


def test_mahalanobis_by_hand(metric):
    clf = metric.classifier(8)
    x = np.random.default_rng(2).normal(size=(3, 64))
    labels = np.array([0, 4, 9])
    expected = [(x[i] - clf.class_means[k]) @ clf.precision @ (x[i] - clf.class_means[k])
                for i, k in enumerate(labels)]
    np.testing.assert_allclose(clf.mahalanobis_sq(x, labels), expected, rtol=1e-12)
    np.testing.assert_allclose(clf.probs(x).sum(-1), 1.0, rtol=1e-12)


def test_to_digit_inputs_undoes_nearest_upsampling():
    x = np.random.default_rng(1).uniform(-1, 1, size=(3, 8, 8, 1)).astype(np.float32)
    up = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
    rgb = np.repeat(up, 3, axis=-1)
    np.testing.assert_allclose(dc.to_digit_inputs(rgb), x.reshape(3, 64), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        dc.to_digit_inputs(np.zeros((1, 12, 12, 1)))


def test_confidence_statistics_by_hand():
    probs = np.array([[0.95, 0.05, 0.0], [0.2, 0.8, 0.0], [0.0, 0.05, 0.95], [0.1, 0.0, 0.9]])
    typical = np.array([True, True, False, True])
    stats = dc.confidence_statistics(probs, typical)
    assert stats["confidence_share"] == pytest.approx(0.5)
    assert stats["classifier_confidence_share"] == pytest.approx(0.75)
    assert stats["typical_share"] == pytest.approx(0.75)
    assert stats["mean_max_prob"] == pytest.approx((0.95 + 0.8 + 0.95 + 0.9) / 4)
    assert stats["class_histogram"] == pytest.approx([0.25, 0.25, 0.5])
    assert stats["class_entropy"] == pytest.approx(-2 * 0.25 * np.log(0.25) - 0.5 * np.log(0.5))
    with pytest.raises(ValueError, match="typical"):
        dc.confidence_statistics(probs, typical[:3])


def test_fit_needs_every_class(metric):
    train_x, train_y, _, _ = metric.halves(8)
    keep = train_y != 7
    with pytest.raises(ValueError, match="every class"):
        dc.fit_digits_classifier(train_x[keep], train_y[keep])
