"""Offline prompt-faithfulness and Fréchet distance for Fashion-MNIST text-to-image samples.

No Inception weights exist offline, so generated Fashion-MNIST images are scored with a
classifier fit here on real Fashion-MNIST (any IDX directory; Debian's
``dataset-fashion-mnist`` installs one in `diffusion_jax.idx.FASHION_DIR`):

* **Classifier.** A linear least-squares (ridge) classifier on the 784 pixels in [0, 1]:
  ``[W; b] = argmin |[X 1][W; b] - (2 Y - 1)|^2 + RIDGE |[W; b]|^2`` with one-hot ``Y``, a
  closed form (one 785x785 solve; deterministic, about a second on a CPU), fit on the first
  ``max_train`` training images (10,000 by default): 81.9 % accuracy on the first 2,000
  Fashion-MNIST test images (logistic regression reaches 84.5 % but takes minutes here).
* **Faithfulness.** ``faithfulness``: share of samples classified as the class they were
  prompted with. It is printed beside ``reference_accuracy``, the same share for the real
  test images and their true labels, which is what a perfect generator would reach.
* **Fréchet distance (``fashion_fd``).** Between Gaussian fits of features of the samples and
  of the classifier's training images. The feature space is the 50 leading principal
  components of the pixels (fit on the training images) concatenated with the classifier's
  10 logits: the components see appearance (blur, noise, collapse onto one image), the logits
  see class evidence. It is not Inception FID and not comparable with published FIDs.

Samples of any side are resized to 28x28 (bilinear, antialiased, as ``data.py`` resizes);
``reference(side)`` scores the real test images after the same round trip through ``side``,
so a generator trained at 32x32 is compared with real images as it saw them. FD is biased
upwards for small sets; compare at equal sample counts.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image

from diffusion_jax import idx, metrics

SIDE = 28
NUM_CLASSES = 10
PCA_DIM = 50
RIDGE = 10.0
CLASS_NAMES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")


@dataclasses.dataclass(frozen=True)
class FashionClassifier:
    """Logistic regression on pixels plus the PCA basis of the FD features (float64 numpy).

    Attributes:
        weights: [784, 10]; bias: [10]: ``logits = x W + b`` for pixels ``x`` in [0, 1].
        mean: [784] training pixel mean; components: [784, PCA_DIM] orthonormal PCA basis.
    """
    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    components: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``[N, 784]`` pixels in [0, 1] -> ``[N, 10]`` logits."""
        return x @ self.weights + self.bias

    def features(self, x: np.ndarray) -> np.ndarray:
        """``[N, 784]`` -> ``[N, PCA_DIM + 10]``: PCA coordinates then logits."""
        return np.concatenate([(x - self.mean) @ self.components, self.logits(x)], axis=1)


def fit_fashion_classifier(images: np.ndarray, labels: np.ndarray) -> FashionClassifier:
    """Fits `FashionClassifier` to ``images`` uint8 [N, 28, 28] (or [N, 28, 28, 1]) and labels.

    Raises:
        ValueError: the images are not 28x28 or the labels do not cover the 10 classes.
    """
    x = to_inputs(images)
    labels = np.asarray(labels)
    if set(np.unique(labels).tolist()) != set(range(NUM_CLASSES)):
        raise ValueError(f"labels must cover the classes 0..{NUM_CLASSES - 1}, got "
                         f"{np.unique(labels).tolist()}")
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)              # [N, 785]
    targets = 2.0 * np.eye(NUM_CLASSES)[labels] - 1.0                   # [N, 10]
    w = np.linalg.solve(xa.T @ xa + RIDGE * np.eye(xa.shape[1]), xa.T @ targets)
    mean = x.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov(x, rowvar=False))                   # ascending eigenvalues
    return FashionClassifier(w[:-1], w[-1], mean, vecs[:, ::-1][:, :PCA_DIM].copy())


def to_inputs(images: np.ndarray) -> np.ndarray:
    """Images -> ``[N, 784]`` float64 pixels in [0, 1] at 28x28.

    Args:
        images: uint8 [N, H, W] / [N, H, W, 1] in [0, 255], or float [N, H, W, 1] in [-1, 1]
            (the library's range); RGB ([..., 3]) is converted to gray (ITU-R 601 luma).

    Raises:
        ValueError: not a batch of square one- or three-channel images.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be [N, S, S] or [N, S, S, 1 or 3], got {images.shape}")
    if images.dtype != np.uint8:
        images = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.stack([_resize(im, SIDE) for im in images]).reshape(len(images), -1) / 255.0


class FashionMetric:
    """Faithfulness and FD of samples against a classifier fit on real Fashion-MNIST.

    Args:
        folder: IDX directory with ``train`` and ``test`` (``t10k``) splits.
        max_train: training images used for the fit and the FD reference statistics.
        max_test: test images used by `reference`.

    Raises:
        FileNotFoundError: ``folder`` has no IDX files (install ``dataset-fashion-mnist``).
    """

    def __init__(self, folder: str = idx.FASHION_DIR, *, max_train: int = 10_000,
                 max_test: int = 10_000):
        self.folder = folder
        train_x, train_y = idx.load_idx_split(folder, "train")
        self.test_x, self.test_y = (a[:max_test] for a in idx.load_idx_split(folder, "test"))
        self.classifier = _fit_cached(folder, max_train)
        feats = self.classifier.features(to_inputs(train_x[:max_train]))
        self.reference_stats = metrics.feature_statistics(feats)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Scores ``images`` ([N, S, S, C], see `to_inputs`) prompted with class ``labels`` [N].

        Returns:
            ``{"num_samples", "fashion_fd", "class_histogram"}`` plus, when ``labels`` are
            given, ``"faithfulness"`` (share classified as the prompted class) and
            ``"faithfulness_by_class"`` (that share per prompted class, ``None`` for a class
            with no images).
        """
        x = to_inputs(images)
        feats = self.classifier.features(x)
        pred = feats[:, -NUM_CLASSES:].argmax(axis=1)
        result = dict(num_samples=int(len(x)),
                      fashion_fd=metrics.frechet_distance(*metrics.feature_statistics(feats),
                                                          *self.reference_stats),
                      class_histogram=np.bincount(pred, minlength=NUM_CLASSES).tolist())
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(x),) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
                raise ValueError(f"labels must be [{len(x)}] ints in [0, {NUM_CLASSES}), got "
                                 f"shape {labels.shape}")
            result["faithfulness"] = float(np.mean(pred == labels))
            result["faithfulness_by_class"] = [
                float(np.mean(pred[labels == k] == k)) if np.any(labels == k) else None
                for k in range(NUM_CLASSES)]
        return result

    def reference(self, side: int = SIDE) -> dict:
        """The same scores for the real test images (resized to ``side`` and back) with their
        true labels: ``faithfulness`` here is the classifier's test accuracy."""
        images = self.test_x if side == SIDE else np.stack([_resize(im[..., None], side)
                                                            for im in self.test_x])
        result = self(images, self.test_y)
        result["reference_accuracy"] = result.pop("faithfulness")
        result["reference_accuracy_by_class"] = result.pop("faithfulness_by_class")
        return result


def degraded(images: np.ndarray, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Known-bad versions of uint8 ``images [N, 28, 28]`` for checking the metric.

    ``noise``: uniform noise; ``blur``: Gaussian blur (sigma 2 px); ``collapsed``: every
    image replaced by the first one (mode collapse).
    """
    from scipy.ndimage import gaussian_filter

    images = np.asarray(images)
    rng = np.random.default_rng(seed)
    blur = gaussian_filter(images.astype(np.float64), sigma=(0, 2, 2))
    return dict(noise=rng.integers(0, 256, images.shape).astype(np.uint8),
                blur=np.clip(np.round(blur), 0, 255).astype(np.uint8),
                collapsed=np.broadcast_to(images[:1], images.shape).copy())


@functools.lru_cache(maxsize=2)
def _fit_cached(folder: str, max_train: int) -> FashionClassifier:
    x, y = idx.load_idx_split(folder, "train")
    return fit_fashion_classifier(x[:max_train], y[:max_train])


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 [S, S, C] -> uint8 [side, side] gray (PIL bilinear, antialiased when shrinking)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("L")
    if pil.size != (side, side):
        pil = pil.resize((side, side), Image.BILINEAR)
    return np.asarray(pil, np.uint8)
