"""Config (de)serialisation: a ConfigDict <-> the JSON dict stored with each checkpoint."""

from __future__ import annotations

import json
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


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x
