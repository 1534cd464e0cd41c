"""CLIP score / CLIP FD with a tiny CLIP trained in the test: matched pairs beat shuffled
pairs, real images beat noise / blur / collapse; the score equals a numpy computation."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from diffusion_jax import metrics_clip
import clip_fixtures as cf


@pytest.fixture(scope="module")
def model():
    return cf.trained_clip()


def _eval_set(n=32, seed=1000):
    labels = np.arange(n) % len(cf.WORDS)
    return cf.images_for(labels, seed), cf.texts_for(labels), labels


def test_clip_score_equals_numpy(model):
    images, texts, _ = _eval_set(8)
    u = np.asarray(metrics_clip._encode_image(model, images), np.float64)
    v = np.asarray(metrics_clip._encode_text(model, cf.tokenize(texts)), np.float64)
    expected = np.mean(np.maximum(100 * np.sum(u * v, axis=1), 0))
    got = metrics_clip.clip_score(model, cf.tokenize, images, texts, batch_size=5)
    assert got == pytest.approx(expected, rel=1e-4)


def test_matching_pairs_score_higher_than_shuffled(model):
    images, texts, labels = _eval_set()
    matched = metrics_clip.clip_score(model, cf.tokenize, images, texts)
    shifted = cf.texts_for((labels + 1) % len(cf.WORDS))      # every caption names another class
    mismatched = metrics_clip.clip_score(model, cf.tokenize, images, shifted)
    assert matched > 60 and matched > mismatched + 40, (matched, mismatched)


def test_real_images_beat_noise_blur_and_collapse(model):
    images, texts, _ = _eval_set()
    real = metrics_clip.clip_score(model, cf.tokenize, images, texts)
    rng = np.random.default_rng(0)
    bad = dict(noise=rng.uniform(-1, 1, images.shape).astype(np.float32),
               blur=gaussian_filter(images, sigma=(0, 2, 2, 0)),
               collapsed=np.broadcast_to(images[:1], images.shape))
    reference = cf.images_for(np.arange(64) % 4, seed=2000)
    fd_real = metrics_clip.clip_fd(model, images, reference)
    for name, x in bad.items():
        score = metrics_clip.clip_score(model, cf.tokenize, x, texts)
        assert score < real - 20, (name, score, real)
        assert metrics_clip.clip_fd(model, x, reference) > 20 * fd_real, name


def test_load_clip_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        metrics_clip.load_clip(str(tmp_path))
