"""Fashion-MNIST captions: phrases, the template split, the measured attribute, seeded draws."""

import numpy as np
import pytest

from diffusion_jax import captions


def _images(levels, size=8):
    """Images whose item (a centred square) has displayed intensity ``level`` in [0, 1]."""
    out = np.full((len(levels), size, size), -1.0)
    for im, level in zip(out, levels):
        im[2:6, 2:6] = 2.0 * level - 1.0
    return out


@pytest.mark.parametrize("label,adjective,synonym,expected", [
    (0, "", 0, "a t-shirt"), (1, "", 0, "a pair of trousers"),
    (1, "dark", 1, "a pair of dark pants"), (4, "light", 1, "a light jacket"),
    (9, "", 0, "an ankle boot"), (9, "dark", 0, "a dark ankle boot"), (9, "", 1, "a boot"),
    (8, "", 1, "a handbag")])
def test_object_phrases(label, adjective, synonym, expected):
    assert captions.object_phrase(label, adjective, synonym) == expected


def test_class_prompts_and_bad_labels():
    prompts = captions.class_prompts()
    assert len(prompts) == len(captions.FASHION_MNIST_CLASSES) == 10
    assert prompts[7] == "a photo of a sneaker" and prompts[9] == "a photo of an ankle boot"
    assert captions.class_prompts("{}")[1] == "a pair of trousers"
    with pytest.raises(ValueError, match="label=10"):
        captions.object_phrase(10)
    with pytest.raises(ValueError, match="labels must be"):
        captions.random_captions(_images([0.5]), [-1])


def test_template_split_is_a_seeded_partition():
    train, heldout = captions.split_templates(seed=0)
    assert len(heldout) == 4 and len(train) == len(captions.TEMPLATES) - 4
    assert set(train) | set(heldout) == set(captions.TEMPLATES) and not set(train) & set(heldout)
    assert captions.split_templates(seed=0) == (train, heldout)
    others = {captions.split_templates(seed=s)[1] for s in range(1, 6)}
    assert len(others | {heldout}) > 1  # the seed moves the split
    with pytest.raises(ValueError, match="num_heldout"):
        captions.split_templates(num_heldout=len(captions.TEMPLATES))
    with pytest.raises(ValueError, match="exactly one"):
        captions.split_templates(("a {} {}", "b {}"), num_heldout=1)


def test_brightness_words_from_mean_item_intensity():
    words = captions.brightness_words(_images([0.2, 0.44, 0.46, 0.6, 0.71, 0.73, 1.0, 0.0]))
    assert list(words) == ["dark", "dark", "", "", "", "light", "light", ""]
    # Only the item counts, not the black background: a larger item has the same word.
    big = np.full((1, 8, 8), 2.0 * 0.9 - 1.0)
    assert captions.brightness_words(big)[0] == "light"
    rgb = np.repeat(_images([0.3])[..., None], 3, axis=-1)
    assert captions.brightness_words(rgb)[0] == "dark"


def _sources(caption, label, word, templates):
    """Templates that give ``caption`` when filled with an allowed phrase of ``label``."""
    phrases = {captions.object_phrase(label, a, k)
               for a in {"", word} for k in range(len(captions.CLASS_NOUNS[label]))}
    return {(t, p) for t in templates for p in phrases if t.format(p) == caption}


def test_random_captions_are_seeded_and_follow_the_image():
    n = 600
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=n)
    levels = rng.choice([0.3, 0.6, 0.9], size=n)  # dark, no word, light
    train, heldout = captions.split_templates(seed=0)
    images = _images(levels)
    caps = captions.random_captions(images, labels, templates=train, seed=(3, 7))
    assert caps == captions.random_captions(images, labels, templates=train, seed=(3, 7))
    assert caps != captions.random_captions(images, labels, templates=train, seed=(3, 8))
    used, named, with_word = set(), 0, 0
    for cap, label, level in zip(caps, labels, levels):
        word = {0.3: "dark", 0.6: "", 0.9: "light"}[level]
        sources = _sources(cap, label, word, train)
        assert sources, (cap, label, word)  # a training template, the class, the image's word
        assert not _sources(cap, label, word, heldout)  # no held-out template
        used.update(t for t, _ in sources)
        if word:
            with_word += 1
            named += any(word in p.split() for _, p in sources)
    assert used == set(train)  # every training template gets drawn
    # Half of the captions of images with a word name it (binomial sd ~0.025 at n ~ 400).
    assert named / with_word == pytest.approx(0.5, abs=0.1)
    never = captions.random_captions(images, labels, templates=train, seed=0, attribute_prob=0.0)
    assert not any(w in c.split() for c in never for w in ("dark", "light"))
