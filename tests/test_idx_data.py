"""The IDX (MNIST-format) reader and the ``data.source="idx"`` pipeline, on files written here."""
import collections
import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data, idx

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
               np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written with struct, independently of the reader."""
    header = struct.pack(">BBBB", 0, 0, _TYPE_CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, array, compress=None):
    raw = _idx_bytes(np.asarray(array))
    if compress if compress is not None else str(path).endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    with open(path, "wb") as f:
        f.write(raw)
    return str(path)


def _write_split(folder, stem, images, labels, ext=".gz"):
    _write(os.path.join(folder, f"{stem}-images-idx3-ubyte{ext}"), images)
    _write(os.path.join(folder, f"{stem}-labels-idx1-ubyte{ext}"), labels)


def _mnist_like(n, seed, size=28):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, size, size), dtype=np.uint8),
            rng.integers(0, 10, size=n).astype(np.uint8))


def _cfg(folder, **overrides):
    base = dict(source="idx", name="", data_dir=None, split="train", image_size=28,
                num_channels=1, num_classes=10, random_flip=False, folder=str(folder),
                worker_count=0)
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def _to_uint8(x):
    return np.round((np.asarray(x, np.float64) + 1.0) * 127.5).astype(np.uint8)


# ------------------------------------------------------------------------------ reader

def test_read_idx_of_hand_written_bytes(tmp_path):
    # 2x2 uint8 and a big-endian int16 vector, byte by byte.
    u8 = tmp_path / "a-images-idx3-ubyte"
    u8.write_bytes(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4]))
    np.testing.assert_array_equal(idx.read_idx(str(u8)), [[1, 2], [3, 4]])
    i16 = tmp_path / "b"
    i16.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x00, 0xFF, 0xFE]))
    out = idx.read_idx(str(i16))
    np.testing.assert_array_equal(out, [256, -2])
    assert out.dtype == np.int16 and out.dtype.isnative


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_element_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
    path = _write(tmp_path / ("x.gz" if gz else "x"), array)
    out = idx.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def _corrupt(kind, raw):
    return {"magic": b"\x01" + raw[1:], "type": raw[:2] + b"\x07" + raw[3:],
            "truncated": raw[:-1], "extra": raw + b"\x00", "header": raw[:9],
            "empty": b""}[kind]


@pytest.mark.parametrize("kind,message", [
    ("magic", "magic"), ("type", "element type 0x07"), ("truncated", "truncated"),
    ("extra", "longer than its header"), ("header", "inside its header"), ("empty", "magic")])
def test_corrupt_files_name_the_file(tmp_path, kind, message):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(_corrupt(kind, _idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    with pytest.raises(ValueError, match=message) as err:
        idx.read_idx(str(path))
    assert str(path) in str(err.value)


def test_an_empty_split_is_named_not_blamed_on_the_host_count(tmp_path):
    """Used to say "the dataset has fewer records than hosts" on one host."""
    _write_split(tmp_path, "train", *_mnist_like(0, 0))
    with pytest.raises(ValueError, match=r"data.source='idx' split 'train' is empty \(0 records"):
        data.make_train_iterator(_cfg(tmp_path), batch_size=4, seed=0)


def test_truncated_gzip_and_missing_file(tmp_path):
    path = tmp_path / "cut-images-idx3-ubyte.gz"
    raw = gzip.compress(_idx_bytes(np.arange(300, dtype=np.uint8).reshape(3, 10, 10)))
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as err:
        idx.read_idx(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        idx.read_idx(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------ file layouts

def test_mnist_layout_train_and_t10k(tmp_path):
    _write_split(tmp_path, "train", *_mnist_like(6, 0))
    _write_split(tmp_path, "t10k", *_mnist_like(4, 1), ext="")
    (tmp_path / "README").write_text("not an idx file")
    assert idx.find_idx_split(str(tmp_path), "train") == (
        str(tmp_path / "train-images-idx3-ubyte.gz"), str(tmp_path / "train-labels-idx1-ubyte.gz"))
    for split in ("test", "t10k"):
        images, labels = idx.load_idx_split(str(tmp_path), split)
        np.testing.assert_array_equal(images, _mnist_like(4, 1)[0])
        np.testing.assert_array_equal(labels, _mnist_like(4, 1)[1])
        assert labels.dtype == np.int64 and not images.flags.writeable


def test_dot_spelling_is_found(tmp_path):
    images, labels = _mnist_like(3, 2)
    _write(tmp_path / "train-images.idx3-ubyte", images)
    _write(tmp_path / "train-labels.idx1-ubyte", labels)
    np.testing.assert_array_equal(idx.load_idx_split(str(tmp_path), "train")[0], images)


def test_emnist_layout_subsets_and_transpose(tmp_path):
    bal_x, bal_y = _mnist_like(5, 3)
    _write_split(tmp_path, "emnist-balanced-train", bal_x, bal_y)
    _write_split(tmp_path, "emnist-letters-train", *_mnist_like(4, 4))
    _write_split(tmp_path, "emnist-letters-test", *_mnist_like(2, 5))
    with pytest.raises(ValueError, match="emnist-balanced-train"):
        idx.find_idx_split(str(tmp_path), "train")  # two subsets: ambiguous
    images, labels = idx.load_idx_split(str(tmp_path), "balanced-train")
    np.testing.assert_array_equal(images, bal_x.transpose(0, 2, 1))  # EMNIST is stored transposed
    np.testing.assert_array_equal(labels, bal_y)
    test_images, _ = idx.find_idx_split(str(tmp_path), "test")
    assert test_images.endswith("emnist-letters-test-images-idx3-ubyte.gz")


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        idx.find_idx_split(str(tmp_path / "missing"), "train")
    _write(tmp_path / "train-images-idx3-ubyte", _mnist_like(2, 0)[0])
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        idx.find_idx_split(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="image files found for: \\['train'\\]"):
        idx.find_idx_split(str(tmp_path), "test")
    _write(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        idx.load_idx_split(str(tmp_path), "train")
    _write(tmp_path / "train-labels-idx1-ubyte", np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError, match="integer \\[N\\]"):
        idx.load_idx_split(str(tmp_path), "train")


# ------------------------------------------------------------------------------ pipeline

def test_idx_source_feeds_the_grain_pipeline(tmp_path):
    images, labels = _mnist_like(24, 6)
    _write_split(tmp_path, "train", images, labels)
    cfg = _cfg(tmp_path)
    it = data.make_train_iterator(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]  # one epoch
    seen = collections.Counter((_to_uint8(im)[..., 0].tobytes(), int(l))
                               for b in batches for im, l in zip(b["image"], b["label"]))
    assert seen == collections.Counter((im.tobytes(), int(l)) for im, l in zip(images, labels))
    eval_x, eval_y = data.load_eval_images(cfg, 5)
    np.testing.assert_array_equal(eval_x[..., 0], images[:5].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(eval_y, labels[:5])
    # Two hosts read disjoint halves of the records.
    for p in range(2):
        b = next(data.make_train_iterator(cfg, batch_size=24, seed=0, process_index=p,
                                          process_count=2))
        assert sorted(b["label"]) == sorted(labels[p::2])
    # 28 -> 32 goes through the same resizing as the other sources.
    big = next(data.make_train_iterator(_cfg(tmp_path, image_size=32), batch_size=4, seed=0,
                                        process_index=0, process_count=1))
    assert big["image"].shape == (4, 32, 32, 1)


def test_idx_source_config_errors(tmp_path):
    images, labels = _mnist_like(4, 7)
    labels[2] = 12
    _write_split(tmp_path, "train", images, labels)
    with pytest.raises(ValueError, match="has label 1[0-2] but data.num_classes=10"):
        data.load_eval_images(_cfg(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="data.folder"):
        data.load_eval_images(_cfg(""), None)
    with pytest.raises(FileNotFoundError, match="data.split='validation'"):
        data.load_eval_images(_cfg(tmp_path, split="validation"), None)


def test_tfds_fashion_mnist_is_just_a_config():
    cfg = _cfg("", source="tfds", name="fashion_mnist")
    with tfds.testing.mock_data(num_examples=16):
        src = tfds.data_source("fashion_mnist", split="train")
        raw = [src[i] for i in range(len(src))]
        batch = next(data.make_train_iterator(cfg, batch_size=16, seed=0, process_index=0,
                                              process_count=1))
    assert batch["image"].shape == (16, 28, 28, 1)
    expected = collections.Counter((r["image"].tobytes(), int(r["label"])) for r in raw)
    got = collections.Counter((_to_uint8(im).tobytes(), int(l))
                              for im, l in zip(batch["image"], batch["label"]))
    assert got == expected


@pytest.mark.skipif(not os.path.isdir(idx.FASHION_DIR),
                    reason="dataset-fashion-mnist not installed (make fashion-data)")
def test_debian_fashion_mnist_package():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = idx.load_idx_split(idx.FASHION_DIR, split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels), [n // 10] * 10)
    assert 0 < images.mean() < 128 and images.max() == 255


def test_run_train_reports_bad_idx_data_in_one_line(tmp_path):
    """A folder whose only IDX file is a corrupt gzip: FATAL naming it, exit 1, no traceback."""
    import subprocess
    import sys
    from training_fixtures import REPO, subprocess_env
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(_idx_bytes(_mnist_like(4, 0)[0]))[:40])
    _write(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    proc = subprocess.run(
        [sys.executable, "run_train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
         "--config.data.source=idx", f"--config.data.folder={tmp_path}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and fatal[0].startswith("FATAL ValueError: IDX file "), proc.stderr
    assert str(bad) in fatal[0] and "corrupt or truncated gzip" in fatal[0]
    assert not (tmp_path / "w" / "train.lock").exists()
