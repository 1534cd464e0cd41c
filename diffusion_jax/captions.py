"""Captions for Fashion-MNIST images: class names, varied templates and a measured attribute.

A caption is a template with its ``{}`` filled by an object phrase, e.g. ``"a photo of {}"`` and
``"an ankle boot"`` give ``"a photo of an ankle boot"``. The phrase names the class (one of a
few synonyms: "t-shirt" / "top", "coat" / "jacket", ...) and, for some captions, an adjective
measured from the image itself: "dark" or "light" by the mean intensity of the item's pixels,
as the image is displayed (Fashion-MNIST stores garments bright on black; its creators inverted
the photos, so a "light" item here was a dark one in the catalogue).

``split_templates`` divides the templates, by a seeded permutation, into a training set and a
held-out set that a text encoder never sees in training, to test that it generalises.
Everything is pure numpy and seeded: the same seed gives the same captions.

Example:
    >>> train, heldout = split_templates(seed=0)
    >>> random_captions(images, labels, templates=train, seed=(0, step))   # one per image
    ['a product photo of a pair of trousers', 'a dark sandal', ...]
"""
from __future__ import annotations

import numpy as np

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# Nouns per class; a "pair of" noun is plural ("a pair of trousers"), the rest take a / an.
CLASS_NOUNS = (("t-shirt", "top"), ("pair of trousers", "pair of pants"), ("pullover", "sweater"),
               ("dress",), ("coat", "jacket"), ("sandal",), ("shirt",), ("sneaker", "trainer"),
               ("bag", "handbag"), ("ankle boot", "boot"))
TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a black and white photo of {}",
    "a grayscale photo of {}",
    "a small photo of {}",
    "a low resolution photo of {}",
    "a product photo of {}",
    "a catalog image of {}",
    "a close-up photo of {}",
    "a centered photo of {}",
    "a photo showing {}",
    "this is {}",
    "{} on a black background",
    "a blurry photo of {}",
)
DARK, LIGHT = "dark", "light"
OBJECT_THRESHOLD = 0.05   # displayed intensity in [0, 1] above which a pixel belongs to the item
DARK_BELOW = 0.45         # mean item intensity below this: "dark" (about the darkest 20 %)
LIGHT_ABOVE = 0.72        # above this: "light" (about the lightest 30 %)


def split_templates(templates=TEMPLATES, *, num_heldout: int = 4,
                    seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Splits templates into training and held-out sets by a seeded permutation.

    Args:
        templates: the templates, each with one ``{}``.
        num_heldout: how many to hold out, in [1, len(templates) - 1].
        seed: permutation seed.

    Returns:
        ``(train, heldout)``: disjoint tuples covering ``templates``, each in the original order.
    """
    templates = tuple(templates)
    if not 1 <= num_heldout < len(templates):
        raise ValueError(f"num_heldout={num_heldout} must be in [1, {len(templates) - 1}] for "
                         f"{len(templates)} templates.")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'.")
    heldout = set(np.random.default_rng(seed).permutation(len(templates))[:num_heldout].tolist())
    return (tuple(t for i, t in enumerate(templates) if i not in heldout),
            tuple(t for i, t in enumerate(templates) if i in heldout))


def brightness_words(images) -> np.ndarray:
    r"""The measured attribute of each image: ``"dark"``, ``"light"`` or ``""``.

    With ``u = (x + 1) / 2`` the displayed intensity in [0, 1] and the item's pixels
    ``M = {u > OBJECT_THRESHOLD}``, ``m = mean_{M} u``; ``m < DARK_BELOW`` is "dark",
    ``m > LIGHT_ABOVE`` is "light", anything between (or an empty image) has no word.

    Args:
        images: [N, H, W] or [N, H, W, C] float in [-1, 1] (channels are averaged).

    Returns:
        [N] array of str.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    if x.ndim != 3:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
    u = (x + 1.0) / 2.0
    mask = u > OBJECT_THRESHOLD
    count = mask.sum(axis=(1, 2))
    mean = (u * mask).sum(axis=(1, 2)) / np.maximum(count, 1)
    words = np.full(x.shape[0], "", dtype=object)
    words[(count > 0) & (mean < DARK_BELOW)] = DARK
    words[mean > LIGHT_ABOVE] = LIGHT
    return words.astype(str)


def object_phrase(label: int, adjective: str = "", synonym: int = 0) -> str:
    """The item as a noun phrase, ``"an ankle boot"``, ``"a dark coat"``, ``"a pair of pants"``.

    Args:
        label: Fashion-MNIST class in [0, 10).
        adjective: optional word before the noun.
        synonym: index into ``CLASS_NOUNS[label]``.
    """
    if not 0 <= label < len(CLASS_NOUNS):
        raise ValueError(f"label={label} must be in [0, {len(CLASS_NOUNS)}).")
    noun = CLASS_NOUNS[label][synonym]
    if noun.startswith("pair of "):
        words = ["a pair of", adjective, noun[len("pair of "):]]
    else:
        first = adjective or noun
        words = ["an" if first[0] in "aeiou" else "a", adjective, noun]
    return " ".join(w for w in words if w)


def class_prompts(template: str = "a photo of {}") -> list[str]:
    """One prompt per class (first synonym, no adjective), e.g. for zero-shot classification."""
    return [template.format(object_phrase(k)) for k in range(len(CLASS_NOUNS))]


def random_captions(images, labels, *, templates=TEMPLATES, seed=0,
                    attribute_prob: float = 0.5) -> list[str]:
    """One random caption per image, a pure function of ``seed`` and the inputs.

    For each image a template and a class synonym are drawn uniformly, and its measured
    brightness word (``brightness_words``), if any, is included with probability
    ``attribute_prob``.

    Args:
        images: [N, H, W(, C)] float in [-1, 1].
        labels: [N] int Fashion-MNIST classes.
        templates: the templates to draw from (e.g. the training half of ``split_templates``).
        seed: an int or a sequence of ints, e.g. ``(config.seed, step)``.
        attribute_prob: chance of naming the measured attribute.

    Returns:
        N captions.
    """
    labels = np.asarray(labels)
    words = brightness_words(images)
    if labels.shape != words.shape:
        raise ValueError(f"labels must be [N] for {words.shape[0]} images, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NOUNS)):
        raise ValueError(f"labels must be Fashion-MNIST classes in [0, {len(CLASS_NOUNS)}), "
                         f"got values in [{labels.min()}, {labels.max()}].")
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    template_idx = rng.integers(0, len(templates), size=n)
    synonym_draw = rng.random(n)
    use_word = rng.random(n) < attribute_prob
    captions = []
    for i in range(n):
        label = int(labels[i])
        synonym = int(synonym_draw[i] * len(CLASS_NOUNS[label]))
        adjective = words[i] if use_word[i] else ""
        captions.append(templates[template_idx[i]].format(object_phrase(label, adjective, synonym)))
    return captions
