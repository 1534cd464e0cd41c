"""Offline sample-quality metric for digit models: a small classifier on sklearn's 8x8 digits.

Without network access there are no Inception weights; this module gives models trained on
``sklearn.datasets.load_digits`` a metric usable anywhere. A three-layer MLP (64-256-64-10) is
trained in a few seconds, with a fixed seed, on a stratified half of the 1,797 digits. Its
64-d penultimate activations play the role of Inception's pool3 features:

* ``digit_fd``: Fréchet distance between the Gaussian fits of sample and held-out-half features;
* ``confidence_share``: share of samples whose largest class probability is >= 0.9;
* ``class_histogram`` / ``class_entropy``: predicted-class frequencies and their entropy
  (nats; ``ln 10 = 2.303`` for a uniform spread, ``0`` for a single digit).

``DigitsMetric.reference()`` reports the same numbers for real data (train half as "samples"
against the test half), the scale on which model-vs-data values should be read. FD is biased
upwards for small sample sizes, so compare at about the reference size (~900 samples).
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion_jax import metrics

DIGITS_SIZE = 8
NUM_CLASSES = 10
FEATURE_DIM = 64
CONFIDENCE_THRESHOLD = 0.9
_CACHE_VERSION = 1


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
        [N, 64] float32.
    """
    images = np.asarray(images, dtype=np.float32)
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


class DigitsClassifier(nnx.Module):
    """MLP ``64 -> 256 -> 64 -> 10`` with ReLUs; ``features`` is the 64-d penultimate layer."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(DIGITS_SIZE * DIGITS_SIZE, 256, rngs=rngs)
        self.penultimate = nnx.Linear(256, FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """[N, 64] flattened digits -> [N, 64] penultimate activations."""
        return jax.nn.relu(self.penultimate(jax.nn.relu(self.hidden(x))))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[N, 64] flattened digits -> (features [N, 64], logits [N, 10])."""
        feats = self.features(x)
        return feats, self.head(feats)


def train_digits_classifier(images, labels, *, seed: int = 0, num_steps: int = 600,
                            learning_rate: float = 3e-3,
                            noise_std: float = 0.1) -> DigitsClassifier:
    """Trains ``DigitsClassifier`` full-batch with Adam on cross-entropy.

    Each step sees the inputs with fresh Gaussian noise of std ``noise_std`` (in [-1, 1] units)
    so the classifier tolerates the small pixel errors of generated samples. The whole loop is
    one jitted ``fori_loop``; step ``i`` draws its noise from ``fold_in(key(seed), i)``.

    Args:
        images: [N, H, W, C] in [-1, 1] (see ``to_digit_inputs``).
        labels: [N] int.
        seed: parameter initialisation and noise seed.
        num_steps: Adam steps.
        learning_rate: Adam step size.
        noise_std: input noise std.

    Returns:
        The trained classifier.
    """
    x = jnp.asarray(to_digit_inputs(images))
    y = jnp.asarray(labels, dtype=jnp.int32)
    model = DigitsClassifier(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(learning_rate)
    key = jax.random.key(seed)

    def loss_fn(params, step):
        noisy = x + noise_std * jax.random.normal(jax.random.fold_in(key, step), x.shape)
        _, logits = nnx.merge(graphdef, params)(noisy)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(step, carry):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def train(params):
        return jax.lax.fori_loop(0, num_steps, train_step, (params, optimizer.init(params)))[0]

    nnx.update(model, train(params))
    return model


class DigitsMetric:
    """Digit-FD and class-confidence statistics of image sets, against the held-out real digits.

    The classifier is trained on the 8x8 train half. Samples of side ``S`` are compared with
    the test half served at side ``S`` by the data pipeline (then area-downsampled like the
    samples), so a model that reproduces its training data scores like ``reference(S)``.

    Args:
        seed: seed of the data split and of the classifier's training.
        cache_dir: if given, the trained parameters are saved there (and reused on the next
            construction with the same seed) as ``digits_classifier_seed{seed}_v1.npz``.
    """

    def __init__(self, seed: int = 0, cache_dir: str | None = None):
        self.seed = seed
        self._halves = {}      # image size -> load_digits_halves(seed, size)
        self._test_refs = {}   # image size -> (test-half statistics, test-half probs)
        train_x, train_y, _, _ = self.halves(DIGITS_SIZE)
        self.classifier = _cached_classifier(train_x, train_y, seed, cache_dir)
        self._forward = nnx.jit(_features_and_probs)

    def halves(self, image_size: int = DIGITS_SIZE):
        """``load_digits_halves(seed, image_size)``, loaded once per size."""
        if image_size not in self._halves:
            self._halves[image_size] = load_digits_halves(self.seed, image_size)
        return self._halves[image_size]

    def features_and_probs(self, images) -> tuple[np.ndarray, np.ndarray]:
        """images [N, H, W, C] in [-1, 1] -> (features [N, 64] float64, probs [N, 10] float64)."""
        feats, probs = self._forward(self.classifier, jnp.asarray(to_digit_inputs(images)))
        return np.asarray(feats, np.float64), np.asarray(probs, np.float64)

    def accuracy(self, images, labels) -> float:
        """Share of ``images`` classified as ``labels``."""
        _, probs = self.features_and_probs(images)
        return float(np.mean(probs.argmax(axis=-1) == np.asarray(labels)))

    def __call__(self, images) -> dict:
        """Metrics of a sample set against the held-out half of the real digits.

        Args:
            images: [N, S, S, C] float in [-1, 1], N >= 2, S a multiple of 8.

        Returns:
            dict with ``num_samples``, ``digit_fd``, ``confidence_share``, ``mean_max_prob``,
            ``class_histogram`` (10 shares) and ``class_entropy`` (nats), all JSON-able.
        """
        feats, probs = self.features_and_probs(images)
        test_stats, _ = self._test_reference(np.shape(images)[1])
        fd = metrics.frechet_distance(*metrics.feature_statistics(feats), *test_stats)
        return dict(num_samples=int(feats.shape[0]), digit_fd=fd, **confidence_statistics(probs))

    def reference(self, image_size: int = DIGITS_SIZE) -> dict:
        """Data-vs-data values at side ``image_size``.

        Returns:
            dict with ``train_vs_test`` (``__call__`` of the train half, i.e. real digits
            scored as samples), ``test_half`` (``confidence_statistics`` of the test half) and
            ``classifier_test_accuracy``.
        """
        train_x, _, _, test_y = self.halves(image_size)
        _, test_probs = self._test_reference(image_size)
        return dict(train_vs_test=self(train_x), test_half=confidence_statistics(test_probs),
                    classifier_test_accuracy=float(np.mean(test_probs.argmax(-1) == test_y)))

    def _test_reference(self, image_size: int):
        if image_size not in self._test_refs:
            _, _, test_x, _ = self.halves(image_size)
            feats, probs = self.features_and_probs(test_x)
            self._test_refs[image_size] = (metrics.feature_statistics(feats), probs)
        return self._test_refs[image_size]


def confidence_statistics(probs) -> dict:
    r"""Class-confidence summary of classifier probabilities.

    ``confidence_share = mean_n [max_k p_nk >= 0.9]``, ``mean_max_prob = mean_n max_k p_nk``,
    ``class_histogram_k = mean_n [argmax p_n = k]`` and
    ``class_entropy = -sum_k h_k ln h_k`` (nats; ``ln 10`` when all classes are equally common).

    Args:
        probs: [N, K] rows summing to 1.

    Returns:
        dict of Python floats / a list of K floats.
    """
    probs = np.asarray(probs, dtype=np.float64)
    max_prob = probs.max(axis=-1)
    hist = np.bincount(probs.argmax(axis=-1), minlength=probs.shape[-1]) / probs.shape[0]
    nonzero = hist[hist > 0]
    return dict(confidence_share=float(np.mean(max_prob >= CONFIDENCE_THRESHOLD)),
                mean_max_prob=float(max_prob.mean()),
                class_histogram=[float(h) for h in hist],
                class_entropy=float(-(nonzero * np.log(nonzero)).sum()))


def _features_and_probs(model: DigitsClassifier, x: jax.Array):
    feats, logits = model(x)
    return feats, jax.nn.softmax(logits, axis=-1)


def _cached_classifier(images, labels, seed: int, cache_dir: str | None) -> DigitsClassifier:
    """Trains the classifier, or loads its parameters from ``cache_dir`` when saved before."""
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"digits_classifier_seed{seed}_v{_CACHE_VERSION}.npz")
        if os.path.exists(path):
            model = DigitsClassifier(rngs=nnx.Rngs(seed))
            try:
                flat = _read_cached_params(path, model)
            except ValueError as e:  # a cache: report it, then retrain and overwrite
                print(f"{e}; retraining the digits classifier and rewriting it.", file=sys.stderr)
            else:
                nnx.update(model, nnx.from_flat_state(flat))
                return model
    model = train_digits_classifier(images, labels, seed=seed)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        arrays = {"/".join(map(str, p)): np.asarray(v[...])
                  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        np.savez(path, **arrays)
    return model


def _read_cached_params(path: str, model: DigitsClassifier) -> list:
    """``[(param path, param)]`` from a cache file; ValueError naming it if unreadable."""
    try:
        with np.load(path) as data:
            flat = []
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                value = data["/".join(map(str, p))]
                if value.shape != v.shape:
                    raise ValueError(f"entry {'/'.join(map(str, p))} has shape {value.shape}, "
                                     f"expected {v.shape}")
                flat.append((p, v.replace(jnp.asarray(value))))
            return flat
    except Exception as e:  # noqa: BLE001  zip / pickle / truncation / missing-key errors
        raise ValueError(f"classifier cache {path!r} is unreadable ({type(e).__name__}: {e})"
                         ) from e
