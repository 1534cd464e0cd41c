"""Sample-quality and likelihood metrics.

* Fréchet distance between Gaussian fits of two feature sets (the "FD" in FID), with
    helpers to compute, save and load the statistics ``(mu, sigma)``.
* ``extract_features``: run any feature function over an image array in batches.
* ``clip_score``: CLIP score for any pair of image / text embedding functions.
* ``evaluate_bits_per_dim``: the full variational bound of a trained denoiser on a test split.

All statistics are float64 numpy: the Fréchet distance of 2048-d features is a small
difference of large traces, and float32 loses it.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import losses


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    .. math::
        d^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
              - 2\operatorname{tr}\big(\Sigma_1\Sigma_2\big)^{1/2}

    The trace of the square root is computed from symmetric matrices only: with
    ``S = sqrt(sigma1)`` (eigendecomposition, negative round-off eigenvalues clamped to 0),
    ``tr sqrt(sigma1 sigma2) = sum_i sqrt(lambda_i(S sigma2 S))``, because ``sigma1 sigma2`` is
    similar to the PSD matrix ``S sigma2 S``. Unlike ``scipy.linalg.sqrtm(sigma1 @ sigma2)``
    this stays real and accurate for singular covariances (e.g. fewer samples than features).

    Args:
        mu1: [D] mean of the first set.
        sigma1: [D, D] covariance of the first set (symmetric PSD).
        mu2: [D] mean of the second set.
        sigma2: [D, D] covariance of the second set.

    Returns:
        The squared distance as a Python float (>= 0 up to round-off; clamped at 0).

    Example:
        >>> frechet_distance(np.zeros(2), np.diag([1., 4.]), np.ones(2), np.diag([4., 1.]))
        4.0
    """
    mu1, mu2 = _as_vector(mu1, "mu1"), _as_vector(mu2, "mu2")
    sigma1 = _as_covariance(sigma1, "sigma1", mu1.shape[0])
    sigma2 = _as_covariance(sigma2, "sigma2", mu1.shape[0])
    if mu2.shape != mu1.shape:
        raise ValueError(f"mu1 and mu2 must have the same shape, got {mu1.shape} and {mu2.shape}")
    sqrt_sigma1 = _psd_sqrt(sigma1)
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    inner = 0.5 * (inner + inner.T)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(d2, 0.0))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set.

    ``mu = mean_n f_n`` and ``sigma = sum_n (f_n - mu)(f_n - mu)^T / (N - 1)`` (as ``np.cov``).

    Args:
        features: [N, D] array, N >= 2.

    Returns:
        ``(mu [D], sigma [D, D])`` float64.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N >= 2, D], got {features.shape}")
    mu = features.mean(axis=0)
    centred = features - mu
    sigma = centred.T @ centred / (features.shape[0] - 1)
    return mu, sigma


def frechet_distance_from_features(features1, features2) -> float:
    """``frechet_distance`` of the Gaussian fits of two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def save_statistics(path: str, mu, sigma) -> None:
    """Writes ``mu`` [D] and ``sigma`` [D, D] to an ``.npz`` file (keys ``mu``, ``sigma``).

    The layout is that of pytorch-fid's precomputed statistics, so files are interchangeable.
    """
    mu = _as_vector(mu, "mu")
    sigma = _as_covariance(sigma, "sigma", mu.shape[0])
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu [D], sigma [D, D])`` float64 from an ``.npz`` written by ``save_statistics``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"statistics file {path!r} does not exist")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data]
        if missing:
            raise ValueError(
                f"statistics file {path!r} lacks key(s) {missing}; has {sorted(data.keys())}")
        mu = _as_vector(data["mu"], f"mu in {path!r}")
        sigma = _as_covariance(data["sigma"], f"sigma in {path!r}", mu.shape[0])
    return mu, sigma


def extract_features(feature_fn: Callable, images, batch_size: int = 100, *,
                                          desc: str | None = None) -> np.ndarray:
    """Applies ``feature_fn`` to ``images`` in fixed-size batches and stacks the results.

    The last batch is padded (by repeating its last image) to ``batch_size`` so a jitted
    ``feature_fn`` compiles once; the padded rows are dropped.

    Args:
        feature_fn: maps [B, ...] to [B, F] (for example a jitted network).
        images: [N, ...] array.
        batch_size: images per call.
        desc: tqdm label; a progress bar is shown when given.

    Returns:
        [N, F] float32 numpy array.
    """
    images = np.asarray(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num = images.shape[0]
    outputs = []
    starts = range(0, num, batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        batch, valid = _padded_batch(images, start, batch_size)
        outputs.append(np.asarray(feature_fn(batch), dtype=np.float32)[:valid])
    return np.concatenate(outputs, axis=0)


def clip_score(images, texts: Sequence[str], image_embed_fn: Callable, text_embed_fn: Callable,
                              weight: float = 100.0) -> float:
    r"""CLIP score (Hessel et al., 2021) for any image / text embedding functions.

    .. math::
        \mathrm{CLIPScore} = \frac{1}{N}\sum_n \max\Big(w \cos(E_I(x_n), E_T(c_n)),\ 0\Big),
        \quad w = 100,

    as in ``torchmetrics.multimodal.CLIPScore``. The embeddings are L2-normalised here, so the
    functions may return unnormalised vectors.

    Args:
        images: [N, H, W, C] images (whatever ``image_embed_fn`` accepts).
        texts: N captions.
        image_embed_fn: images -> [N, E] embeddings.
        text_embed_fn: list of N strings -> [N, E] embeddings.
        weight: the factor w.

    Returns:
        The score as a Python float, in [0, w].
    """
    texts = list(texts)
    image_emb = np.asarray(image_embed_fn(images), dtype=np.float64)
    text_emb = np.asarray(text_embed_fn(texts), dtype=np.float64)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("image and text embeddings must both be [N, E] with equal shapes, got "
                                          f"{image_emb.shape} and {text_emb.shape}")
    if image_emb.shape[0] != len(texts):
        raise ValueError(f"got {image_emb.shape[0]} image embeddings for {len(texts)} texts")
    image_emb = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
    text_emb = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
    cosine = np.sum(image_emb * text_emb, axis=-1)
    return float(np.mean(np.maximum(weight * cosine, 0.0)))


def evaluate_bits_per_dim(denoise: Callable, sched, images, key: jax.Array, batch_size: int = 64,
                                                    pred_type: str = "eps") -> float:
    r"""Mean negative variational bound of a trained denoiser on a test set, in bits per dimension.

    .. math::
        \mathrm{bpd} = \frac{1}{N}\sum_n \frac{L_{\mathrm{VLB}}(x_n)}{D\ln 2},\qquad
        L_{\mathrm{VLB}} = L_T + \sum_{t\ge1} L_{t-1} + L_0,

    each image's bound coming from ``losses.bits_per_dim`` (prior term plus all T terms, with
    the discretised Gaussian decoder for ``L_0``). Batch ``i`` uses ``fold_in(key, i)``.

    Args:
        denoise: ``denoise(x_t [B, H, W, C], t int32 [B]) -> prediction`` of ``pred_type``.
        sched: a ``schedules.DiscreteSchedule``.
        images: [N, H, W, C] float in [-1, 1] (data already quantised to 8 bits).
        key: PRNG key.
        batch_size: images per jitted call (the last batch is padded and the padding dropped).
        pred_type: what ``denoise`` predicts: "eps", "x0", "v" or "score".

    Returns:
        Mean bits/dim over the N images, a Python float.
    """
    @jax.jit
    def batch_bpd(x, batch_key):
        return losses.bits_per_dim(denoise, sched, x, batch_key, pred_type)

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    total, count = 0.0, 0
    starts = range(0, images.shape[0], batch_size)
    for i, start in enumerate(tqdm(starts, desc="bits/dim", leave=False)):
        batch, valid = _padded_batch(images, start, batch_size)
        bpd = batch_bpd(jnp.asarray(batch), jax.random.fold_in(key, i))
        bpd = np.asarray(bpd, dtype=np.float64)
        total += bpd[:valid].sum()
        count += valid
    return total / count


def _padded_batch(array: np.ndarray, start: int, batch_size: int) -> tuple[np.ndarray, int]:
    """``array[start:start + batch_size]`` padded with its last row to ``batch_size`` rows."""
    batch = array[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:
        pad = np.repeat(batch[-1:], batch_size - valid, axis=0)
        batch = np.concatenate([batch, pad], axis=0)
    return batch, valid


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix, eigenvalues below 0 (round-off) clamped to 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _as_vector(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a vector [D], got shape {x.shape}")
    return x


def _as_covariance(x, name: str, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (dim, dim):
        raise ValueError(f"{name} must be [{dim}, {dim}] to match the mean, got shape {x.shape}")
    return 0.5 * (x + x.T)
