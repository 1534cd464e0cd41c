"""Resuming a training workdir safely: config compatibility and broken-checkpoint diagnosis.

A workdir's checkpoints store the config they were trained with. Resuming with a config that
changes what the saved weights mean (the model, the diffusion process, the data's shape or
classes, the optimiser's state layout, the seed that fixes the data order) would silently
turn the run into a different one, so it is refused with the list of differing fields.
Fields that only steer the rest of the run (step count, log / sample / checkpoint intervals,
the learning-rate schedule, sampling settings, the mesh) may change; they are reported. A field
missing from the stored config was added after the run was made; the run used the behaviour
from before the field, which a new field's default keeps (the code reads a missing field as that
default), so it is reported like a safe change, never refused.

When the checkpoint to resume from cannot be read (a truncated tensor file, a missing
``state/_METADATA``, a missing item), the error names the broken step and the newest intact
one, and says how to go on from it; nothing ever restarts from step 0 on its own.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint, config_utils

SAFE_TO_CHANGE = (
    "workdir_note",
    "data.data_dir", "data.folder", "data.worker_count",
    "optim.learning_rate", "optim.schedule", "optim.warmup_steps", "optim.grad_clip",
    "optim.weight_decay",
    "train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpointing", "train.checkpoint_timeout_s",
    "train.grad_accum_steps",
    # frozen-stage pins: absent in runs from before pinning; checked against
    # WORKDIR/frozen_stages.json by objectives.prepare_config
    "latent.autoencoder_step", "latent.autoencoder_sha256", "latent.clip_step",
    "latent.clip_sha256",
    "sample.", "classifier.", "mesh.", "distributed.",
)
"""Config fields (or ``section.`` prefixes) that may differ from the stored config on resume."""

SET_ASIDE_SUBDIR = "checkpoints_set_aside"


class ResumeError(ValueError):
    """The workdir cannot be resumed as asked; the message says why and what to do."""


def config_changes(stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Fields whose values differ between two configs, split into unsafe and safe changes.

    Args:
        stored: the config saved with the checkpoint.
        new: the config of this run.

    A field the stored config lacks was added after the run was stored: fields whose absence
    implies a value (`config_utils.ADDED_FIELDS`, e.g. ``diffusion.kind``) were filled with it
    when the config was read, so changing them is still refused; any other cannot change
    what the stored weights mean, so it counts as safe (taken from ``new``).

    Returns:
        ``(unsafe, safe)``: each maps a dotted field name to ``(stored value, new value)``; a
        field missing on one side has the value ``"<absent>"`` there. Fields missing from
        ``stored`` (added since) count as safe.
    """
    old_flat = _flatten(config_utils.config_to_dict(stored))
    new_flat = _flatten(config_utils.config_to_dict(new))
    unsafe, safe = {}, {}
    for name in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(name, "<absent>"), new_flat.get(name, "<absent>")
        if before != after:
            added_since = name not in old_flat
            (safe if added_since or _is_safe(name) else unsafe)[name] = (before, after)
    return unsafe, safe


def check_config(stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                 directory: str, step: int) -> dict[str, tuple[Any, Any]]:
    """Refuses a resume that would change what the weights mean; returns the safe changes.

    Raises:
        ResumeError: some field outside `SAFE_TO_CHANGE` differs (all such fields are listed).
    """
    unsafe, safe = config_changes(stored, new)
    if unsafe:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in _items(unsafe))
        raise ResumeError(
            f"refusing to resume checkpoint {step} in {directory}: the config differs in "
            f"fields that change what the saved weights mean ({listed}). Use the stored "
            f"values, or a new --workdir to start a different run.")
    return safe


def restore_for_resume(manager: ocp.CheckpointManager, abstract_state: Any,
                       config: ml_collections.ConfigDict, step: int | None = None):
    """Checks the stored config, then restores checkpoint ``step`` (default: the latest).

    Args:
        manager: the workdir's checkpoint manager.
        abstract_state: the train state's shapes and shardings (`train.abstract_train_state`).
        config: this run's config.
        step: the step to resume from; None = the latest. Checkpoints newer than an explicit
            ``step`` are moved to ``WORKDIR/checkpoints_set_aside/`` (nothing is deleted), so
            the run continues from it and can save those steps again.

    Returns:
        ``(state, data_state, safe_changes)``.

    Raises:
        ResumeError: the config differs in unsafe fields, ``step`` does not exist, or the
            checkpoint cannot be read (the message names the newest intact step).
    """
    steps = manager.all_steps()
    if step is not None and step not in steps:
        raise ResumeError(f"--step={step}: no checkpoint {step} in {manager.directory}; saved "
                          f"steps: {sorted(steps)}.")
    step = max(steps) if step is None else step
    try:
        stored = checkpoint.load_config(manager, step)
    except Exception as e:  # noqa: BLE001  any unreadable item means a broken checkpoint
        raise _broken(manager, abstract_state, step, e) from e
    safe = check_config(stored, config, str(manager.directory), step)
    try:
        state, data_state = checkpoint.restore(manager, abstract_state, step)
    except Exception as e:  # noqa: BLE001
        raise _broken(manager, abstract_state, step, e) from e
    _set_aside_newer(manager, step)
    return state, data_state, safe


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``"a.b: 1 -> 2, c: 'x' -> 'y'"`` for a dict of changes."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in _items(changes))


def _broken(manager, abstract_state, step, error) -> ResumeError:
    """The error for unreadable checkpoint ``step``, naming the newest intact earlier step."""
    directory = str(manager.directory)
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    intact = _newest_intact(manager, abstract_state, below=step)
    if intact is None:
        way_out = (f"no earlier checkpoint is intact; move {directory} aside to start again "
                   f"from step 0")
    else:
        way_out = (f"the newest intact checkpoint is step {intact}: resume from it with "
                   f"--step={intact} (run_train.py; newer steps are moved to "
                   f"{os.path.join(os.path.dirname(directory), SET_ASIDE_SUBDIR)}), or move "
                   f"{os.path.join(directory, str(step))} aside yourself")
    return ResumeError(f"checkpoint {step} in {directory} is broken ({reason[:300]}); {way_out}.")


def _newest_intact(manager, abstract_state, below: int) -> int | None:
    """The newest step < ``below`` whose config and state both restore, or None."""
    for step in sorted((s for s in manager.all_steps() if s < below), reverse=True):
        try:
            checkpoint.load_config(manager, step)
            checkpoint.restore(manager, abstract_state, step)
            return step
        except Exception:  # noqa: BLE001  this one is broken too: look further back
            continue
    return None


def _set_aside_newer(manager, step: int) -> None:
    """Moves checkpoints newer than ``step`` to ``WORKDIR/checkpoints_set_aside/<step>``."""
    newer = [s for s in manager.all_steps() if s > step]
    if not newer:
        return
    if jax.process_index() == 0:  # one host moves the shared directory; the others wait
        _move_steps(manager, newer)
    multihost_utils.sync_global_devices("diffusion_jax.resume.set_aside")
    manager.reload()


def _move_steps(manager, newer: list[int]) -> None:
    aside = os.path.join(os.path.dirname(str(manager.directory)), SET_ASIDE_SUBDIR)
    os.makedirs(aside, exist_ok=True)
    for s in newer:
        target = os.path.join(aside, str(s))
        if os.path.exists(target):
            raise ResumeError(f"cannot set checkpoint {s} aside: {target} already exists.")
        shutil.move(os.path.join(str(manager.directory), str(s)), target)


def _is_safe(name: str) -> bool:
    return any(name == p or (p.endswith(".") and name.startswith(p)) for p in SAFE_TO_CHANGE)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _items(changes):
    return [(k, a, b) for k, (a, b) in changes.items()]
