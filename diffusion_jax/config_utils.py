"""Config (de)serialisation: a ConfigDict <-> the JSON dict stored with each checkpoint; JSON
object files read with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable plain dict of ``config`` (tuples become lists)."""
    return json.loads(config.to_json())


def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """The locked ConfigDict stored by `config_to_dict` (lists become tuples again)."""
    config = ml_collections.ConfigDict(_lists_to_tuples(d))
    config.lock()
    return config


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Parses a JSON object file; FileNotFoundError naming ``what`` when it is missing, ValueError
    naming the file when it is not a JSON object (e.g. truncated)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is it truncated?") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), got {type(config).__name__}")
    return config


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x
