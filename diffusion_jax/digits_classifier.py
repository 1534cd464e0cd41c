"""Offline sample-quality metric for digit models: a calibrated classifier on sklearn's 8x8 digits.

Without network access there are no Inception weights; this module gives models trained on
``sklearn.datasets.load_digits`` a metric usable anywhere, built to tell good samples from poor
ones rather than to call everything a confident digit:

* **Split.** The 1,797 digits are split into stratified halves (``load_digits_halves``). The
  train half is split again: two thirds fit the classifier, one third (the calibration split)
  fits its temperature and the typical range below. The test half is never seen by any fit; it
  is the "real held-out digits" that ``DigitsMetric.reference`` scores as if they were samples.
* **Calibrated class probabilities.** Multinomial logistic regression on the 64 pixels
  (deterministic L-BFGS, well under a second), then temperature scaling: one scalar ``T``
  minimising the cross-entropy of ``softmax(z / T)`` on the calibration split, so that a
  probability of 0.9 means about 90 % correct on held-out digits.
* **Typicality.** A classifier is most confident on prototypes, so a collapsed model that emits
  every class's mean image would look perfect to it. Each sample's squared Mahalanobis distance
  to the mean of its predicted class (pooled within-class covariance with Ledoit-Wolf
  shrinkage) must lie inside the central 98 % of the calibration split's distances: too small
  flags over-smooth prototypes (blur, class means), too large flags noise and corruptions. This
  is the two-sided typicality test of Nalisnick et al. (2019) under a class-conditional
  Gaussian.
* **Scores.** ``confidence_share``: share of samples that are typical *and* have calibrated
  ``max_k p_k >= 0.9``; ``digit_fd``: Fréchet distance between the Gaussian fits of the samples'
  features and the train half's features, where the features are the 64 pixels concatenated
  with the 10 calibrated logits (pixels see changes in appearance that keep the class evidence,
  e.g. an added stroke or class-mean collapse; logits see lost class evidence, e.g. blur);
  plus the predicted-class histogram and its entropy (nats; ``ln 10 = 2.303`` when uniform).

Samples of side ``S`` are scored by a classifier fit on the halves as the data pipeline serves
them at side ``S`` (area-downsampled to 8x8), so a model that reproduces its training data scores
like ``reference(S)``. Fits are cached in memory per ``(seed, S)``. FD is biased upwards for
small sample sizes, so compare at about the reference size (~900 samples).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from diffusion_jax import metrics

DIGITS_SIZE = 8
NUM_CLASSES = 10
FEATURE_DIM = DIGITS_SIZE * DIGITS_SIZE + NUM_CLASSES
CONFIDENCE_THRESHOLD = 0.9
TYPICAL_QUANTILES = (0.01, 0.99)
CALIBRATION_FRACTION = 1.0 / 3.0


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
    """A fitted, calibrated digits classifier with its typicality test (all float64 numpy).

    Attributes:
        weights: [64, 10] logistic-regression weights on flattened 8x8 inputs.
        bias: [10] logistic-regression intercepts.
        temperature: ``T`` of the calibrated logits ``(x W + b) / T``.
        class_means: [10, 64] mean input of each class (fit split).
        precision: [64, 64] inverse of the shrunk pooled within-class covariance.
        typical_range: ``(lo, hi)`` bounds on the squared Mahalanobis distance of typical inputs.
    """

    weights: np.ndarray
    bias: np.ndarray
    temperature: float
    class_means: np.ndarray
    precision: np.ndarray
    typical_range: tuple[float, float]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Calibrated logits ``(x W + b) / T``: x [N, 64] -> [N, 10]."""
        return (x @ self.weights + self.bias) / self.temperature

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities ``softmax(logits(x))``: x [N, 64] -> [N, 10]."""
        return _softmax(self.logits(x))

    def mahalanobis_sq(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``d2_n = (x_n - m_{y_n})^T P (x_n - m_{y_n})``: x [N, 64], labels [N] -> [N]."""
        r = x - self.class_means[labels]
        return np.einsum("ni,ij,nj->n", r, self.precision, r)

    def typical(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Boolean [N]: ``lo <= mahalanobis_sq(x, labels) <= hi``."""
        d2 = self.mahalanobis_sq(x, labels)
        lo, hi = self.typical_range
        return (d2 >= lo) & (d2 <= hi)


def load_digits_halves(seed: int = 0, image_size: int = DIGITS_SIZE):
    """sklearn digits as the training pipeline serves them, split into stratified halves.

    Images come from ``data.load_eval_images`` with ``source="digits"``, so at
    ``image_size > 8`` they are upsampled exactly as a model trained at that size saw them.

    Args:
        seed: the split's shuffle seed (the split does not depend on ``image_size``).
        image_size: side S of the returned images.

    Returns:
        ``(train_images [898, S, S, 1], train_labels [898], test_images [899, S, S, 1],
        test_labels [899])``: images float32 in [-1, 1], labels int32.
    """
    import ml_collections
    from sklearn.model_selection import train_test_split

    from diffusion_jax import data

    data_cfg = ml_collections.ConfigDict(
        dict(source="digits", image_size=image_size, num_channels=1, num_classes=NUM_CLASSES))
    images, labels = data.load_eval_images(data_cfg, None)
    train_idx, test_idx = train_test_split(np.arange(labels.shape[0]), test_size=0.5,
                                           stratify=labels, random_state=seed)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def to_digit_inputs(images) -> np.ndarray:
    """Brings images to the classifier's input: grey 8x8, flattened.

    Channels are averaged; an ``8k x 8k`` image is downsampled by averaging ``k x k`` blocks
    (area interpolation), which undoes a nearest upsampling exactly.

    Args:
        images: [N, H, W, C] float in [-1, 1], ``H == W`` a multiple of 8.

    Returns:
        [N, 64] float64.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n, h, w, _ = images.shape
    if h != w or h % DIGITS_SIZE:
        raise ValueError(f"images must be square with a side that is a multiple of {DIGITS_SIZE}"
                         f" (8, 16, 32, ...), got {h}x{w}")
    k = h // DIGITS_SIZE
    grey = images.mean(axis=-1)                                                    # [N, H, W]
    small = grey.reshape(n, DIGITS_SIZE, k, DIGITS_SIZE, k).mean(axis=(2, 4))      # [N, 8, 8]
    return small.reshape(n, DIGITS_SIZE * DIGITS_SIZE)


def fit_digits_classifier(images, labels, *, seed: int = 0) -> DigitsClassifier:
    """Fits the calibrated classifier and its typicality test on real digits.

    A stratified ``CALIBRATION_FRACTION`` of the images (split by ``seed``) is held out; the rest
    fits multinomial logistic regression (L2, ``C = 1``) and the class-conditional Gaussian
    (class means, Ledoit-Wolf-shrunk pooled covariance of ``x - m_y``). On the held-out part,
    ``T = fit_temperature(logits, labels)`` and ``typical_range`` are the ``TYPICAL_QUANTILES``
    of the squared Mahalanobis distances to the predicted class's mean.

    Args:
        images: [N, H, W, C] in [-1, 1] (see ``to_digit_inputs``), every class present.
        labels: [N] int in [0, 10).
        seed: seed of the fit / calibration split.

    Returns:
        The fitted ``DigitsClassifier``.
    """
    from sklearn.covariance import LedoitWolf
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = to_digit_inputs(images), np.asarray(labels, dtype=np.int64)
    if set(np.unique(y)) != set(range(NUM_CLASSES)):
        raise ValueError(f"labels must contain every class 0..{NUM_CLASSES - 1}, "
                         f"got {sorted(set(np.unique(y)))}")
    fit_idx, cal_idx = train_test_split(np.arange(y.shape[0]), test_size=CALIBRATION_FRACTION,
                                        stratify=y, random_state=seed)
    x_fit, y_fit = x[fit_idx], y[fit_idx]
    regression = LogisticRegression(C=1.0, max_iter=5000).fit(x_fit, y_fit)
    class_means = np.stack([x_fit[y_fit == k].mean(axis=0) for k in range(NUM_CLASSES)])
    shrunk = LedoitWolf(assume_centered=True).fit(x_fit - class_means[y_fit])
    weights, bias = regression.coef_.T.astype(np.float64), regression.intercept_.astype(np.float64)
    raw_cal = x[cal_idx] @ weights + bias
    uncalibrated = DigitsClassifier(weights, bias, 1.0, class_means, shrunk.precision_,
                                    (0.0, np.inf))
    temperature = fit_temperature(raw_cal, y[cal_idx])
    d2 = uncalibrated.mahalanobis_sq(x[cal_idx], raw_cal.argmax(axis=-1))
    lo, hi = np.quantile(d2, TYPICAL_QUANTILES)
    return dataclasses.replace(uncalibrated, temperature=temperature,
                               typical_range=(float(lo), float(hi)))


def fit_temperature(logits, labels) -> float:
    r"""Temperature scaling (Guo et al., 2017): the ``T`` that minimises held-out cross-entropy.

    .. math::
        T^* = \arg\min_{T > 0} -\frac{1}{N}\sum_n \log \operatorname{softmax}(z_n / T)_{y_n}

    The objective is minimised over ``log T`` in [-5, 5] with a bounded Brent search
    (deterministic). Dividing by ``T`` keeps every argmax, so accuracy is unchanged.

    Args:
        logits: [N, K] uncalibrated logits ``z``.
        labels: [N] int true classes ``y``.

    Returns:
        ``T`` as a Python float (``> 1`` softens over-confident logits).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, K] and labels [N], got {logits.shape} and "
                         f"{labels.shape}")

    def nll(log_t):
        return _cross_entropy(logits / np.exp(log_t), labels)

    result = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded",
                             options=dict(xatol=1e-6))
    return float(np.exp(result.x))


class DigitsMetric:
    """Digit-FD and calibrated confidence statistics of image sets, against real digits.

    Args:
        seed: seed of the halves split and of the fit / calibration split.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def halves(self, image_size: int = DIGITS_SIZE):
        """``load_digits_halves(seed, image_size)``, loaded once per size and seed."""
        return _halves(self.seed, image_size)

    def classifier(self, image_size: int = DIGITS_SIZE) -> DigitsClassifier:
        """The classifier fit on the train half served at side ``image_size``."""
        return _fitted(self.seed, image_size)[0]

    def features_and_probs(self, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, calibrated probabilities and typicality of ``images``.

        Args:
            images: [N, S, S, C] float in [-1, 1], S a multiple of 8.

        Returns:
            ``(features [N, 74] = [pixels (64), calibrated logits (10)], probs [N, 10],
            typical [N] bool)``.
        """
        clf = self.classifier(_side(images))
        x = to_digit_inputs(images)
        logits = clf.logits(x)
        typical = clf.typical(x, logits.argmax(axis=-1))
        return np.concatenate([x, logits], axis=-1), _softmax(logits), typical

    def accuracy(self, images, labels) -> float:
        """Share of ``images`` classified as ``labels``."""
        _, probs, _ = self.features_and_probs(images)
        return float(np.mean(probs.argmax(axis=-1) == np.asarray(labels)))

    def __call__(self, images) -> dict:
        """Metrics of a sample set against the train half of the real digits.

        Args:
            images: [N, S, S, C] float in [-1, 1], N >= 2, S a multiple of 8.

        Returns:
            dict with ``num_samples``, ``digit_fd`` and the ``confidence_statistics`` keys, all
            JSON-able.
        """
        feats, probs, typical = self.features_and_probs(images)
        train_stats = _fitted(self.seed, _side(images))[1]
        fd = metrics.frechet_distance(*metrics.feature_statistics(feats), *train_stats)
        return dict(num_samples=int(feats.shape[0]), digit_fd=fd,
                    **confidence_statistics(probs, typical))

    def reference(self, image_size: int = DIGITS_SIZE) -> dict:
        """Real-vs-real values at side ``image_size``: the scale to read sample scores on.

        Returns:
            dict with ``heldout_vs_train`` (``__call__`` of the held-out test half, i.e. real
            digits no fit has seen, scored as samples), ``classifier_test_accuracy`` and
            ``temperature``.
        """
        _, _, test_x, test_y = self.halves(image_size)
        return dict(heldout_vs_train=self(test_x),
                    classifier_test_accuracy=self.accuracy(test_x, test_y),
                    temperature=self.classifier(image_size).temperature)


def confidence_statistics(probs, typical) -> dict:
    r"""Class-confidence summary of calibrated probabilities and typicality flags.

    With ``c_n = [max_k p_nk >= 0.9]`` and ``t_n`` the typicality flag:
    ``confidence_share = mean_n c_n t_n``, ``classifier_confidence_share = mean_n c_n``,
    ``typical_share = mean_n t_n``, ``mean_max_prob = mean_n max_k p_nk``,
    ``class_histogram_k = mean_n [argmax p_n = k]`` and
    ``class_entropy = -sum_k h_k ln h_k`` (nats; ``ln K`` when all classes are equally common).

    Args:
        probs: [N, K] rows summing to 1.
        typical: [N] bool.

    Returns:
        dict of Python floats / a list of K floats.
    """
    probs = np.asarray(probs, dtype=np.float64)
    typical = np.asarray(typical, dtype=bool)
    if typical.shape != probs.shape[:1]:
        raise ValueError(f"typical must be [N] for probs {probs.shape}, got {typical.shape}")
    max_prob = probs.max(axis=-1)
    confident = max_prob >= CONFIDENCE_THRESHOLD
    hist = np.bincount(probs.argmax(axis=-1), minlength=probs.shape[-1]) / probs.shape[0]
    nonzero = hist[hist > 0]
    return dict(confidence_share=float(np.mean(confident & typical)),
                classifier_confidence_share=float(np.mean(confident)),
                typical_share=float(np.mean(typical)),
                mean_max_prob=float(max_prob.mean()),
                class_histogram=[float(h) for h in hist],
                class_entropy=float(-(nonzero * np.log(nonzero)).sum()))


def degraded_digits(metric: DigitsMetric, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Poor "samples" made from the held-out 8x8 digits, to check that the metric tells them apart.

    * ``blurred``: each digit under a Gaussian blur of std 0.6 px (``scipy.ndimage``, edges
      continued by their nearest value);
    * ``class_means``: mode collapse, each digit replaced by its class's mean train-half image;
    * ``noise``: uniform noise in [-1, 1];
    * ``stroke``: one full-ink 4-pixel bar added to each digit (a row or a column segment at
      a random place).

    Args:
        metric: gives the halves (its seed).
        seed: seed of the noise and the stroke positions.

    Returns:
        name -> images float [899, 8, 8, 1] in [-1, 1].
    """
    from scipy import ndimage

    train_x, train_y, test_x, test_y = metric.halves(DIGITS_SIZE)
    rng = np.random.default_rng(seed)
    means = np.stack([train_x[train_y == k].mean(axis=0) for k in range(NUM_CLASSES)])
    blurred = np.stack([ndimage.gaussian_filter(im[..., 0], 0.6, mode="nearest")
                        for im in test_x])[..., None]
    noise = rng.uniform(-1.0, 1.0, size=test_x.shape)
    stroke = np.array(test_x)
    for im in stroke:
        line, start = rng.integers(0, DIGITS_SIZE), rng.integers(0, DIGITS_SIZE - 3)
        if rng.random() < 0.5:
            im[line, start:start + 4, 0] = 1.0
        else:
            im[start:start + 4, line, 0] = 1.0
    return dict(blurred=blurred, class_means=means[test_y], noise=noise, stroke=stroke)


def _side(images) -> int:
    shape = np.shape(images)
    if len(shape) != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {shape}")
    return int(shape[1])


@functools.lru_cache(maxsize=8)
def _halves(seed: int, image_size: int):
    arrays = load_digits_halves(seed, image_size)
    for a in arrays:
        a.flags.writeable = False  # shared by every caller of the cache
    return arrays


@functools.lru_cache(maxsize=8)
def _fitted(seed: int, image_size: int):
    """``(classifier, train-half feature statistics (mu, sigma))`` at side ``image_size``."""
    train_x, train_y, _, _ = _halves(seed, image_size)
    clf = fit_digits_classifier(train_x, train_y, seed=seed)
    x = to_digit_inputs(train_x)
    feats = np.concatenate([x, clf.logits(x)], axis=-1)
    return clf, metrics.feature_statistics(feats)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float(np.mean(log_norm - z[np.arange(labels.shape[0]), labels]))
