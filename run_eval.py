"""Scores a sample file and prints the metrics as JSON.

    python run_eval.py --samples=OUT/samples.npz --metric=digits
    python run_eval.py --samples=OUT/samples.npz --metric=fid \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth --ref_stats=cifar10_train.npz

``--samples`` is an ``.npz`` as written by ``run_sample.py``: ``images`` uint8 [N, H, W, C]
(and optionally ``labels`` int [N], -1 = unconditional).

* ``digits``: works offline. A small classifier trained on sklearn digits scores the samples:
  digit-FD against the held-out real digits, confidence share, class histogram and entropy,
  printed beside the same numbers for real data (``reference``); with class labels also the
  share of samples classified as their label.
* ``fid``: FID with the standard Inception weights (a local file, nothing is downloaded)
  against precomputed ``(mu, sigma)`` statistics. ``--save_stats=PATH`` writes the statistics
  of the scored images, e.g. to precompute ``--ref_stats`` from an ``.npz`` of real images.
"""
import json
import os

import numpy as np
from absl import app, flags

from diffusion_jax import compilation_cache

_SAMPLES = flags.DEFINE_string("samples", None, "npz with images uint8 [N, H, W, C].")
_METRIC = flags.DEFINE_enum("metric", "digits", ["digits", "fid"], "Which metric to compute.")
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "FID Inception state_dict (pt_inception-2015-12-05-6726825d.pth).")
_REF_STATS = flags.DEFINE_string("ref_stats", None, "npz with reference mu / sigma (fid).")
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the samples' mu / sigma here (fid).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 50, "Images per Inception call (fid).")
_SEED = flags.DEFINE_integer("seed", 0, "Digits split / classifier seed (digits).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Cache the digits classifier here (digits).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON to this file.")
flags.mark_flags_as_required(["samples"])
_JIT_CACHE = flags.DEFINE_string("compilation_cache_dir", None, compilation_cache.FLAG_HELP)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    compilation_cache.enable(_JIT_CACHE.value)
    images, labels = _load_samples(_SAMPLES.value)
    if _METRIC.value == "digits":
        result = _digits(images, labels)
    else:
        result = _fid(images)
    result = dict(metric=_METRIC.value, samples=_SAMPLES.value, **result)
    text = json.dumps(result, indent=2)
    print(text)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


def _load_samples(path: str):
    """``(images float32 [N, H, W, C] in [-1, 1], labels int32 [N] or None)`` from the npz."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--samples file {path!r} does not exist")
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(f"--samples file {path!r} has no 'images' array "
                             f"(keys: {sorted(data.keys())})")
        images = data["images"]
        labels = data["labels"].astype(np.int32) if "labels" in data else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"'images' in {path!r} must be uint8 [N, H, W, C], got "
                         f"{images.dtype} {images.shape}")
    return images.astype(np.float32) / 127.5 - 1.0, labels


def _digits(images: np.ndarray, labels) -> dict:
    from diffusion_jax import digits_classifier

    metric = digits_classifier.DigitsMetric(seed=_SEED.value, cache_dir=_CACHE_DIR.value)
    result = metric(images)
    if labels is not None and np.all(labels >= 0):
        result["label_accuracy"] = metric.accuracy(images, labels)
    result["reference"] = metric.reference(images.shape[1])
    return result


def _fid(images: np.ndarray) -> dict:
    from flax import nnx

    from diffusion_jax import metrics
    from diffusion_jax.models import inception

    if not _INCEPTION_WEIGHTS.value:
        raise app.UsageError("--metric=fid needs --inception_weights=PATH (nothing is downloaded)")
    if not _REF_STATS.value and not _SAVE_STATS.value:
        raise app.UsageError("--metric=fid needs --ref_stats=PATH (or --save_stats=PATH to "
                             "only write the statistics of --samples)")
    reference = metrics.load_statistics(_REF_STATS.value) if _REF_STATS.value else None
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    model = inception.load_fid_inception(_INCEPTION_WEIGHTS.value)
    forward = nnx.jit(lambda m, x: m(x))
    feats = metrics.extract_features(lambda x: forward(model, x), images, _BATCH_SIZE.value,
                                     desc="inception")
    mu, sigma = metrics.feature_statistics(feats)
    result = dict(num_samples=int(images.shape[0]))
    if _SAVE_STATS.value:
        metrics.save_statistics(_SAVE_STATS.value, mu, sigma)
        result["saved_stats"] = _SAVE_STATS.value
    if reference is not None:
        result["fid"] = metrics.frechet_distance(mu, sigma, *reference)
        result["ref_stats"] = _REF_STATS.value
    return result

if __name__ == "__main__":
    app.run(main)
