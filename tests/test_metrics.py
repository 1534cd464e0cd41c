"""Fréchet distance, feature statistics, batching, CLIP score and bits/dim evaluation."""
import jax
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import losses, metrics, schedules


def _scipy_frechet(mu1, sigma1, mu2, sigma2):
    """The pytorch-fid formula: tr sqrtm(sigma1 sigma2) with scipy's general matrix sqrt."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)


def _nuclear_frechet(x1, x2):
    """FD from the features themselves: tr sqrt(S1 S2) = ||X1c X2c^T||_* / sqrt((N1-1)(N2-1)).

    With S_i = X_ic^T X_ic / (N_i - 1), the eigenvalues of S1 S2 are the squared singular values
    of X1c X2c^T / sqrt((N1-1)(N2-1)), an [N1, N2] matrix: exact even when N < D.
    """
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = x1.shape[0] - 1, x2.shape[0] - 1
    nuclear = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    diff = x1.mean(0) - x2.mean(0)
    return diff @ diff + (c1 ** 2).sum() / n1 + (c2 ** 2).sum() / n2 - 2.0 * nuclear


def _feature_pair(n, d, seed):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n, d))
    x2 = 0.5 + rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d))
    return x1, x2


@pytest.mark.parametrize("n,d", [(500, 16), (300, 64)])
def test_frechet_matches_scipy_sqrtm_full_rank(n, d):
    x1, x2 = _feature_pair(n, d, seed=n + d)
    stats = (*metrics.feature_statistics(x1), *metrics.feature_statistics(x2))
    got = metrics.frechet_distance(*stats)
    np.testing.assert_allclose(got, _scipy_frechet(*stats), rtol=1e-9)
    np.testing.assert_allclose(got, _nuclear_frechet(x1, x2), rtol=1e-9)


@pytest.mark.parametrize("n,d", [(20, 64), (40, 128), (5, 32)])
def test_frechet_near_singular_covariances(n, d):
    # N < D: both covariances have rank N - 1; sigma1 sigma2 is singular.
    x1, x2 = _feature_pair(n, d, seed=n * d)
    stats = (*metrics.feature_statistics(x1), *metrics.feature_statistics(x2))
    got = metrics.frechet_distance(*stats)
    np.testing.assert_allclose(got, _nuclear_frechet(x1, x2), rtol=1e-6)
    np.testing.assert_allclose(got, _scipy_frechet(*stats), rtol=1e-6)


def test_frechet_of_identical_rank_deficient_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(10, 50))
    mu, sigma = metrics.feature_statistics(x)
    got = metrics.frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= got < 1e-8 * np.trace(sigma)


# Full rank (N > D): both orders agree to ~1e-15, so 1e-11 leaves a 1e4 margin over round-off.
# Rank deficient (N = 30 < D = 40): sigma1 sigma2 has D - N + 1 = 11 zero eigenvalues, which
# come out of eigvalsh as round-off of size ~D eps |inner| ~ 1e-13 and enter the trace through
# their square roots (~3e-7 each). Which order's round-off survives the clamp at 0 depends on
# the BLAS summation order, so the two orders differ by up to ~11 * 3e-7 / d^2 ~ 1e-7 relative
# (measured: 1.2e-9, which broke an earlier rtol of 1e-9); rtol 1e-6 bounds it with margin.
@pytest.mark.parametrize("n,d,rtol", [(200, 40, 1e-11), (30, 40, 1e-6)])
def test_frechet_is_symmetric(n, d, rtol):
    x1, x2 = _feature_pair(n, d, seed=3)
    s1, s2 = metrics.feature_statistics(x1), metrics.feature_statistics(x2)
    np.testing.assert_allclose(metrics.frechet_distance(*s1, *s2),
                               metrics.frechet_distance(*s2, *s1), rtol=rtol)


def test_frechet_closed_form_for_commuting_covariances():
    # Diagonal (and, rotated by the same Q, commuting) covariances:
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(4)
    d = 12
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.0, 3.0, d)
    b[:3] = 0.0  # singular sigma2
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)),
                               expected, rtol=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T),
        expected, rtol=1e-7)  # sqrt of round-off eigenvalues (~1e-16) in the null space


def test_frechet_docstring_example_and_mean_shift():
    assert metrics.frechet_distance(np.zeros(2), np.diag([1., 4.]), np.ones(2),
                                    np.diag([4., 1.])) == pytest.approx(4.0)
    sigma = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert metrics.frechet_distance(np.zeros(2), sigma, np.array([3.0, 4.0]),
                                    sigma) == pytest.approx(25.0)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1"):
        metrics.frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3))


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(5).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = metrics.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="features"):
        metrics.feature_statistics(x[:1])


def test_statistics_round_trip(tmp_path):
    x = np.random.default_rng(6).normal(size=(40, 9))
    mu, sigma = metrics.feature_statistics(x)
    path = str(tmp_path / "sub" / "stats.npz")
    metrics.save_statistics(path, mu, sigma)
    mu2, sigma2 = metrics.load_statistics(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        metrics.load_statistics(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        metrics.load_statistics(str(tmp_path / "bad.npz"))


def test_frechet_distance_from_features():
    x1, x2 = _feature_pair(60, 5, seed=7)
    np.testing.assert_allclose(metrics.frechet_distance_from_features(x1, x2),
                               _nuclear_frechet(x1, x2), rtol=1e-9)


def test_extract_features_pads_last_batch_and_keeps_order():
    images = np.arange(7 * 2 * 2 * 1, dtype=np.float32).reshape(7, 2, 2, 1)
    shapes = []

    def feature_fn(batch):
        shapes.append(batch.shape)
        return batch.reshape(batch.shape[0], -1) * 2.0

    feats = metrics.extract_features(feature_fn, images, batch_size=3)
    np.testing.assert_array_equal(feats, images.reshape(7, -1) * 2.0)
    assert shapes == [(3, 2, 2, 1)] * 3  # one shape: a jitted feature_fn compiles once


def test_clip_score_matches_hand_computation():
    # Toy embeddings: an image embeds to its mean colour; a text to a fixed vector.
    images = np.zeros((3, 2, 2, 3))
    images[0, ..., :] = [3.0, 4.0, 0.0]
    images[1, ..., :] = [1.0, 0.0, 0.0]
    images[2, ..., :] = [0.0, 1.0, 0.0]
    table = {"a": [6.0, 8.0, 0.0], "b": [1.0, 1.0, 0.0], "c": [0.0, -2.0, 0.0]}
    score = metrics.clip_score(images, ["a", "b", "c"], lambda x: x.mean(axis=(1, 2)),
                               lambda texts: np.array([table[t] for t in texts]))
    # cosines 1, 1/sqrt(2), -1 (clipped to 0); w = 100.
    assert score == pytest.approx((100.0 + 100.0 / np.sqrt(2.0) + 0.0) / 3.0, rel=1e-12)


def test_clip_score_rejects_count_mismatch():
    with pytest.raises(ValueError, match="texts"):
        metrics.clip_score(np.ones((2, 3)), ["x"], lambda x: x, lambda t: np.ones((2, 3)))


def test_evaluate_bits_per_dim_averages_per_batch_bounds():
    sched = schedules.make_schedule(schedules.linear_beta_schedule(10, 1e-3, 0.3))
    denoise = lambda x, t: 0.3 * x  # any deterministic eps predictor will do
    rng = np.random.default_rng(8)
    images = (np.round(rng.uniform(0, 255, size=(5, 4, 4, 1))) / 127.5 - 1).astype(np.float32)
    key = jax.random.key(9)
    got = metrics.evaluate_bits_per_dim(denoise, sched, images, key, batch_size=2,
                                        pred_type="eps")
    # Batches [0, 1], [2, 3], [4 + padding] with keys fold_in(key, 0), (key, 1), (key, 2).
    bpd = jax.jit(lambda x, k: losses.bits_per_dim(denoise, sched, x, k, "eps"))
    padded = np.concatenate([images, images[-1:]])
    per_image = np.concatenate([np.asarray(bpd(padded[2 * i:2 * i + 2], jax.random.fold_in(key, i)))
                                for i in range(3)])[:5]
    assert np.all(np.isfinite(per_image)) and np.all(per_image > 0)
    np.testing.assert_allclose(got, per_image.mean(), rtol=1e-5)
