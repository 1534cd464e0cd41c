"""The IDX file format of MNIST, Fashion-MNIST, KMNIST and EMNIST, read with numpy.

An IDX file is a big-endian header followed by the raw array::

    bytes 0-1   0x00 0x00                      (magic)
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64
    byte  3     number of dimensions D
    4 * D       the dimensions, each a big-endian uint32
    rest        prod(dims) elements, big-endian, C order

Images are ``*-images-idx3-ubyte`` ([N, H, W] uint8) and labels ``*-labels-idx1-ubyte``
([N] uint8), either plain or gzip-compressed (``.gz``; detected from the content). Some copies
name them ``train-images.idx3-ubyte`` (a dot before ``idx``); both spellings are found.

A directory holds one file pair per split. The pair for ``split`` has the stem (the name before
``-images-`` / ``-labels-``) ``split`` itself, or ending in ``-split``; ``test`` also matches
MNIST's ``t10k``. So ``split="train"`` finds MNIST's ``train-images-idx3-ubyte.gz`` and
``split="test"`` its ``t10k-images-idx3-ubyte.gz``; in an EMNIST folder with several subsets,
``split="emnist-balanced-train"`` (or ``"balanced-train"``) names one. EMNIST stores each image
transposed; files whose name starts with ``emnist`` are transposed back on reading.
"""
from __future__ import annotations

import functools
import gzip
import os
import re
import zlib
from collections.abc import Sequence

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package (``make fashion-data``) installs Fashion-MNIST."""
DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SPLIT_ALIASES = {"test": ("test", "t10k"), "t10k": ("t10k", "test")}
_IDX_NAME = re.compile(r"^(?P<stem>.+)-(?P<kind>images|labels)[-.]idx\d-ubyte(\.gz)?$")


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (plain or gzip) into a numpy array of native byte order.

    Args:
        path: the file.

    Returns:
        The array with the file's dimensions and element type (e.g. uint8 [N, H, W]).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid gzip, its magic bytes or element type are wrong,
            or it holds fewer or more bytes than its header announces (names the file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file {path!r} does not exist.")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"IDX file {path!r} is a corrupt or truncated gzip file ({e}).") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"IDX file {path!r} does not start with the IDX magic 0x0000 "
                         f"(got {raw[:4].hex() or 'an empty file'}).")
    type_code, ndim = raw[2], raw[3]
    if type_code not in DTYPES:
        raise ValueError(f"IDX file {path!r} has unknown element type 0x{type_code:02X} "
                         f"(expected one of {', '.join(f'0x{c:02X}' for c in DTYPES)}).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path!r} is truncated inside its header ({len(raw)} bytes, "
                         f"{header} expected for {ndim} dimensions).")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise ValueError(f"IDX file {path!r} is {what}: {len(raw) - header} data bytes for "
                         f"dimensions {dims} of {dtype.name} ({expected} expected).")
    array = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def find_idx_split(folder: str, split: str) -> tuple[str, str]:
    """The image and label files of ``split`` in ``folder`` (see the module docstring).

    Args:
        folder: a directory of IDX files (``data.folder``).
        split: ``"train"``, ``"test"`` (= ``"t10k"``), or a longer stem such as
            ``"emnist-letters-train"``.

    Returns:
        ``(images_path, labels_path)``.

    Raises:
        FileNotFoundError: ``folder`` is missing, or holds no image file for ``split``, or
            the image file has no matching labels file.
        ValueError: several image files match ``split`` (the message lists their stems).
    """
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data.folder={folder!r} is not a directory of IDX files.")
    files = {}
    for name in sorted(os.listdir(folder)):
        match = _IDX_NAME.match(name)
        if match:
            files.setdefault((match["stem"], match["kind"]), name)
    stems = sorted({stem for stem, kind in files if kind == "images"})
    names = SPLIT_ALIASES.get(split, (split,))
    exact = [s for s in stems if s in names]
    chosen = exact or [s for s in stems if any(s.endswith("-" + n) for n in names)]
    if not chosen:
        raise FileNotFoundError(
            f"data.folder={folder!r} has no '*{split}-images-idx3-ubyte[.gz]' file for "
            f"data.split={split!r} (image files found for: {stems or 'none'}).")
    if len(chosen) > 1:
        raise ValueError(f"data.split={split!r} matches several IDX image files in {folder!r} "
                         f"(stems {chosen}); set data.split to one of them.")
    stem = chosen[0]
    if (stem, "labels") not in files:
        raise FileNotFoundError(f"data.folder={folder!r} has {files[(stem, 'images')]!r} but "
                                f"no '{stem}-labels-idx1-ubyte[.gz]' beside it.")
    return (os.path.join(folder, files[(stem, "images")]),
            os.path.join(folder, files[(stem, "labels")]))


def load_idx_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of an IDX directory, cached in memory (read-only arrays).

    Args:
        folder: a directory of IDX files.
        split: see ``find_idx_split``.

    Returns:
        ``(images uint8 [N, H, W], labels int64 [N])``; EMNIST images are transposed upright.

    Raises:
        FileNotFoundError / ValueError: as ``find_idx_split`` and ``read_idx``, or when the
            images are not uint8 [N, H, W], the labels not [N] integers >= 0, or their
            counts differ.
    """
    images_path, labels_path = find_idx_split(folder, split)
    stats = [os.stat(p) for p in (images_path, labels_path)]
    return _load_pair(images_path, labels_path, tuple((s.st_mtime_ns, s.st_size) for s in stats))


class IdxDataSource(Sequence):
    """Random-access records ``{"image": uint8 [H, W], "label": int}`` of one IDX split.

    The data source ``data.source="idx"`` feeds to the grain pipeline (like ``tfds.data_source``).

    Args:
        folder: a directory of IDX files.
        split: see ``find_idx_split``.
    """

    def __init__(self, folder: str, split: str):
        self.images, self.labels = load_idx_split(folder, split)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


@functools.lru_cache(maxsize=4)
def _load_pair(images_path: str, labels_path: str, _version) -> tuple[np.ndarray, np.ndarray]:
    """Reads and checks one image / label pair; ``_version`` (mtimes, sizes) keys the cache."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"IDX image file {images_path!r} must hold uint8 [N, H, W], got "
                         f"{images.dtype} {images.shape}.")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"IDX label file {labels_path!r} must hold integer [N], got "
                         f"{labels.dtype} {labels.shape}.")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"IDX files {images_path!r} and {labels_path!r} disagree: "
                         f"{images.shape[0]} images but {labels.shape[0]} labels.")
    if labels.size and labels.min() < 0:
        raise ValueError(f"IDX label file {labels_path!r} has negative labels.")
    if os.path.basename(images_path).lower().startswith("emnist"):
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    labels = labels.astype(np.int64)
    images.flags.writeable = False  # shared through the cache
    labels.flags.writeable = False
    return images, labels
