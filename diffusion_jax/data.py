"""Input pipelines: tfds / sklearn digits / image folders through one grain pipeline.

Every source is a random-access sequence of raw records ``{"image": uint8 [H, W, C] or
[H, W], "label": int}``. One grain ``MapDataset`` pipeline serves them all::

    records[process_index::process_count]  # this host's disjoint slice of the records
      .shuffle(seed).repeat()               # a fresh permutation every epoch, endless
      .map(standardise)                     # crop / resize / channels -> uint8 [S, S, C]
      .random_map(flip)                     # horizontal flip, keyed by (seed, position)
      .batch(batch_size // process_count)   # host-local batch
      .map(to_float)                        # image x / 127.5 - 1 in [-1, 1], label int32

Because every step is a pure function of the element's position, the iterator's state is
just ``{"next_index": n}``: ``get_state()`` is JSON-serialisable and ``set_state`` resumes
with exactly the batches an uninterrupted run would have seen.

Sources (``data.source``):
  * ``"tfds"``: a prepared ArrayRecord dataset read with ``tfds.data_source`` (no
    TensorFlow). ``data.name`` names it, ``data.data_dir`` is where it was prepared.
  * ``"digits"``: ``sklearn.datasets.load_digits`` (1,797 real 8x8 handwritten digits,
    labels 0-9), bundled with scikit-learn, so it needs no download.
  * ``"image_folder"``: PNG / JPEG files under ``data.folder`` (searched recursively);
    when the images sit in subfolders, each top-level subfolder is a class and labels are
    the subfolder names' positions in sorted order.
  * ``"idx"``: the MNIST file format (``diffusion_jax.idx``): ``data.split``'s
    ``*-images-idx3-ubyte[.gz]`` / ``*-labels-idx1-ubyte[.gz]`` pair under ``data.folder``,
    e.g. Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist``, ``make fashion-data``), MNIST, KMNIST or EMNIST.
    (Fashion-MNIST prepared for tfds is ``source="tfds"`` with ``name="fashion_mnist"``.)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from PIL import Image

DataIterator = grain.DatasetIterator
"""The iterator type `make_train_iterator` returns: a grain ``DatasetIterator`` with
``get_state() -> dict`` and ``set_state(dict)`` (also usable with ``grain.checkpoint``)."""

SOURCES = ("digits", "tfds", "image_folder", "idx")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def make_train_iterator(
    data_cfg,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Endless, shuffled, host-sharded iterator of training batches.

    Host ``p`` of ``P`` reads records ``p, p + P, p + 2P, ...`` of the split, so hosts see
    disjoint records whose union is the whole split. Within a host, epoch ``e`` visits its
    records in the permutation seeded by ``seed + e``. With ``data.random_flip`` each image
    is mirrored left-right with probability 1/2, decided by ``seed`` and the element's
    position in the stream, so the same run always sees the same flips.

    Args:
        data_cfg: the ``config.data`` section (source, name, data_dir, split, image_size,
            num_channels, random_flip, folder, worker_count).
        batch_size: global batch size B, summed over all hosts; must be divisible by the
            process count.
        seed: shuffle / flip seed, an integer in [0, 2**32 - 2].
        process_index: this host's index; defaults to ``jax.process_index()``.
        process_count: the number of hosts; defaults to ``jax.process_count()``.

    Returns:
        A grain ``DatasetIterator`` yielding ``dict(image=float32 [B / P, S, S, C] in [-1, 1],
        label=int32 [B / P])`` numpy batches, with JSON-serialisable ``get_state()`` /
        ``set_state(state)``.

    Raises:
        ValueError: bad ``data.source``, batch size not divisible by the process count, or a
            bad process index.
        FileNotFoundError: the dataset / folder does not exist (the message says how to
            prepare it).

    Example:
        >>> it = make_train_iterator(cfg.data, batch_size=128, seed=0)
        >>> batch = next(it)              # batch["image"]: [128, 32, 32, 3]
        >>> state = it.get_state()        # e.g. {"next_index": 1}; later: it.set_state(state)
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})."
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} must be a positive multiple of the process "
            f"count {process_count} (each host loads batch_size // process_count examples)."
        )
    if not 0 <= seed < 2**32 - 1:
        raise ValueError(f"seed={seed} must be in [0, 2**32 - 2] for the grain shuffle.")
    source = _open_source(data_cfg)
    if len(source) == 0:
        raise ValueError(f"data.source={data_cfg.source!r} split {data_cfg.split!r} is empty "
                         f"(0 records): nothing to train on.")
    records = source[process_index::process_count]
    if len(records) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} has no records: the dataset has "
            f"fewer records ({len(source)}) than hosts."
        )
    ds = records.shuffle(seed=seed).repeat().map(_standardiser(data_cfg))
    if data_cfg.random_flip:
        ds = ds.random_map(_random_flip, seed=seed + 1)
    ds = ds.batch(batch_size // process_count, drop_remainder=True).map(_to_float)
    # worker_count threads each build whole batches ahead of time; 0 reads synchronously.
    workers = int(data_cfg.get("worker_count", 0) or 0)
    read_options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
    return iter(ds.to_iter_dataset(read_options))


def load_eval_images(data_cfg, num: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` records of the split in stored order, unshuffled and unflipped.

    Args:
        data_cfg: the ``config.data`` section.
        num: how many images N to load; ``None`` loads the whole split.

    Returns:
        ``(images float32 [N, S, S, C] in [-1, 1], labels int32 [N])``.

    Raises:
        ValueError: ``num`` is larger than the split.
    """
    records = _open_source(data_cfg)
    num = len(records) if num is None else num
    if not 0 <= num <= len(records):
        raise ValueError(f"num={num} must be in [0, {len(records)}] (the split's size).")
    standardise = _standardiser(data_cfg)
    examples = [standardise(records[i]) for i in range(num)]
    if not examples:
        s, c = data_cfg.image_size, data_cfg.num_channels
        return np.zeros((0, s, s, c), np.float32), np.zeros((0,), np.int32)
    batch = _to_float({k: np.stack([e[k] for e in examples]) for k in ("image", "label")})
    return batch["image"], batch["label"]


def list_image_folder(folder: str) -> tuple[list[str], list[int], list[str]]:
    """Image files under ``folder`` and their labels.

    Files ending in .png / .jpg / .jpeg (any case) are found recursively and sorted. If they
    all sit directly in ``folder`` every label is 0 and there are no class names; otherwise
    every image must lie inside a top-level subfolder, whose name is its class, and labels
    index the sorted class names.

    Args:
        folder: the root directory (``data.folder``).

    Returns:
        ``(paths [N], labels [N], class_names [K])``.

    Raises:
        FileNotFoundError: ``folder`` is missing or holds no images.
        ValueError: some images are in class subfolders and some directly in ``folder``.
    """
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data.folder={folder!r} is not a directory of images.")
    rel_paths = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not rel_paths:
        raise FileNotFoundError(
            f"data.folder={folder!r} contains no {'/'.join(IMAGE_EXTENSIONS)} files."
        )
    paths = [os.path.join(folder, p) for p in rel_paths]
    parts = [p.split(os.sep) for p in rel_paths]
    in_root = [len(p) == 1 for p in parts]
    if all(in_root):
        return paths, [0] * len(paths), []
    if any(in_root):
        raise ValueError(
            f"data.folder={folder!r} mixes images in class subfolders with images directly in "
            f"the folder (e.g. {rel_paths[in_root.index(True)]!r}); use one layout."
        )
    class_names = sorted({p[0] for p in parts})
    labels = [class_names.index(p[0]) for p in parts]
    return paths, labels, class_names


# ---------------------------------------------------------------------------------------
# private helpers


def _open_source(data_cfg) -> grain.MapDataset:
    """Raw records of ``data.source``: a MapDataset of ``{"image": uint8, "label": int}``."""
    source = data_cfg.source
    num_classes = data_cfg.get("num_classes", 0)
    if source == "tfds":
        records = _tfds_source(data_cfg)
        _check_labels(_tfds_label_range(records), num_classes, f"tfds dataset {data_cfg.name!r}")
        return grain.MapDataset.source(records)
    if source == "digits":
        records = _digits_records()
        _check_labels([r["label"] for r in records], num_classes, "the sklearn digits")
        return grain.MapDataset.source(records)
    if source == "image_folder":
        paths, labels, class_names = list_image_folder(data_cfg.folder)
        if num_classes and len(class_names) > num_classes:
            raise ValueError(
                f"data.folder has {len(class_names)} class subfolders {class_names} but "
                f"data.num_classes={num_classes}."
            )
        items = [{"path": p, "label": l} for p, l in zip(paths, labels)]
        return grain.MapDataset.source(items).map(_read_image_file)
    if source == "idx":
        return grain.MapDataset.source(_idx_source(data_cfg))
    raise ValueError(f"data.source={source!r} is not one of {SOURCES}.")


def _idx_source(data_cfg) -> Sequence[dict[str, Any]]:
    """The IDX split under ``data.folder``, its labels checked against ``data.num_classes``."""
    from diffusion_jax import idx

    if not data_cfg.folder:
        raise FileNotFoundError(
            "data.source='idx' needs data.folder, a directory of *-images-idx3-ubyte[.gz] files "
            "(e.g. /usr/share/datasets/fashion-mnist after `make fashion-data`).")
    source = idx.IdxDataSource(data_cfg.folder, data_cfg.split)
    _check_labels(source.labels, data_cfg.get("num_classes", 0),
                  f"data.folder={data_cfg.folder!r} split {data_cfg.split!r}")
    return source


def _tfds_label_range(records) -> list[int]:
    """``[0, K - 1]`` for a tfds source with a ``ClassLabel`` feature ``label`` of K classes
    (its declared range, so nothing is read), else ``[]``."""
    features = getattr(getattr(records, "dataset_info", None), "features", None)
    if features is None or "label" not in features:
        return []
    k = getattr(features["label"], "num_classes", None)
    return [0, k - 1] if k else []


def _check_labels(labels: Sequence[int], num_classes: int, where: str) -> None:
    """Labels must lie in [0, num_classes) when the data is labelled (num_classes > 0)."""
    if not num_classes or not len(labels):
        return
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{where} has label {int(bad[0])} but data.num_classes={num_classes}: labels must "
            f"lie in [0, {num_classes}); set data.num_classes to at least {int(labels.max()) + 1} "
            f"(or 0 for unlabelled training)."
        )


def _tfds_source(data_cfg) -> Sequence[dict[str, Any]]:
    """``tfds.data_source`` for the split, with errors that say how to prepare it."""
    import tensorflow_datasets as tfds

    name, data_dir, split = data_cfg.name, data_cfg.data_dir, data_cfg.split
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"data.name={name!r} is not a tfds dataset name.") from e
    except Exception as e:  # tfds raises several types for "not prepared here"
        where = data_dir or "~/tensorflow_datasets"
        raise FileNotFoundError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared as ArrayRecord under "
            f"data.data_dir={where!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"This machine has no network, so prepare it elsewhere: on a machine with "
            f"internet run `pip install tensorflow-datasets` and "
            f"`tfds build {name} --file_format=array_record --data_dir=DIR`, copy DIR here, "
            f"then pass `--config.data.data_dir=DIR`."
        ) from e


def _digits_records() -> list[dict[str, Any]]:
    """sklearn's 1,797 digits as records: image uint8 [8, 8] = round(v * 255 / 16), label 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    return [{"image": im, "label": int(l)} for im, l in zip(images, digits.target)]


def _read_image_file(item: dict[str, Any]) -> dict[str, Any]:
    """Decodes one image file to uint8 [H, W, C] (C = 1, 3 or 4 as stored).

    16-bit grayscale (PIL modes ``I;16*``, and ``I`` holding values in [0, 65535]) is scaled
    by its bit depth, ``round(v * 255 / 65535)``, rather than clipped at 255.

    Raises:
        ValueError: a 32-bit integer image with values outside [0, 65535], or a float image
            (their range is unknown), naming the file.
    """
    path = item["path"]
    with Image.open(path) as im:
        if im.mode.startswith("I"):
            image = _sixteen_bit_to_uint8(np.asarray(im), im.mode, path)
        elif im.mode == "F":
            raise ValueError(f"image file {path!r} holds floats (PIL mode 'F'); the image "
                             f"folder source reads 8- or 16-bit images.")
        else:
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            image = np.asarray(im, np.uint8)
        return {"image": image, "label": item["label"]}


def _sixteen_bit_to_uint8(values: np.ndarray, mode: str, path: str) -> np.ndarray:
    """uint16-range grayscale [H, W] -> uint8 ``round(v * 255 / 65535)``."""
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"image file {path!r} (PIL mode {mode!r}) has values in [{values.min()}, "
            f"{values.max()}], outside the 16-bit range [0, 65535].")
    return np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _standardiser(data_cfg):
    """The map ``raw record -> {"image": uint8 [S, S, C], "label": int32 []}``."""
    size, channels = int(data_cfg.image_size), int(data_cfg.num_channels)
    if channels not in (1, 3):
        raise ValueError(f"data.num_channels={channels} must be 1 (grayscale) or 3 (RGB).")

    def standardise(record: dict[str, Any]) -> dict[str, np.ndarray]:
        image = _fit_image(np.asarray(record["image"]), size, channels)
        return {"image": image, "label": np.int32(record.get("label", 0))}

    return standardise


def _fit_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 [H, W(, C)] -> uint8 [size, size, channels].

    Converts channels (gray <-> RGB by PIL's ITU-R 601 luma / replication, alpha dropped),
    then, if the image is not already ``size x size``, center-crops the largest square
    (rows ``(H - m) // 2 : (H - m) // 2 + m`` with ``m = min(H, W)``, likewise columns) and
    resizes it bilinearly (antialiased when shrinking). An image of the right size and
    channel count is returned unchanged.
    """
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    if c == channels and h == w == size:
        return image
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    pil = pil.convert("L" if channels == 1 else "RGB")
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    pil = pil.crop((left, top, left + m, top + m))
    if m != size:
        pil = pil.resize((size, size), Image.BILINEAR)
    return np.asarray(pil, np.uint8).reshape(size, size, channels)


def _random_flip(example: dict[str, np.ndarray], rng: np.random.Generator):
    """Mirrors ``image [S, S, C]`` along the width axis with probability 1/2."""
    if rng.random() < 0.5:
        example = dict(example, image=example["image"][:, ::-1])
    return example


def _to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 images -> float32 ``x / 127.5 - 1`` in [-1, 1]; labels -> int32."""
    return {
        "image": batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0),
        "label": batch["label"].astype(np.int32),
    }
