"""Tests for diffusion_jax/data.py: values, determinism, host sharding, exact resume, sources."""
import collections
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from diffusion_jax import data

NUM_MOCK = 24  # mock tfds records per split


def _cfg(**overrides):
    base = dict(source="tfds", name="cifar10", data_dir=None, split="train", image_size=32,
                num_channels=3, num_classes=10, random_flip=False, folder="", worker_count=0)
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _to_uint8(x):
    """Inverse of x / 127.5 - 1 for images that came from uint8."""
    return np.round((np.asarray(x, np.float64) + 1.0) * 127.5).astype(np.uint8)


def _record_keys(batches):
    """Multiset of (image bytes, label) over all examples of the batches."""
    return collections.Counter(
        (_to_uint8(im).tobytes(), int(l))
        for b in batches for im, l in zip(b["image"], b["label"]))


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        yield


def _raw_tfds(name):
    src = tfds.data_source(name, split="train")
    return [src[i] for i in range(len(src))]


# --------------------------------------------------------------------------- tfds pipeline

@pytest.mark.parametrize("name,size,channels", [("cifar10", 32, 3), ("mnist", 28, 1)])
def test_tfds_batches_are_scaled_records(mock_tfds, name, size, channels):
    cfg = _cfg(name=name, image_size=size, num_channels=channels)
    it = data.make_train_iterator(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
    batches = _take(it, NUM_MOCK // 8)  # exactly one epoch
    for b in batches:
        assert b["image"].shape == (8, size, size, channels) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        assert ((b["label"] >= 0) & (b["label"] < 10)).all()
    raw = _raw_tfds(name)
    expected = collections.Counter((r["image"].tobytes(), int(r["label"])) for r in raw)
    assert _record_keys(batches) == expected  # one epoch = a permutation of the records

    images, labels = data.load_eval_images(cfg, 5)  # stored order, exact scaling
    np.testing.assert_array_equal(
        images, np.stack([r["image"] for r in raw[:5]]).astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(labels, [int(r["label"]) for r in raw[:5]])


@pytest.mark.parametrize("flip", [False, True])
def test_tfds_shuffle_is_deterministic_per_seed(mock_tfds, flip):
    cfg = _cfg(random_flip=flip)

    def run(seed):
        it = data.make_train_iterator(cfg, batch_size=8, seed=seed, process_index=0,
                                      process_count=1)
        return np.concatenate([b["image"] for b in _take(it, 4)])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_epochs_are_reshuffled(mock_tfds):
    it = data.make_train_iterator(_cfg(), batch_size=NUM_MOCK, seed=0, process_index=0,
                                  process_count=1)
    first, second = _take(it, 2)
    assert _record_keys([first]) == _record_keys([second])
    assert not np.array_equal(first["label"], second["label"])


def test_hosts_read_disjoint_records_covering_the_split(mock_tfds):
    cfg = _cfg()
    per_host = []
    for p in range(2):
        it = data.make_train_iterator(cfg, batch_size=8, seed=5, process_index=p,
                                      process_count=2)
        batches = _take(it, NUM_MOCK // 8)  # 12 records per host = one host epoch
        assert batches[0]["image"].shape[0] == 4
        per_host.append(_record_keys(batches))
    assert not set(per_host[0]) & set(per_host[1])
    expected = collections.Counter((r["image"].tobytes(), int(r["label"]))
                                   for r in _raw_tfds("cifar10"))
    assert per_host[0] + per_host[1] == expected


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_json_state_gives_the_same_batches(mock_tfds, worker_count):
    cfg = _cfg(random_flip=True, worker_count=worker_count)

    def new():
        return data.make_train_iterator(cfg, batch_size=8, seed=3, process_index=0,
                                        process_count=1)

    uninterrupted = _take(new(), 7)  # crosses two epoch boundaries (3 batches / epoch)
    it = new()
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    resumed = new()
    resumed.set_state(state)
    for want, got in zip(uninterrupted[3:], _take(resumed, 4)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_flip_only_mirrors_the_width_axis(mock_tfds):
    def images(flip, seed):
        it = data.make_train_iterator(_cfg(random_flip=flip), batch_size=8, seed=seed,
                                      process_index=0, process_count=1)
        return np.concatenate([b["image"] for b in _take(it, 6)])

    patterns = []
    for seed in (2, 3):
        plain, flipped = images(False, seed), images(True, seed)
        mirrored = [np.array_equal(f, np.flip(p, axis=1)) for p, f in zip(plain, flipped)]
        unchanged = [np.array_equal(f, p) for p, f in zip(plain, flipped)]
        assert all(m != u for m, u in zip(mirrored, unchanged))  # exactly one of the two
        assert 0.2 < np.mean(mirrored) < 0.8
        patterns.append(mirrored)
    assert patterns[0] != patterns[1]  # the flips depend on the seed


def test_non_square_tfds_images_are_center_cropped(mock_tfds):
    raw = tfds.data_source("celeb_a", split="train")[0]["image"]  # [218, 178, 3]
    h, w, _ = raw.shape
    top = (h - w) // 2
    images, labels = data.load_eval_images(_cfg(name="celeb_a", image_size=w), 1)
    np.testing.assert_array_equal(_to_uint8(images[0]), raw[top:top + w])
    np.testing.assert_array_equal(labels, [0])  # celeb_a has no label feature
    small, _ = data.load_eval_images(_cfg(name="celeb_a", image_size=16), 2)
    assert small.shape == (2, 16, 16, 3)


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    cfg = _cfg(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds build cifar10") as err:
        data.make_train_iterator(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
    assert str(tmp_path) in str(err.value) and "data_dir" in str(err.value)


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("overrides,kwargs,match", [
    (dict(source="hdf5"), {}, "data.source='hdf5'.*digits"),
    (dict(source="digits"), dict(batch_size=9, process_count=2), "batch_size=9"),
    (dict(source="digits", num_channels=2), {}, "data.num_channels=2"),
    (dict(name="not_a_dataset_xyz"), {}, "data.name='not_a_dataset_xyz'"),
])
def test_bad_config_raises_value_error(overrides, kwargs, match):
    kwargs = dict(dict(batch_size=8, process_index=0, process_count=1), **kwargs)
    with pytest.raises(ValueError, match=match):
        data.make_train_iterator(_cfg(**overrides), seed=0, **kwargs)


# --------------------------------------------------------------------------- digits

def test_digits_match_sklearn():
    digits = load_digits()
    images, labels = data.load_eval_images(_cfg(source="digits", image_size=8,
                                                num_channels=1), None)
    assert images.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(labels, digits.target)
    np.testing.assert_allclose(images[..., 0], np.round(digits.images * 255 / 16) / 127.5 - 1,
                               atol=1e-6)
    assert images.min() == -1.0 and images.max() == 1.0


def test_digits_upscaled_and_epoch_covers_all():
    cfg = _cfg(source="digits", image_size=16, num_channels=1, random_flip=False)
    it = data.make_train_iterator(cfg, batch_size=599, seed=0, process_index=0, process_count=1)
    batches = _take(it, 3)  # 3 * 599 = 1797: one epoch
    assert batches[0]["image"].shape == (599, 16, 16, 1)
    images, labels = data.load_eval_images(cfg, None)
    expected = collections.Counter((_to_uint8(im).tobytes(), int(l))
                                   for im, l in zip(images, labels))
    assert _record_keys(batches) == expected
    # bilinear 2x upscaling: averaging 2x2 blocks gives back the 8x8 digit up to blur
    small = np.round(load_digits().images * 255 / 16) / 127.5 - 1
    pooled = images[..., 0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.abs(pooled - small).mean() < 0.15
    assert np.corrcoef(pooled.ravel(), small.ravel())[0, 1] > 0.97


@pytest.mark.parametrize("in_size,out_size", [(64, 16), (8, 32)])
def test_resize_is_linear_on_a_ramp(in_size, out_size):
    """Bilinear resampling reproduces a linear ramp at the output pixel centres."""
    x = np.arange(in_size)
    ramp = np.broadcast_to((x * (200 / in_size) + 20).round().astype(np.uint8),
                           (in_size, in_size))
    out = data._fit_image(ramp, out_size, 1)[..., 0].astype(np.float64)
    centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5  # in input pixels
    want = centres * (200 / in_size) + 20
    margin = max(1, out_size // in_size) * 2  # edge pixels see a truncated filter
    np.testing.assert_allclose(out[:, margin:-margin], np.broadcast_to(
        want[margin:-margin], (out_size, out_size - 2 * margin)), atol=1.5)


def test_channel_conversion():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = data._fit_image(gray, 8, 3)
    np.testing.assert_array_equal(rgb, np.repeat(gray[..., None], 3, axis=-1))
    colour = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    luma = colour.astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(data._fit_image(colour, 8, 1)[..., 0], luma, atol=1)


# --------------------------------------------------------------------------- image folder

def _write_folder(root, mode, channels):
    rng = np.random.default_rng(0)
    written = {}
    for cls in ("dog", "cat"):
        for i in range(3):
            sub = root / cls / ("nested" if i == 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            shape = (8, 8) if channels == 1 else (8, 8, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            path = sub / f"{i}.png"
            Image.fromarray(pixels, mode=mode).save(path)
            written[os.path.relpath(path, root)] = pixels
    return written


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_image_folder_labels_and_exact_pixels(tmp_path, mode, channels):
    written = _write_folder(tmp_path, mode, channels)
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = _cfg(source="image_folder", folder=str(tmp_path), image_size=8,
               num_channels=channels, num_classes=2)
    images, labels = data.load_eval_images(cfg, None)
    rel = sorted(written)
    assert images.shape == (6, 8, 8, channels)
    np.testing.assert_array_equal(labels, [0 if r.startswith("cat") else 1 for r in rel])
    for im, r in zip(images, rel):
        np.testing.assert_array_equal(_to_uint8(im).reshape(written[r].shape), written[r])

    it = data.make_train_iterator(cfg, batch_size=6, seed=0, process_index=0, process_count=1)
    assert _record_keys(_take(it, 1)) == _record_keys([{"image": images, "label": labels}])


def test_image_folder_errors(tmp_path):
    cfg = _cfg(source="image_folder", folder=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="data.folder"):
        data.load_eval_images(cfg, 1)
    cfg.folder = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no .png"):
        data.load_eval_images(cfg, 1)
    _write_folder(tmp_path, "RGB", 3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "stray.png")
    with pytest.raises(ValueError, match="mixes"):
        data.load_eval_images(cfg, 1)


def test_image_folder_without_subfolders_is_unlabelled(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 6, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.JPG")
    images, labels = data.load_eval_images(
        _cfg(source="image_folder", folder=str(tmp_path), image_size=6), None)
    np.testing.assert_array_equal(labels, [0, 0, 0])
    np.testing.assert_allclose(_to_uint8(images).astype(float).mean(axis=(1, 2, 3)),
                               [0, 40, 80], atol=2)  # constant images stay constant (JPEG)


# --------------------------------------------------------------------------- checked inputs

@pytest.mark.parametrize("source", ["digits", "tfds"])
def test_labels_beyond_num_classes_are_an_error_when_opened(mock_tfds, source):
    cfg = _cfg(source=source, num_classes=7)  # digits and mock cifar10 both have labels 0-9
    for open_data in (lambda: data.make_train_iterator(cfg, batch_size=8, seed=0),
                      lambda: data.load_eval_images(cfg, 4)):
        with pytest.raises(ValueError, match=r"has label (7|8|9) but data.num_classes=7.*at "
                                             r"least 10"):
            open_data()
    # 10 classes and unlabelled training (0) are both accepted
    for k in (10, 0):
        assert data.load_eval_images(_cfg(source=source, num_classes=k), 2)[0].shape[0] == 2


def test_sixteen_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 257, 32768, 65535]] * 4, np.uint16)  # 257 = 65535 / 255
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    images, _ = data.load_eval_images(
        _cfg(source="image_folder", folder=str(tmp_path), image_size=4, num_channels=1,
             num_classes=0), None)
    np.testing.assert_array_equal(_to_uint8(images[0, 0, :, 0]), [0, 1, 128, 255])
    # an 8-bit copy of the same image decodes to the same pixels
    Image.fromarray(np.round(values / 257.0).astype(np.uint8)).save(tmp_path / "deep.png")
    again, _ = data.load_eval_images(
        _cfg(source="image_folder", folder=str(tmp_path), image_size=4, num_channels=1,
             num_classes=0), None)
    np.testing.assert_array_equal(again, images)
