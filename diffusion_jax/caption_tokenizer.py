"""A small CLIP-BPE tokenizer trained on the caption vocabulary, for text encoders trained here.

Stable Diffusion's tokenizer has 49,408 entries; captions of Fashion-MNIST use about a hundred
words. `build_caption_tokenizer` trains CLIP's byte-level BPE (same normaliser, split pattern,
``</w>`` word suffix and special tokens as :mod:`diffusion_jax.clip_tokenizer`) on every
caption the caption module can produce -- all templates, held-out ones included, every class
synonym and attribute word -- until each of those words is one token. The vocabulary also holds
every byte symbol, its ``</w>`` form and ``</w>`` itself, so any text still encodes (an unseen
word falls back to smaller pieces). `save_caption_tokenizer` writes ``vocab.json``,
``merges.txt`` and ``tokenizer_config.json``, which
:func:`diffusion_jax.clip_tokenizer.load_tokenizer` reads like any SD ``tokenizer/``
directory, so the text-to-image pipeline treats the two alike.

Ids: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1 (also the padding token, as SD 1.x), then
the 256 byte symbols, their ``</w>`` forms, ``</w>``, and the merged pieces.
"""
from __future__ import annotations

import json
import os

from diffusion_jax import captions, clip_tokenizer

BOS, EOS, WORD_END = "<|startoftext|>", "<|endoftext|>", "</w>"
BOS_ID, EOS_ID = 0, 1  # the text encoder pools at EOS_ID (its eos_token_id)


def caption_corpus() -> list[str]:
    """Every template filled with every class phrase (each synonym, with and without each
    attribute word): the text the tokenizer is trained on. Held-out templates are included on
    purpose: the tokenizer only splits words; generalising is the encoder's job."""
    phrases = [captions.object_phrase(label, adjective, synonym)
               for label, nouns in enumerate(captions.CLASS_NOUNS)
               for synonym in range(len(nouns))
               for adjective in ("", captions.DARK, captions.LIGHT)]
    return [t.format(p) for t in captions.TEMPLATES for p in phrases]


def build_caption_tokenizer(corpus: list[str] | None = None, *,
                            max_length: int = 16) -> clip_tokenizer.CLIPTokenizer:
    """Trains CLIP byte-level BPE on ``corpus`` (default `caption_corpus`) to whole words.

    Args:
        corpus: training texts.
        max_length: padded length L of the token ids (BOS + words + EOS must fit; captions
            have at most 10 words here).

    Returns:
        A :class:`~diffusion_jax.clip_tokenizer.CLIPTokenizer` (padding with ``<|endoftext|>``).
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    corpus = caption_corpus() if corpus is None else list(corpus)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=WORD_END,
                            unk_token=EOS))
    backend.normalizer, backend.pre_tokenizer = _clip_pipeline()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False,
        special_tokens=[BOS, EOS], initial_alphabet=alphabet, end_of_word_suffix=WORD_END)
    backend.train_from_iterator(corpus, trainer)
    vocab, merges = _complete_vocab(json.loads(backend.to_str())["model"], alphabet)
    return _from_vocab(vocab, merges, max_length)


def save_caption_tokenizer(tok: clip_tokenizer.CLIPTokenizer, directory: str) -> None:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` to ``directory``."""
    os.makedirs(directory, exist_ok=True)
    model = json.loads(tok.backend.to_str())["model"]
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in _merge_pairs(model["merges"]))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": tok.max_length, "bos_token": BOS, "eos_token": EOS,
                   "unk_token": EOS, "pad_token": EOS}, f, indent=2)


def _clip_pipeline():
    """CLIP's normaliser and pre-tokeniser (shared with `load_tokenizer`'s BPE path)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(clip_tokenizer._SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return normalizer, pre


def _complete_vocab(model: dict, alphabet: list[str]) -> tuple[dict[str, int], list]:
    """Ids in the order of the module docstring; every byte, byte + ``</w>`` and ``</w>``."""
    trained = sorted(model["vocab"], key=model["vocab"].get)
    order = [BOS, EOS] + alphabet + [c + WORD_END for c in alphabet] + [WORD_END] + trained
    vocab: dict[str, int] = {}
    for token in order:
        vocab.setdefault(token, len(vocab))
    return vocab, _merge_pairs(model["merges"])


def _merge_pairs(merges) -> list[tuple[str, str]]:
    """Merges as pairs (``tokenizers`` stores them as pairs or as ``"a b"`` strings)."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _from_vocab(vocab, merges, max_length) -> clip_tokenizer.CLIPTokenizer:
    """The tokenizer `load_tokenizer` would build from these ``vocab.json`` / ``merges.txt``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in merges)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
                       "unk_token": EOS, "pad_token": EOS}, f)
        return clip_tokenizer.load_tokenizer(tmp)
