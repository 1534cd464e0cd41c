"""Config (de)serialisation: a ConfigDict <-> the JSON dict stored with each checkpoint; JSON
object files read with errors that name the file.

Stored configs are migrated when read (`config_from_dict`, the one place): a run written
before a field existed gets the value that reproduces how it was trained (`ADDED_FIELDS`),
and fields that moved are moved (`MOVED_FIELDS`), so every reader sees today's layout.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import ml_collections

ADDED_FIELDS = {
    "train.objective": "diffusion",
    "diffusion.kind": "discrete",
    "model.time_input": "discrete",
    "optim.ema_warmup": False,
    "clip.eos_token_id": 1,
}
"""Fields added after runs were stored -> the value that reproduces those runs. Other fields
missing from a stored config do not change what its weights mean; resuming takes them from the
new config and reports them (`diffusion_jax.resume.config_changes`)."""

ARCH_OF_OBJECTIVE = {"diffusion": "unet", "autoencoder": "autoencoder_kl", "clip": "clip",
                     "latent_diffusion": "cond_unet"}
"""``model.arch`` of runs stored before the field existed: the one arch each objective trained."""

MOVED_FIELDS = {
    "latent.block_out_channels": "model.block_out_channels",
    "latent.cross_attn": "model.cross_attn",
    "latent.num_heads": "model.heads_per_level",
    "latent.layers_per_block": "model.num_res_blocks",
    "latent.norm_num_groups": "model.num_groups",
}
"""Old location -> new location. The latent UNet's settings moved to ``config.model``; the
last two share the pixel UNet's fields. Moved only for the objective that read them
(``latent_diffusion``); elsewhere the old fields are dropped."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable plain dict of ``config`` (tuples become lists)."""
    return json.loads(config.to_json())


def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """The locked ConfigDict stored by `config_to_dict` (lists become tuples again), migrated
    to today's layout (`migrate`)."""
    config = ml_collections.ConfigDict(_lists_to_tuples(migrate(d)))
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


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of the stored config dict ``d`` in today's layout.

    Fills `ADDED_FIELDS` that are missing, moves `MOVED_FIELDS` and sets a missing
    ``model.arch`` to the arch its objective trained (`ARCH_OF_OBJECTIVE`). A current config
    comes back unchanged.
    """
    d = copy.deepcopy(d)
    for name, value in ADDED_FIELDS.items():
        section, field = name.split(".")
        d.setdefault(section, {}).setdefault(field, value)
    moves = d["train"]["objective"] == "latent_diffusion"
    for old, new in MOVED_FIELDS.items():
        (old_section, old_field), (new_section, new_field) = old.split("."), new.split(".")
        if old_field in d.get(old_section, {}):
            value = d[old_section].pop(old_field)
            if moves:
                d.setdefault(new_section, {})[new_field] = value
    d["model"].setdefault("arch", ARCH_OF_OBJECTIVE.get(d["train"]["objective"], ""))
    return d


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x
