"""CLIP tokenizer of a checkpoint's ``tokenizer/`` directory, through the ``tokenizers`` library.

Reads ``tokenizer.json`` when present; otherwise builds CLIP's byte-level BPE from
``vocab.json`` + ``merges.txt`` the way transformers' ``CLIPTokenizer`` does (NFC, whitespace
collapsed, lower case; CLIP's split pattern; byte-level symbols; ``</w>`` word suffix;
``<|startoftext|> ... <|endoftext|>`` around every prompt). ``tokenizer_config.json`` /
``special_tokens_map.json`` give the special tokens and ``model_max_length``; prompts are
truncated and padded to that length (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence

import numpy as np

from diffusion_jax import config_utils

_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
          r"""[^\s\p{L}\p{N}]+""")


class CLIPTokenizer:
    """Prompts -> fixed-length token ids.

    Attributes:
        max_length: the padded length L (``model_max_length``, 77 for SD).
        pad_token_id, bos_token_id, eos_token_id: ids of the special tokens.
        backend: the ``tokenizers.Tokenizer`` (truncation and padding enabled).
    """

    def __init__(self, backend, *, max_length: int, pad_token: str, bos_token: str,
                 eos_token: str):
        ids = {name: backend.token_to_id(tok) for name, tok in
               (("pad_token", pad_token), ("bos_token", bos_token), ("eos_token", eos_token))}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer: special token(s) {missing} are not in the vocabulary")
        self.backend, self.max_length = backend, max_length
        self.pad_token_id, self.bos_token_id = ids["pad_token"], ids["bos_token"]
        self.eos_token_id = ids["eos_token"]
        backend.enable_truncation(max_length)
        backend.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=pad_token)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``prompts`` (B strings) -> ``[B, max_length]`` int32 ids (BOS, tokens, EOS, padding).

        A prompt longer than ``max_length`` tokens is truncated (as diffusers does) with one
        ``UserWarning`` naming the prompts cut.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encodings = self.backend.encode_batch(prompts)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            shown = ", ".join(f"{i} ({prompts[i][:40]!r}{'...' if len(prompts[i]) > 40 else ''})"
                              for i in cut[:3])
            warnings.warn(f"{len(cut)} prompt(s) longer than the text encoder's {self.max_length} "
                          f"tokens were truncated to fit: prompt {shown}.", stacklevel=2)
        return np.asarray([e.ids for e in encodings], np.int32)

    def attention_mask(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``[B, max_length]`` int32: 1 on BOS/tokens/EOS, 0 on padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return np.asarray([e.attention_mask for e in self.backend.encode_batch(prompts)], np.int32)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (read by `load_tokenizer`)."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        tokens = {name: self.backend.id_to_token(i) for name, i in
                  (("pad_token", self.pad_token_id), ("bos_token", self.bos_token_id),
                   ("eos_token", self.eos_token_id))}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": self.max_length, **tokens}, f, indent=2)


def load_tokenizer(directory: str | os.PathLike) -> CLIPTokenizer:
    """Loads the CLIP tokenizer of a ``tokenizer/`` directory.

    Raises:
        FileNotFoundError: the directory, or both ``tokenizer.json`` and ``vocab.json`` +
            ``merges.txt``, are missing.
        ValueError: ``model_max_length`` is missing (or absurd), a special token is unknown, or a
            file is unreadable (the message names it).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer: directory {directory} not found")
    settings = dict(_DEFAULTS)
    max_length = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            data = config_utils.read_json(path, "tokenizer settings")
            settings.update({k: _content(data[k]) for k in _DEFAULTS if data.get(k) is not None})
            max_length = data.get("model_max_length", max_length)
    if not isinstance(max_length, int) or not 0 < max_length < 100_000:
        raise ValueError(f"tokenizer: {directory}/tokenizer_config.json must give an integer "
                         f"model_max_length (77 for SD), got {max_length!r}")
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        from tokenizers import Tokenizer
        backend = _read(path, Tokenizer.from_file, path)
    else:
        backend = _from_vocab_merges(directory, settings)
    return CLIPTokenizer(backend, max_length=max_length, pad_token=settings["pad_token"],
                         bos_token=settings["bos_token"], eos_token=settings["eos_token"])


def _read(files: str, read, *paths: str):
    """``read(*paths)``, with the ``tokenizers`` library's bare ``Exception`` for a damaged file
    turned into a ValueError naming ``files``."""
    try:
        return read(*paths)
    except Exception as e:  # noqa: BLE001  the Rust library raises a bare Exception
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"tokenizer: cannot read {files} ({reason})") from e


def _from_vocab_merges(directory: str, settings: dict[str, str]):
    """CLIP's BPE pipeline from ``vocab.json`` + ``merges.txt`` (as transformers builds it)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import BPE

    vocab_path, merges_path = (os.path.join(directory, n) for n in ("vocab.json", "merges.txt"))
    for path in (vocab_path, merges_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: {path} not found (and no tokenizer.json in "
                                    f"{directory})")
    vocab, merges = _read(f"{vocab_path} / {merges_path}", BPE.read_file, vocab_path,
                          merges_path)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False,
                            unk_token=settings["unk_token"]))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(settings[k], special=True) for k in
                                ("bos_token", "eos_token", "unk_token", "pad_token")])
    bos, eos = settings["bos_token"], settings["eos_token"]
    for tok in (bos, eos):
        if backend.token_to_id(tok) is None:
            raise ValueError(f"tokenizer: special token {tok!r} is not in {vocab_path}")
    backend.post_processor = processors.RobertaProcessing(
        (eos, backend.token_to_id(eos)), (bos, backend.token_to_id(bos)),
        trim_offsets=False, add_prefix_space=False)
    return backend


def _content(token) -> str:
    """A special token given as a string or as ``{"content": ...}``."""
    return token["content"] if isinstance(token, dict) else token
