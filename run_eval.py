"""Scores a sample file and prints the metrics as JSON.

    python run_eval.py --samples=OUT/samples.npz --metric=digits
    python run_eval.py --samples=OUT/samples.npz --metric=fid \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth --ref_stats=cifar10_train.npz
    python run_eval.py --workdir=W --metric=bpd_ode [--num_examples=256 --ode_steps=100]
    python run_eval.py --workdir=W --metric=bpd_vlb [--num_examples=256]

``--samples`` is an ``.npz`` as written by ``run_sample.py``: ``images`` uint8 [N, H, W, C]
(and optionally ``labels`` int [N], -1 = unconditional).

* ``digits``: works offline. A calibrated classifier fit on half of sklearn's digits scores the
  samples: digit-FD against those real digits, the share that is both typical and classified
  with calibrated confidence >= 0.9, class histogram and entropy, printed beside the same
  numbers for the other, held-out half of the real digits (``reference``); with class labels
  also the share of samples classified as their label.
* ``fashion``: works offline with an IDX Fashion-MNIST directory (``--fashion_dir``, default
  Debian's ``/usr/share/datasets/fashion-mnist``): prompt faithfulness (share of samples a
  classifier fit on real training images assigns to their ``labels``, the prompted classes)
  and ``fashion_fd`` (Fréchet distance in that classifier's PCA + logit feature space), beside
  ``reference``: the same numbers for the real test images (faithfulness there is the
  classifier's test accuracy). See ``diffusion_jax/fashion_metric.py``.
* ``clip_score``: 100 * cos(image, text) clipped at 0, averaged, with a CLIP trained here
  (``--clip_workdir``, a ``configs/fashion_clip.py`` run). The text of each sample is the
  npz's ``prompts`` (str [N]) or ``--prompt``.
* ``fid``: FID with the standard Inception weights (a local file, nothing is downloaded)
  against precomputed ``(mu, sigma)`` statistics. ``--save_stats=PATH`` writes the statistics
  of the scored images, e.g. to precompute ``--ref_stats`` from an ``.npz`` of real images.
* ``bpd_ode``: bits/dim of the first ``--num_examples`` images of the model's dataset split
  (``--split``, default the training config's) under the trained model's probability-flow ODE:
  exact log-likelihood with the Hutchinson trace estimator, uniform dequantisation of the
  8-bit data (never negative), ``--ode_method`` / ``--ode_steps`` (RK4, 100 steps by default;
  ``tsit5`` is adaptive). ``bpd_vlb``: DDPM's variational bound on the same images (T network
  calls per image; discrete-time models). Both report mean and standard error over the images
  and need ``--workdir`` instead of ``--samples`` (``diffusion_jax/likelihood_eval.py``).
"""
import json
import os

import numpy as np
from absl import app
from absl import flags as absl_flags

from diffusion_jax import idx
from diffusion_jax.cli import flags
from diffusion_jax.sde import ode

_SAMPLES = absl_flags.DEFINE_string("samples", None, "npz with images uint8 [N, H, W, C].")
_METRIC = absl_flags.DEFINE_enum("metric", "digits", ["digits", "fid", "fashion", "clip_score",
                                                     "bpd_ode", "bpd_vlb"],
                                 "Which metric to compute.")
_WORKDIR = flags.define_workdir("Trained model (bpd_ode / bpd_vlb).")
_NUM_EXAMPLES = absl_flags.DEFINE_integer("num_examples", 256, "Images scored (bpd_*).")
_SPLIT = absl_flags.DEFINE_string("split", None, "Data split (bpd_*; default: the model's).")
_ODE_METHOD = absl_flags.DEFINE_enum("ode_method", "rk4", list(ode.METHODS),
                                     "Probability-flow ODE solver (bpd_ode).")
_ODE_STEPS = absl_flags.DEFINE_integer("ode_steps", 100, "Fixed ODE steps (bpd_ode).")
_INCEPTION_WEIGHTS = absl_flags.DEFINE_string(
    "inception_weights", None, "FID Inception state_dict (pt_inception-2015-12-05-6726825d.pth).")
_REF_STATS = absl_flags.DEFINE_string("ref_stats", None, "npz with reference mu / sigma (fid).")
_SAVE_STATS = absl_flags.DEFINE_string("save_stats", None,
                                       "Write the samples' mu / sigma here (fid).")
_BATCH_SIZE = absl_flags.DEFINE_integer("batch_size", 50,
                                        "Images per compiled call (fid, clip_score, bpd_*).")
_SEED = flags.define_seed("Digits split / classifier seed (digits); Hutchinson and "
                          "dequantisation noise (bpd_*).")
_OUT = flags.define_out("Also write the JSON to this file.")
_FASHION_DIR = absl_flags.DEFINE_string("fashion_dir", idx.FASHION_DIR,
                                        "IDX Fashion-MNIST directory (fashion).")
_CLIP_WORKDIR = absl_flags.DEFINE_string("clip_workdir", None,
                                         "CLIP-stage workdir (clip_score).")
_PROMPT = absl_flags.DEFINE_string("prompt", None, "Text of every sample when the npz has no "
                                   "'prompts' (clip_score).")
flags.define_compilation_cache()


def _evaluate():
    if _METRIC.value.startswith("bpd_"):
        if _WORKDIR.value is None or _SAMPLES.value is not None:
            raise app.UsageError(f"--metric={_METRIC.value} needs --workdir (and no --samples).")
        result = dict(metric=_METRIC.value, workdir=_WORKDIR.value, **_bits_per_dim())
    else:
        if _SAMPLES.value is None:
            raise app.UsageError(f"--metric={_METRIC.value} needs --samples=FILE.npz.")
        images, labels = _load_samples(_SAMPLES.value)
        evaluate = dict(digits=_digits, fashion=_fashion, fid=lambda x, _: _fid(x),
                        clip_score=lambda x, _: _clip_score(x))[_METRIC.value]
        result = dict(metric=_METRIC.value, samples=_SAMPLES.value, **evaluate(images, labels))
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
    try:
        with np.load(path) as data:
            keys = sorted(data.keys())
            images = data["images"] if "images" in keys else None
            labels = data["labels"] if "labels" in keys else None
    except Exception as e:  # noqa: BLE001  zip, pickle and truncation errors alike
        raise ValueError(f"--samples file {path!r} is not a readable .npz "
                         f"({type(e).__name__}: {e}); is it truncated?") from e
    if images is None:
        raise ValueError(f"--samples file {path!r} has no 'images' array (keys: {keys})")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"'images' in {path!r} must be uint8 [N >= 1, H, W, C], got "
                         f"{images.dtype} {images.shape}")
    if labels is not None and (labels.shape != images.shape[:1]
                               or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"'labels' in {path!r} must be int [{images.shape[0]}], got "
                         f"{labels.dtype} {labels.shape}")
    labels = None if labels is None else labels.astype(np.int32)
    return images.astype(np.float32) / 127.5 - 1.0, labels


def _digits(images: np.ndarray, labels) -> dict:
    from diffusion_jax import digits_classifier

    metric = digits_classifier.DigitsMetric(seed=_SEED.value)
    result = metric(images)
    if labels is not None and np.all(labels >= 0):
        result["label_accuracy"] = metric.accuracy(images, labels)
    result["reference"] = metric.reference(images.shape[1])
    return result


def _fashion(images: np.ndarray, labels) -> dict:
    from diffusion_jax import fashion_metric

    if labels is not None and np.any(labels < 0):
        labels = None  # unconditional samples: FD and class histogram only
    metric = fashion_metric.FashionMetric(_FASHION_DIR.value)
    result = metric(images, labels)
    result["reference"] = metric.reference(images.shape[1])
    return result


def _clip_score(images: np.ndarray) -> dict:
    from diffusion_jax import metrics_clip

    if not _CLIP_WORKDIR.value:
        raise app.UsageError("--metric=clip_score needs --clip_workdir=DIR (a "
                             "configs/fashion_clip.py training run)")
    with np.load(_SAMPLES.value) as data:
        prompts = [str(p) for p in data["prompts"]] if "prompts" in data else None
    if prompts is None:
        if not _PROMPT.value:
            raise app.UsageError(f"{_SAMPLES.value!r} has no 'prompts' array; pass --prompt=TEXT")
        prompts = [_PROMPT.value] * images.shape[0]
    if len(prompts) != images.shape[0]:
        raise ValueError(f"'prompts' has {len(prompts)} entries for {images.shape[0]} images")
    model, tokenizer = metrics_clip.load_clip(_CLIP_WORKDIR.value)
    score = metrics_clip.clip_score(model, tokenizer, images, prompts,
                                    batch_size=_BATCH_SIZE.value)
    return dict(num_samples=int(images.shape[0]), clip_score=score,
                clip_workdir=_CLIP_WORKDIR.value)


def _bits_per_dim() -> dict:
    import jax

    from diffusion_jax import data, likelihood_eval, loading

    if _NUM_EXAMPLES.value < 1:
        raise ValueError(f"--num_examples must be >= 1, got {_NUM_EXAMPLES.value}.")
    loaded = loading.load(workdir=_WORKDIR.value)
    data_cfg = loaded.config.data
    if _SPLIT.value is not None:
        data_cfg = data_cfg.copy_and_resolve_references()
        data_cfg.split = _SPLIT.value
    images, _ = data.load_eval_images(data_cfg, _NUM_EXAMPLES.value)
    args = (loaded.graphdef, loaded.params, loaded.config, loaded.schedule, images,
            jax.random.key(_SEED.value))
    if _METRIC.value == "bpd_ode":
        bpd = likelihood_eval.ode_bits_per_dim(*args, batch_size=_BATCH_SIZE.value,
                                               method=_ODE_METHOD.value,
                                               num_steps=_ODE_STEPS.value)
        settings = dict(ode_method=_ODE_METHOD.value, ode_steps=_ODE_STEPS.value,
                        trace="hutchinson", dequantization="uniform, 8 bit")
    else:
        bpd = likelihood_eval.vlb_bits_per_dim(*args, batch_size=_BATCH_SIZE.value)
        settings = {}
    if not np.all(np.isfinite(bpd)):
        raise FloatingPointError(f"non-finite bits/dim for {int((~np.isfinite(bpd)).sum())} "
                                 "images; check the model's parameters.")
    return dict(bits_per_dim=float(bpd.mean()),
                stderr=float(bpd.std(ddof=1) / np.sqrt(bpd.size)) if bpd.size > 1 else None,
                num_examples=int(bpd.size), split=data_cfg.split, seed=_SEED.value, **settings)


def _fid(images: np.ndarray) -> dict:
    from flax import nnx

    from diffusion_jax import metrics
    from diffusion_jax.models import inception

    if not _INCEPTION_WEIGHTS.value:
        raise app.UsageError(
            f"--metric=fid needs --inception_weights=PATH to pytorch-fid's "
            f"{inception.FID_WEIGHTS_FILENAME} (nothing is downloaded here): fetch "
            f"{inception.FID_WEIGHTS_URL} on a machine with network access and copy it here.")
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
    flags.run(_evaluate)
