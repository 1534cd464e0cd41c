"""Checkpoints: an orbax `CheckpointManager` over ``WORKDIR/checkpoints/<step>/``.

Each checkpoint holds three items:
  * ``state``:  the `TrainState` pytree (step, params, optimiser state, EMAs, PRNG key),
    written by every host for its own shards and restored onto the mesh of the target;
  * ``data``:   the data iterator position (``iterator.get_state()``, JSON);
  * ``config``: the full config (JSON), so sampling can rebuild the model from the
    workdir alone.

Saving is atomic: orbax writes into a temporary ``<step>.orbax-checkpoint-tmp-*`` directory
and renames it to ``<step>`` only once every item is complete, so an interrupted save never
shadows the last complete checkpoint (unfinished directories are ignored on restore).

A save that fails (in the foreground or in orbax's background thread) or does not finish
within a time limit raises `CheckpointSaveError` naming the step and the directory.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable

import ml_collections
import orbax.checkpoint as ocp

from diffusion_jax import config_utils

CHECKPOINT_SUBDIR = "checkpoints"
# files that mark a directory of converted weights (run_sample.py --checkpoint), not a workdir
_CHECKPOINT_MARKERS = (("model_index.json", "a Stable Diffusion pipeline directory"),
                       ("unet.json", "a converted diffusers UNet checkpoint"),
                       ("config.json", "a converted or a diffusers model directory"))


# manager -> the step of its newest save, so a failed commit can be named
_LAST_SAVED_STEP = weakref.WeakKeyDictionary()


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (or did not commit in time)."""


def make_manager(workdir: str, *, max_to_keep: int = 3,
                 async_checkpointing: bool = True, create: bool = True) -> ocp.CheckpointManager:
    """A manager for ``WORKDIR/checkpoints`` keeping the newest ``max_to_keep`` steps.

    Args:
        workdir: the training directory.
        max_to_keep: number of checkpoints kept (older ones are deleted).
        async_checkpointing: write in a background thread (arrays are copied to host first).
        create: create the directory if missing; with ``create=False`` a missing
            directory raises.

    Raises:
        FileNotFoundError: ``create=False`` and ``WORKDIR/checkpoints`` does not exist (a
            Stable Diffusion or converted UNet directory is named as such).
    """
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    if not create and not os.path.isdir(directory):
        for marker, what in _CHECKPOINT_MARKERS:
            if os.path.isfile(os.path.join(workdir, marker)):
                raise FileNotFoundError(f"{workdir} is {what} ({marker}), not a training "
                                        "workdir: pass it as --checkpoint")
        raise FileNotFoundError(
            f"no checkpoint directory {directory!r}: is {workdir!r} a training workdir?")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create,
        enable_async_checkpointing=async_checkpointing)
    return ocp.CheckpointManager(directory, options=options)


def check_not_workdir(path: str) -> None:
    """Refuses a training workdir, or its ``checkpoints/`` folder, given where a converted
    checkpoint is expected (the mirror image of `make_manager`'s check).

    Raises:
        FileNotFoundError: naming what ``path`` is and the ``--workdir`` to pass instead.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
        raise FileNotFoundError(f"{path} is a training workdir ({CHECKPOINT_SUBDIR}/), not a "
                                "converted checkpoint: pass it as --workdir")
    if (os.path.basename(path) == CHECKPOINT_SUBDIR and os.path.isdir(path)
            and any(name.isdigit() for name in os.listdir(path))):
        raise FileNotFoundError(f"{path} is the {CHECKPOINT_SUBDIR}/ folder of a training "
                                f"workdir: pass {os.path.dirname(path)} as --workdir")


def save(manager: ocp.CheckpointManager, state: Any, *, step: int,
         data_state: dict[str, Any], config: ml_collections.ConfigDict,
         timeout_s: float = 3600.0) -> bool:
    """Saves ``state``, the data position and the config as checkpoint ``step``.

    The save (with an asynchronous manager: waiting for the previous save, then copying
    the arrays to host memory) runs in a helper thread, so a stuck write cannot hang the
    caller; an asynchronous save's commit is awaited by `wait` / `close`.

    Returns:
        False if checkpoint ``step`` already exists (nothing is written), else True.

    Raises:
        CheckpointSaveError: the save, or the previous asynchronous one, failed or did not
            finish within ``timeout_s`` seconds.
    """
    if step in manager.all_steps():
        return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_utils.config_to_dict(config)))
    saved = _run_with_timeout(manager, lambda: manager.save(step, args=args),
                              f"saving checkpoint {step}", timeout_s)
    _LAST_SAVED_STEP[manager] = step
    return saved


def wait(manager: ocp.CheckpointManager, timeout_s: float) -> None:
    """Blocks until pending (asynchronous) saves have committed.

    Raises:
        CheckpointSaveError: a pending save failed, or it did not commit within ``timeout_s``
            seconds (the wait runs in a helper thread, so a stuck write cannot hang the caller).
    """
    step = _LAST_SAVED_STEP.get(manager)
    what = "waiting for the last checkpoint" if step is None else f"waiting for checkpoint {step}"
    _run_with_timeout(manager, manager.wait_until_finished, f"{what} to commit", timeout_s)


def close(manager: ocp.CheckpointManager, timeout_s: float) -> None:
    """`wait`, then releases the manager's threads; same errors as `wait`."""
    wait(manager, timeout_s)
    _run_with_timeout(manager, manager.close, "closing the checkpoint manager", timeout_s)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the latest) onto ``abstract_state``'s shardings.

    Args:
        manager: from `make_manager`.
        abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set, the
            structure of the saved state.
        step: which checkpoint; None = the latest.

    Returns:
        ``(state, data_state)``.

    Raises:
        FileNotFoundError: there is no checkpoint (or no checkpoint ``step``).
    """
    step = _resolve_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data


def restore_params(manager: ocp.CheckpointManager, abstract_params: Any, *, num_emas: int,
                   step: int | None = None) -> Any:
    """The parameters to sample with from checkpoint ``step`` (default: the latest): its first
    EMA, or the raw parameters when the run keeps none (``num_emas = 0``).

    Only that part of the saved ``state`` is read (orbax partial restore): no optimiser state,
    no train state, nothing else built or allocated.

    Args:
        manager: from `make_manager`.
        abstract_params: the ``nnx.State`` of the model's parameters as
            ``jax.ShapeDtypeStruct`` leaves carrying their sharding.
        num_emas: ``len(config.optim.ema_decays)`` of the stored config.
        step: which checkpoint; None = the latest.

    Raises:
        FileNotFoundError: there is no checkpoint (or no checkpoint ``step``).
    """
    step = _resolve_step(manager, step)
    item = ({"ema_params": (abstract_params,) * num_emas} if num_emas
            else {"params": abstract_params})
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return restored.state["ema_params"][0] if num_emas else restored.state["params"]


def load_config(manager: ocp.CheckpointManager, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with checkpoint ``step`` (default: the latest), locked and migrated to
    today's layout (`config_utils.migrate`: fields added since get the value that reproduces
    the run, moved fields are moved).

    Raises:
        FileNotFoundError: there is no checkpoint (or no checkpoint ``step``).
    """
    step = _resolve_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_utils.config_from_dict(restored.config)


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    """``step``, or the latest saved step; FileNotFoundError when there is none."""
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {str(manager.directory)!r}.")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {str(manager.directory)!r}; saved steps: "
            f"{sorted(steps)}.")
    return step


def _run_with_timeout(manager, fn: Callable[[], Any], what: str, timeout_s: float) -> Any:
    """``fn()`` run in a daemon thread; its exception, or a timeout, is a CheckpointSaveError."""
    errors, results = [], []

    def target():
        try:
            results.append(fn())
        except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True, name="checkpoint-wait")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise CheckpointSaveError(
            f"{what} in {manager.directory} did not finish within {timeout_s:g} s "
            f"(train.checkpoint_timeout_s); is the directory writable and the disk not full?")
    if errors:
        raise _save_error(manager, what, errors[0]) from errors[0]
    return results[0]


def _save_error(manager, what: str, error: BaseException) -> CheckpointSaveError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return CheckpointSaveError(f"{what} in {manager.directory} failed: "
                               f"{type(error).__name__}: {first_line}")
